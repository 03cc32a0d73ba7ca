"""Memory banks searched by separate keys, and RaSeRec whose keys mix collaborative and semantic
similarity (``raserec.semantic.keys``): the keys' arithmetic, the bank's payload, persistence,
and the module on a real Beauty slice with the ``hash`` embedder."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raserec.analysis.evaluator import load_raft
from raserec.checkpoint import save_encoder
from raserec.cli import main
from raserec.data.datamodule import SequenceDataModule
from raserec.errors import CheckpointError, ConfigError
from raserec.memory.bank import IndexConfig, MemoryBank
from raserec.semantic.keys import SemanticKeys, SemanticKeysRAFTModule
from raserec.semantic.space import SemanticConfig, SemanticSpace
from tests.conftest import DATA, require
from tests.test_memory_bank import tiny_encoder

ITEMS = DATA / "Beauty.items.jsonl"
FLAT = {"k": 10, "index": "flat"}


def _exact(keys: np.ndarray, query: np.ndarray, users: np.ndarray, ends: np.ndarray, qu: np.ndarray, qe: np.ndarray,
           k: int) -> list[list[int]]:
    """Brute-force top-k by cosine of the keys under the leakage rule."""
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = []
    for i in range(len(query)):
        scores = kn @ qn[i]
        scores[(users == qu[i]) & (ends >= qe[i])] = -np.inf
        out.append(list(np.argsort(-scores, kind="stable")[:k]))
    return out


def test_a_bank_with_separate_keys_searches_by_them_and_returns_h(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, d, dk = 300, 8, 5
    h, keys = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, dk)).astype(np.float32)
    users, ends, targets = rng.integers(0, 40, n), rng.integers(1, 9, n), rng.integers(1, 50, n)
    bank = MemoryBank.from_arrays(h, users, ends, targets, IndexConfig(kind="flat"), keys=keys)
    assert bank.key_dim == dk and bank.dim == d
    query, qu, qe = rng.normal(size=(20, dk)).astype(np.float32), rng.integers(0, 40, 20), rng.integers(1, 9, 20)
    rows, mask = bank.search(query, qu, qe, 7)
    assert mask.all() and rows.tolist() == _exact(keys, query, users, ends, qu, qe, 7)
    h_k, t_k = bank.gather(rows, mask)
    assert np.array_equal(h_k.numpy(), h[rows.numpy()]) and np.array_equal(t_k.numpy(), targets[rows.numpy()])
    with pytest.raises(ValueError, match="query keys have dimension 8, the bank's keys 5"):
        bank.search(h[:3], qu[:3], qe[:3], 7)
    # the training queries' memories come from the entries' own keys
    self_rows, _ = bank.self_neighbours(7)
    assert self_rows[:20].tolist() == _exact(keys, keys[:20], users, ends, users[:20], ends[:20], 7)
    # persistence and subsets keep the keys; a reloaded bank answers the same
    loaded = MemoryBank.load(bank.save(tmp_path / "bank"))
    assert np.array_equal(loaded.keys, keys) and torch.equal(loaded.search(query, qu, qe, 7)[0], rows)
    half = bank.subset(np.arange(n) % 2 == 0)
    assert np.array_equal(half.keys, keys[::2]) and half.encoder_fingerprint == bank.encoder_fingerprint
    # the dynamic bank: new entries need their keys (and a bank keyed by h takes none)
    with pytest.raises(ValueError, match="pass the new entries' keys"):
        bank.add(h[:2], users[:2], ends[:2], targets[:2])
    bank.add(h[:2], users[:2], ends[:2], targets[:2], keys[:2])
    assert len(bank) == n + 2 == len(bank.keys)
    plain = MemoryBank.from_arrays(h, users, ends, targets, IndexConfig(kind="flat"))
    assert plain.keys is None
    with pytest.raises(ValueError, match="this bank's keys are h"):
        plain.add(h[:2], users[:2], ends[:2], targets[:2], keys[:2])
    np.savez(tmp_path / "bank" / "payload.npz", h=h, users=users, ends=ends, targets=targets)  # keys lost
    with pytest.raises(CheckpointError, match="damaged memory bank"):
        MemoryBank.load(tmp_path / "bank")


def test_semantic_keys_score_is_the_weighted_mix_of_both_cosines() -> None:
    torch.manual_seed(0)
    items = F.normalize(torch.randn(31, 6), dim=-1)
    items[0] = 0.0  # padding
    items[7] = 0.0  # an item without text
    ids = torch.randint(1, 31, (40, 12))
    ids[:, :4] = 0  # left padding
    ids[0] = torch.tensor([0] * 11 + [7])  # a prefix whose only item has no text
    h = torch.randn(40, 5)
    for w in (0.0, 0.3, 1.0):
        keys = SemanticKeys(items, w, window=6)(h, ids)
        assert keys.shape == (40, 11)
        s = F.normalize(items[ids[:, -6:]].sum(1), dim=-1)
        expected = (1 - w) * F.normalize(h, dim=-1) @ F.normalize(h, dim=-1).T + w * s @ s.T
        assert torch.allclose(keys[1:] @ keys[1:].T, expected[1:, 1:], atol=1e-5)
        assert not keys[0, 5:].any()  # no text at all: retrieved by h alone
    assert torch.equal(SemanticKeys(items, 0.0, 6)(h, ids)[:, :5], F.normalize(h, dim=-1))
    assert SemanticKeys(items, 0.3, 6).fingerprint != SemanticKeys(items, 0.4, 6).fingerprint
    other = items.clone()
    other[3] = F.normalize(torch.randn(6), dim=0)
    assert SemanticKeys(items, 0.3, 6).fingerprint != SemanticKeys(other, 0.3, 6).fingerprint
    with pytest.raises(ConfigError, match="semantic_weight must lie in"):
        SemanticKeys(items, 1.5, 6)


@pytest.fixture(scope="module")
def slice_setup(beauty_slice, tmp_path_factory):
    require(ITEMS)
    dm = SequenceDataModule(beauty_slice, cache_dir=None, batch_size=256, eval_batch_size=512)
    dm.setup("fit")
    root = tmp_path_factory.mktemp("semkeys")
    ckpt = root / "encoder.pt"
    torch.manual_seed(0)
    save_encoder(tiny_encoder(dm.data.num_items), ckpt, {"num_items": dm.data.num_items,
                                                         "content_hash": dm.data.content_hash()})
    semantic = SemanticConfig(text_source=str(ITEMS), embedder="hash", prefix_vectors="mean_items",
                              cache_dir=str(root / "sem"))
    return dm, ckpt, semantic


def _semkeys_module(ckpt: Path, semantic: SemanticConfig, weight: float) -> SemanticKeysRAFTModule:
    return SemanticKeysRAFTModule(encoder_checkpoint=str(ckpt), semantic=semantic, semantic_weight=weight, bank=FLAT)


def test_semantic_weight_moves_retrieval_from_collaborative_to_semantic_neighbours(slice_setup) -> None:
    dm, ckpt, semantic = slice_setup
    space = SemanticSpace(dm, semantic, progress=False)
    found = {}
    for w in (0.0, 1.0):
        module = _semkeys_module(ckpt, semantic, w)
        module.attach(dm)
        module.retriever.ensure(dm, "fit")
        bank = module.retriever.bank
        assert bank.keys.shape == (len(dm.pairs("train").user), 16 + space.item_vectors.shape[1])
        found[w] = bank.self_neighbours(10)
    pairs = dm.pairs("train")
    h = module.retriever.bank.h
    sem = space.prefix_vectors  # the numpy mean_items vectors of the same prefixes
    queries = np.arange(0, len(pairs.user), 997)[:12]
    has_text = np.linalg.norm(sem, axis=1) > 0
    # w = 0: RaSeRec's own collaborative neighbours; w = 1: the prefixes' semantic neighbours
    collab = _exact(h, h[queries], pairs.user, pairs.end, pairs.user[queries], pairs.end[queries], 10)
    same = np.mean([set(found[0.0][0][q]) == set(c) for q, c in zip(queries, collab, strict=True)])
    assert same >= 11 / 12  # float ties aside
    keys_sem = np.where(has_text[:, None], sem, 0.0)
    for q in queries[has_text[queries]][:5]:
        scores = keys_sem @ sem[q]
        scores[(pairs.user == pairs.user[q]) & (pairs.end >= pairs.end[q])] = -np.inf
        best = np.sort(scores)[::-1][:10]
        got = scores[found[1.0][0][q]]
        assert np.allclose(np.sort(got)[::-1], best, atol=1e-5)
    assert (found[0.0][0] != found[1.0][0]).any(axis=1).mean() > 0.5


def test_semantic_keys_raft_trains_checkpoints_and_reloads(slice_setup, tmp_path) -> None:
    dm, ckpt, semantic = slice_setup
    L.seed_everything(3)
    module = _semkeys_module(ckpt, semantic, 0.5)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    before = {k: v.clone() for k, v in module.ram.state_dict().items()}
    trainer.fit(module, datamodule=dm)
    assert module.retriever.key_fn is not None and module.retriever.bank.keys is not None
    assert any(not torch.equal(v, module.ram.state_dict()[k]) for k, v in before.items())
    path = tmp_path / "semkeys.ckpt"
    trainer.save_checkpoint(path)
    hp = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hp["semantic"]["embedder"] == "hash" and hp["semantic_weight"] == 0.5
    loaded, _ = load_raft(path, dm.data_path, cache_dir=None)
    assert isinstance(loaded, SemanticKeysRAFTModule)
    assert loaded.retriever.key_fn.fingerprint == module.retriever.key_fn.fingerprint
    for name, tensor in module.ram.state_dict().items():
        assert torch.equal(tensor, loaded.ram.state_dict()[name])
    with pytest.raises(ConfigError, match="prefix_vectors must be 'mean_items'"):
        SemanticKeysRAFTModule(encoder_checkpoint=str(ckpt), semantic=SemanticConfig(embedder="hash"))


def test_stage1_from_reuses_another_experiments_encoders(tmp_path, capsys) -> None:
    """A new stage 2 on the encoders of an earlier experiment: stage 1 is copied, not trained, and a
    seed that experiment never finished is refused before anything runs."""
    from raserec.experiments.runner import adopt_stage1, parse_args, stage_command

    source = tmp_path / "beauty_raserec" / "seed_2024"
    source.mkdir(parents=True)
    (source / "pretrain.json").write_text(json.dumps({"metrics": {"test/NDCG@10": 0.04}}))
    (source / "encoder.pt").write_bytes(b"record")
    spec = parse_args(["--name", "beauty_semkeys_raserec", "--pretrain", "configs/beauty_pretrain.yaml",
                       "--finetune", "configs/stage/raft_semantic_keys.yaml", "--data", "configs/data/beauty.yaml",
                       "--stage1-from", "beauty_raserec", "--seeds", "2024", "--results-dir", str(tmp_path)])
    assert adopt_stage1(spec, 2024) and not adopt_stage1(spec, 2024)  # copied once
    assert spec.encoder_record(2024).read_bytes() == b"record"
    adopted = json.loads(spec.stage_results(2024, "pretrain").read_text())
    assert adopted["adopted_from"] == str(source) and adopted["metrics"] == {"test/NDCG@10": 0.04}
    args = stage_command(spec, 2024, "finetune")
    assert args[args.index("--model.init_args.encoder_checkpoint") + 1] == str(spec.encoder_record(2024))
    assert main(["experiment", "--name", "x", "--pretrain", "configs/beauty_pretrain.yaml", "--finetune",
                 "configs/stage/raft_semantic_keys.yaml", "--stage1-from", "beauty_raserec", "--seeds", "2025",
                 "--results-dir", str(tmp_path)]) == 2
    assert "seed 2025 has no finished stage 1 there" in capsys.readouterr().err
