"""RAFT: RAM semantics (alpha = 1, K = 0, no memory), the frozen encoder, the memory-bank
callback's rebuild policy, checkpoints and the CLI end to end on real Beauty."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import pytest
import torch
import yaml

from raserec.checkpoint import RECORD_KEY, load_encoder, save_encoder
from raserec.cli import main
from raserec.data.datamodule import SequenceDataModule
from raserec.errors import CheckpointError, RaserecError
from raserec.finetune.module import RAFTModule
from raserec.memory.bank import MemoryBank
from raserec.memory.callback import MemoryBankCallback
from raserec.memory.retriever import BankConfig
from raserec.models.ram import RAMConfig, RetrievalAugmentedModule
from tests.conftest import BEAUTY, require
from tests.test_memory_bank import synthetic_data, synthetic_dm, tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_and_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """Synthetic data (600 users) and a random-init tiny SASRec saved as a pre-training checkpoint."""
    data = synthetic_data(num_users=600)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_encoder(tiny_encoder(data.num_items), path, {"num_items": data.num_items,
                                                      "content_hash": data.content_hash()})
    return data, path


def _dm(data, **kwargs) -> SequenceDataModule:
    return synthetic_dm(data, batch_size=kwargs.pop("batch_size", 64), eval_batch_size=128, **kwargs)


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, accelerator="cpu", devices=1)
    return L.Trainer(**{**defaults, **kwargs})


def _batch(dm: SequenceDataModule, split: str = "val", n: int = 64):
    return dm.dataset(split).__getitems__(list(range(n)))


# ----------------------------------------------------------------------------- RAM
def test_ram_alpha_one_k_zero_and_rows_without_memory() -> None:
    torch.manual_seed(0)
    h, h_k, v_k = torch.randn(4, 16), torch.randn(4, 5, 16), torch.randn(4, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5, [True] + [False] * 4])
    ram = RetrievalAugmentedModule(16, alpha=0.5, beta=0.7).eval()
    out = ram(h, h_k, v_k, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], h[2])  # no memory: h~ = h exactly, never NaN
    assert not torch.allclose(out[0], h[0])
    # masked slots are ignored: changing their contents changes nothing
    noisy_h, noisy_v = h_k.clone(), v_k.clone()
    noisy_h[~mask] = 100.0
    noisy_v[~mask] = -100.0
    torch.testing.assert_close(ram(h, noisy_h, noisy_v, mask), out)
    # gradients stay finite with all-masked rows
    ram.train()
    ram(h, h_k, v_k, mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ram.parameters() if p.grad is not None)
    assert torch.equal(RetrievalAugmentedModule(16, alpha=1.0)(h, h_k, v_k, mask), h)
    assert torch.equal(ram(h, h_k[:, :0], v_k[:, :0], mask[:, :0]), h)
    assert ram.channel1 is not None and ram.channel2 is not None
    one = RetrievalAugmentedModule(16, beta=1.0, depth=3)
    assert one.channel2 is None and len(one.channel1.attention) == 3 and len(one.channel1.ffn) == 2


def test_ram_formula_alpha_zero_beta_mix() -> None:
    """h~ = alpha h + (1 - alpha)(beta c1 + (1 - beta) c2), checked against the channels."""
    torch.manual_seed(1)
    h, h_k, v_k = torch.randn(3, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    mask = torch.ones(3, 4, dtype=torch.bool)
    ram = RetrievalAugmentedModule(8, alpha=0.3, beta=0.6, num_heads=2).eval()
    c1 = ram.channel1(h, h_k, v_k, mask)
    c2 = ram.channel2(h, v_k, h_k, mask)
    torch.testing.assert_close(ram(h, h_k, v_k, mask), 0.3 * h + 0.7 * (0.6 * c1 + 0.4 * c2))


def _zero_last_output(ram: RetrievalAugmentedModule) -> None:
    with torch.no_grad():
        last = ram.channel1.attention[-1].out
        last.weight.zero_()
        last.bias.zero_()


def test_ram_default_is_the_authors_block() -> None:
    """The authors' cross-attention has no residual and no LayerNorm: zeroing the last output
    projection leaves nothing of h in the channel, so h~ = alpha h exactly. The residual ablation
    (this project's earlier block) passes LN(query) through instead. Fails if the default
    regresses to the residual form."""
    torch.manual_seed(2)
    h, h_k, v_k = torch.randn(6, 64), torch.randn(6, 5, 64), torch.randn(6, 5, 64)
    mask = torch.ones(6, 5, dtype=torch.bool)
    authors = RetrievalAugmentedModule(64, alpha=0.5, beta=1.0).eval()
    assert all(a.norm is None for a in authors.channel1.attention)
    assert all(isinstance(f.norm, torch.nn.LayerNorm) for f in authors.channel1.ffn)  # FFN keeps residual + LN
    _zero_last_output(authors)
    torch.testing.assert_close(authors(h, h_k, v_k, mask), 0.5 * h, rtol=0, atol=0)
    ablation = RetrievalAugmentedModule(64, alpha=0.5, beta=1.0, residual=True, init_std=0.02).eval()
    assert all(isinstance(a.norm, torch.nn.LayerNorm) for a in ablation.channel1.attention)
    _zero_last_output(ablation)
    assert (ablation(h, h_k, v_k, mask) - 0.5 * h).abs().max() > 0.1
    # alpha = 1 / K = 0 still give h bit for bit with the authors' block
    assert torch.equal(RetrievalAugmentedModule(64, alpha=1.0)(h, h_k, v_k, mask), h)
    assert torch.equal(RetrievalAugmentedModule(64)(h, h_k[:, :0], v_k[:, :0], mask[:, :0]), h)


def test_ram_keeps_pytorch_default_init_unless_init_std() -> None:
    """PyTorch's Linear init is U(+-1/sqrt(fan_in)) with non-zero biases (std 1/sqrt(3 * 64) = .072
    for d = 64); RecBole's normal(0, .02) with zero biases only when asked for."""
    torch.manual_seed(3)
    default = RetrievalAugmentedModule(64).channel1.attention[0]
    w = default.query.weight.detach()
    assert 0.06 < float(w.std()) < 0.085 and float(w.abs().max()) <= 1 / 8 + 1e-6
    assert float(default.query.bias.abs().sum()) > 0
    normal = RetrievalAugmentedModule(64, init_std=0.02).channel1.attention[0]
    assert 0.017 < float(normal.query.weight.std()) < 0.023 and float(normal.query.bias.abs().sum()) == 0.0


# ----------------------------------------------------------------------------- module
_BANK = {f.name for f in fields(BankConfig)}
_RAM = {f.name for f in fields(RAMConfig)}


def _module(ckpt: Path, **kwargs) -> RAFTModule:
    """A RAFT module; bank and RAM settings may be given flat (``k=5``, ``alpha=1.0``)."""
    bank = {"nlist": 16, **{k: kwargs.pop(k) for k in list(kwargs) if k in _BANK}}
    ram = {k: kwargs.pop(k) for k in list(kwargs) if k in _RAM}
    return RAFTModule(encoder_checkpoint=str(ckpt), bank=bank, ram=ram, **kwargs)


def _attach_bank(module: RAFTModule, dm: SequenceDataModule) -> None:
    module.retriever.build(dm.dataset("train"))


def test_alpha_one_and_k_zero_give_the_pretrained_scores(data_and_ckpt) -> None:
    data, ckpt = data_and_ckpt
    dm = _dm(data)
    batch = _batch(dm)
    encoder, _ = load_encoder(ckpt)
    with torch.no_grad():
        expected = encoder.eval().score(encoder(batch["input_ids"]))
    for kwargs in ({"alpha": 1.0}, {"k": 0}, {"alpha": 0.5}):
        module = _module(ckpt, **kwargs).eval()
        _attach_bank(module, dm)
        with torch.no_grad():
            scores = module.scores(batch)
        assert torch.equal(scores, expected) == (kwargs != {"alpha": 0.5}), kwargs
    # an empty bank: nothing to retrieve, h~ = h
    module = _module(ckpt).eval()
    module.retriever.bank = MemoryBank(encoder.hidden_size)
    with torch.no_grad():
        assert torch.equal(module.scores(batch), expected)
    module.retriever.bank = None
    with pytest.raises(RaserecError, match="no memory bank"):
        module.scores(batch)


def test_num_items_must_match_the_checkpoint(data_and_ckpt) -> None:
    data, ckpt = data_and_ckpt
    assert _module(ckpt, num_items=data.num_items).encoder.item_embedding.num_embeddings == data.num_items + 1
    with pytest.raises(CheckpointError, match="trained on 200 items, the data has 201"):
        _module(ckpt, num_items=data.num_items + 1)


class _ModeSpy(L.Callback):
    def __init__(self) -> None:
        self.encoder_training: list[bool] = []
        self.ram_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.encoder_training.append(pl_module.encoder.training)
        self.ram_training.append(pl_module.ram.training)


def test_raft_epoch_trains_only_ram(data_and_ckpt) -> None:
    data, ckpt = data_and_ckpt
    dm = _dm(data)
    module = _module(ckpt)
    encoder_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    ram_before = {k: v.clone() for k, v in module.ram.state_dict().items()}
    spy = _ModeSpy()
    _trainer(callbacks=[spy], limit_train_batches=4).fit(module, datamodule=dm)
    assert spy.encoder_training == [False] * 4 and spy.ram_training == [True] * 4
    for name, tensor in module.encoder.state_dict().items():
        assert torch.equal(tensor, encoder_before[name]), f"frozen encoder tensor {name} changed"
    assert not any(p.requires_grad for p in module.encoder.parameters())
    changed = [n for n, t in module.ram.state_dict().items() if not torch.equal(t, ram_before[n])]
    assert len(changed) > 10  # the RAM did learn
    # the reused bank h equals a fresh encoder pass (what bank.reuse_h relies on)
    batch = dm.dataset("train").__getitems__(list(range(100)))
    with torch.no_grad():
        direct = module.encoder(batch["input_ids"])
    module.train()  # whoever switches the module to training mode, the encoder's dropout stays off
    assert module.ram.training and not module.encoder.training
    assert not any(m.training for m in module.encoder.modules())
    torch.testing.assert_close(module.retriever.stored_h(module.retriever.bank_rows(batch), "cpu"), direct, atol=1e-5, rtol=1e-5)


def test_callback_rebuilds_exactly_when_the_reference_set_changes(data_and_ckpt) -> None:
    data, ckpt = data_and_ckpt
    dm = _dm(data)
    module = _module(ckpt)
    trainer = _trainer()
    trainer.fit(module, datamodule=dm)
    callback = module.bank_callback
    assert isinstance(callback, MemoryBankCallback) and callback in trainer.callbacks
    assert callback.num_builds == 1  # fit start; validation uses the same reference set
    assert len(module.retriever.bank) == len(dm.pairs("train"))
    trainer.test(module, datamodule=dm)
    assert callback.num_builds == 2  # test adds the validation pairs
    assert len(module.retriever.bank) == len(dm.pairs("train")) + len(dm.pairs("val"))
    assert module.retriever.bank.reference_version == dm.reference_version("test")
    trainer.test(module, datamodule=dm)
    assert callback.num_builds == 2  # nothing changed: no rebuild
    trainer.validate(module, datamodule=dm)
    assert callback.num_builds == 3  # back to the training pairs: validation must not see its own pairs
    assert len(module.retriever.bank) == len(dm.pairs("train"))
    trainer.validate(module, datamodule=dm)
    assert callback.num_builds == 3
    users = [str(u) for u in range(5)]
    dm.append_interactions(pl.DataFrame({"user": users, "item": ["1", "2", "3", "4", "5"], "order": [10**6] * 5}))
    trainer.validate(module, datamodule=dm)
    assert callback.num_builds == 4  # new data: new reference set, same frozen encoder
    assert len(module.retriever.bank) == len(dm.pairs("train"))
    trainer.predict(module, datamodule=dm)
    assert callback.num_builds == 5 and len(module.retriever.bank) == sum(
        len(dm.pairs(s)) for s in ("train", "val", "test"))
    assert [stage for stage, _, _ in callback.history] == ["fit", "test", "fit", "fit", "predict"]


def test_callback_rebuilds_when_the_encoder_changes(data_and_ckpt) -> None:
    data, ckpt = data_and_ckpt
    dm = _dm(data)
    module = _module(ckpt)
    trainer = _trainer(limit_train_batches=1)
    trainer.test(module, datamodule=dm)
    with torch.no_grad():
        module.encoder.item_embedding.weight.mul_(2.0)
    trainer.test(module, datamodule=dm)
    assert module.bank_callback.num_builds == 2


def test_callback_save_dir_reuses_matching_banks_only(data_and_ckpt, tmp_path: Path) -> None:
    data, ckpt = data_and_ckpt
    dm = _dm(data)
    _trainer_run = lambda m: _trainer().validate(m, datamodule=dm)  # noqa: E731
    first = _module(ckpt, save_dir=str(tmp_path))
    _trainer_run(first)
    assert first.bank_callback.num_builds == 1
    assert (tmp_path / dm.reference_version("fit") / "manifest.json").is_file()
    second = _module(ckpt, save_dir=str(tmp_path))
    _trainer_run(second)
    assert second.bank_callback.num_builds == 0 and second.bank_callback.num_loads == 1
    b = dm.pairs("val")
    r1, m1 = first.retriever.bank.search(first.retriever.bank.h[:50], b.user[:50], b.end[:50], 5)
    r2, m2 = second.retriever.bank.search(second.retriever.bank.h[:50], b.user[:50], b.end[:50], 5)
    assert torch.equal(r1, r2) and torch.equal(m1, m2)
    # another encoder: the saved bank is stale, detected and rebuilt (never used)
    other = tmp_path / "other.pt"
    save_encoder(tiny_encoder(data.num_items, seed=5), other)
    third = _module(other, save_dir=str(tmp_path))
    _trainer_run(third)
    assert third.bank_callback.num_builds == 1 and third.bank_callback.num_loads == 0
    with pytest.raises(CheckpointError, match="stale"):
        MemoryBank.load(tmp_path / dm.reference_version("fit"), expected_encoder=first.encoder)
    # the same encoder and data but another input window: other prefixes, so another bank
    short = _dm(data, max_len=5)
    assert short.reference_version("fit") != dm.reference_version("fit")
    fourth = _module(ckpt, save_dir=str(tmp_path))
    _trainer().validate(fourth, datamodule=short)
    assert fourth.bank_callback.num_builds == 1 and fourth.bank_callback.num_loads == 0


# ----------------------------------------------------------------------------- CLI on Beauty
@pytest.fixture(scope="module")
def beauty_encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(BEAUTY)
    path = tmp_path_factory.mktemp("beauty_enc") / "encoder.pt"
    save_encoder(tiny_encoder(12_101), path, {"num_items": 12_101})
    return path


def _overrides(tmp: Path, ckpt: Path) -> list[str]:
    return ["--model.init_args.encoder_checkpoint", str(ckpt),
            "--trainer.logger.init_args.save_dir", str(tmp / "logs"), "--trainer.default_root_dir", str(tmp),
            "--checkpoint.dirpath", str(tmp / "ckpt"), "--data.cache_dir", str(tmp / "cache"),
            "--trainer.enable_progress_bar", "false"]


def test_cli_fit_test_predict(beauty_encoder_ckpt: Path, tmp_path: Path) -> None:
    cfg = ["--config", str(CONFIGS / "beauty_raft.yaml"), "--config", str(CONFIGS / "debug.yaml")]
    result = tmp_path / "raft.json"
    rc = main(["fit", *cfg, *_overrides(tmp_path, beauty_encoder_ckpt), "--results.path", str(result),
               "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
               "--trainer.limit_test_batches", "2"])
    assert rc == 0
    metrics = json.loads(result.read_text())["metrics"]
    assert 0.0 <= metrics["test/NDCG@10"] <= metrics["test/HR@10"] <= 1.0
    best = tmp_path / "ckpt" / "best.ckpt"
    blob = torch.load(best, map_location="cpu", weights_only=True)
    assert RECORD_KEY in blob and not any("faiss" in k or "memory_bank" in k for k in blob["state_dict"])
    hp = blob["hyper_parameters"]  # typed configs are stored as plain dicts (weights-only loading)
    assert type(hp["bank"]) is dict and hp["bank"]["k"] == 20 and hp["ram"]["alpha"] == 0.5
    assert hp["num_items"] == 12_101
    # test and predict from the RAFT checkpoint: the bank is rebuilt first
    rc = main(["test", *cfg, *_overrides(tmp_path, beauty_encoder_ckpt), "--ckpt_path", str(best),
               "--results.path", str(tmp_path / "again.json"), "--trainer.limit_test_batches", "2"])
    assert rc == 0
    assert json.loads((tmp_path / "again.json").read_text())["metrics"]["test/HR@50"] == metrics["test/HR@50"]
    out = tmp_path / "top.csv"
    rc = main(["predict", *cfg, *_overrides(tmp_path, beauty_encoder_ckpt), "--ckpt_path", str(best),
               "--predict_output", str(out), "--trainer.limit_predict_batches", "2"])
    assert rc == 0
    top = pl.read_csv(out)
    assert top.height == 2048 and top.columns[:2] == ["user", "rank_1"]
    # a RAFT checkpoint is itself a valid encoder checkpoint with the frozen weights
    encoder, _ = load_encoder(best)
    original, _ = load_encoder(beauty_encoder_ckpt)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, encoder.state_dict()[name]), name
    # a moved run directory: the encoder comes from the checkpoint itself, not the recorded path
    moved = tmp_path / "moved" / "best.ckpt"
    moved.parent.mkdir()
    best.rename(moved)
    overrides = _overrides(tmp_path, tmp_path / "gone" / "encoder.pt")
    rc = main(["test", *cfg, *overrides, "--ckpt_path", str(moved), "--results.path", str(tmp_path / "moved.json"),
               "--trainer.limit_test_batches", "2"])
    assert rc == 0
    assert json.loads((tmp_path / "moved.json").read_text())["metrics"]["test/HR@50"] == metrics["test/HR@50"]


def test_cli_refuses_a_checkpoint_of_another_model_class(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         beauty_encoder_ckpt: Path) -> None:
    """The checkpoint's saved class must not silently replace the config's (issue 13, route 3)."""
    raft = RAFTModule(num_items=12_101, encoder_checkpoint=str(beauty_encoder_ckpt))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(raft)
    ckpt = tmp_path / "raft.ckpt"
    trainer.save_checkpoint(ckpt)
    rc = main(["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--ckpt_path", str(ckpt)])
    assert rc == 2 and "its hyper-parameters do not fit the config's model" in capsys.readouterr().err
    raft.hparams["_class_path"] = "raserec.finetune.module.RAFTModule"  # what LightningCLI records
    trainer.save_checkpoint(ckpt)
    rc = main(["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a RAFTModule checkpoint, but the config runs PretrainModule" in err
    assert err.count("\n") == 1
    rc = main(["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert rc == 2 and "no such checkpoint file" in capsys.readouterr().err


def test_cli_wrong_item_count_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    require(BEAUTY)
    ckpt = tmp_path / "small.pt"
    save_encoder(tiny_encoder(50), ckpt)
    cfg = ["--config", str(CONFIGS / "beauty_raft.yaml"), "--config", str(CONFIGS / "debug.yaml")]
    try:
        rc = main(["fit", *cfg, *_overrides(tmp_path, ckpt)])
    except ValueError as exc:  # jsonargparse wraps errors raised while instantiating the model
        message = str(exc)
    else:
        assert rc == 2
        message = capsys.readouterr().err
    assert "trained on 50 items, the data has 12101" in message


def test_raft_configs_hold_the_paper_settings() -> None:
    for name, data in (("beauty", "Beauty.txt"), ("sports", "Sports_and_Outdoors.txt"),
                       ("clothing", "Clothing_Shoes_and_Jewelry.txt")):
        cfg = yaml.safe_load((CONFIGS / f"{name}_raft.yaml").read_text())
        args = cfg["model"]["init_args"]
        assert cfg["model"]["class_path"] == "raserec.finetune.module.RAFTModule"
        assert args["encoder_checkpoint"] == f"runs/{name}_pretrain/checkpoints/best.ckpt"
        bank, ram = args["bank"], args["ram"]
        assert (bank["k"], ram["alpha"], ram["beta"], bank["nlist"], bank["nprobe"]) == (20, 0.5, 1.0, 128, 1)
        assert args["lr"] == 0.001 and ram["dropout"] == 0.5 and bank["index"] == "ivf_flat"
        assert cfg["data"]["batch_size"] == 1024 and cfg["trainer"]["max_epochs"] == 100
        assert cfg["early_stopping"]["patience"] == 10 and cfg["data"]["data_path"].endswith(data)
        assert cfg["results"]["path"] == f"results/{name}_raft.json"
        assert cfg["trainer"]["logger"]["init_args"]["name"] == f"{name}_raft"


# ----------------------------------------------------------------------------- precomputed retrieval
def test_precomputed_retrieval_equals_per_batch_search_on_real_data(beauty_slice: Path) -> None:
    """The memories of every training query, searched once per bank build, are the rows a
    per-batch search returns; and fitting with or without the precomputation gives the same RAM
    and the same test metrics for a fixed seed (real Beauty slice, random-init encoder)."""
    dm = SequenceDataModule(beauty_slice, cache_dir=None, batch_size=256, eval_batch_size=512)
    dm.setup("fit")
    ckpt = beauty_slice.parent / "slice_encoder.pt"
    save_encoder(tiny_encoder(dm.data.num_items), ckpt, {"num_items": dm.data.num_items,
                                                         "content_hash": dm.data.content_hash()})
    module = _module(ckpt)
    _attach_bank(module, dm)
    bank = module.retriever.bank
    assert len(bank) > 5000
    rows, mask = bank.self_neighbours(20)
    pairs = dm.pairs("train")
    for start in range(0, len(pairs.user), 1024):
        sl = slice(start, start + 1024)
        r, m = bank.search(bank.h[sl], pairs.user[sl], pairs.end[sl], 20)
        assert np.array_equal(r.numpy(), rows[sl]) and np.array_equal(m.numpy(), mask[sl])
    assert mask.sum() > 0.9 * mask.size
    bank.set_nprobe(4)  # another answer: the cache must not be reused
    assert not bank._self_neighbours

    outcomes = []
    for precompute in (True, False):
        L.seed_everything(7)
        module = _module(ckpt, precompute=precompute)
        trainer = _trainer(max_epochs=2, limit_train_batches=None, limit_val_batches=None, limit_test_batches=None)
        trainer.fit(module, datamodule=dm)
        metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
        outcomes.append((module.ram.state_dict(), metrics))
    (ram_a, metrics_a), (ram_b, metrics_b) = outcomes
    for name, tensor in ram_a.items():
        assert torch.equal(tensor, ram_b[name]), name
    for key, value in metrics_a.items():
        assert value == metrics_b[key], key


def test_ram_block_round_trips_and_a_mismatching_block_is_refused(data_and_ckpt, tmp_path) -> None:
    """The typed RAM settings travel as a plain dict in the checkpoint and rebuild the same block;
    RAM weights of the other block are refused with a clear error."""
    _, ckpt = data_and_ckpt
    old = _module(ckpt, residual=True, init_std=0.02)
    assert old.hparams["ram"]["residual"] is True and old.hparams["bank"]["nlist"] == 16
    path = tmp_path / "raft.ckpt"
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": dict(old.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    back = RAFTModule.load_from_checkpoint(path, encoder_checkpoint=str(ckpt), weights_only=True)
    assert back.ram.residual and back.retriever.config == old.retriever.config
    for name, tensor in old.ram.state_dict().items():
        assert torch.equal(tensor, back.ram.state_dict()[name])
    checkpoint = {"state_dict": old.state_dict(), "hyper_parameters": dict(old.hparams)}
    with pytest.raises(CheckpointError, match="does not match ram.residual=False"):
        _module(ckpt).on_load_checkpoint(checkpoint)


def test_an_encoder_of_other_data_is_refused_unless_allowed(data_and_ckpt) -> None:
    """Same item count, other interactions: item ids would silently mean other items. Data grown
    by append_interactions from the encoder's own data is accepted."""
    data, ckpt = data_and_ckpt
    other = synthetic_data(num_users=600, seed=9)
    assert other.num_items == data.num_items and other.content_hash() != data.content_hash()
    with pytest.raises(CheckpointError, match="pre-trained on other data"):
        _trainer().validate(_module(ckpt), datamodule=_dm(other))
    _trainer().validate(_module(ckpt, allow_other_data=True), datamodule=_dm(other))
    dm = _dm(data)
    dm.append_interactions(pl.DataFrame({"user": ["0", "1"], "item": ["3", "4"], "order": [10**6] * 2}))
    _trainer().validate(_module(ckpt), datamodule=dm)


def test_non_finite_loss_stops_with_the_step_and_k_above_the_bank_warns(data_and_ckpt, caplog) -> None:
    from raserec.errors import TrainingError

    _, ckpt = data_and_ckpt
    module = _module(ckpt, k=50)
    with pytest.raises(TrainingError, match="loss became nan at epoch 0, step 0"):
        module.on_before_backward(torch.tensor(float("nan")))
    module.on_before_backward(torch.tensor(1.5))  # finite: nothing happens
    rng = np.random.default_rng(0)
    module.retriever.bank = MemoryBank.from_arrays(rng.normal(size=(30, 16)).astype(np.float32), np.arange(30),
                                                np.full(30, 3), rng.integers(1, 50, 30))
    h = torch.randn(4, 16)
    with caplog.at_level("WARNING", logger="raserec.memory.retriever"):
        module.eval()
        module.augment(h, torch.tensor([100, 101, 102, 103]), torch.tensor([5, 5, 5, 5]))
        module.augment(h, torch.tensor([100, 101, 102, 103]), torch.tensor([5, 5, 5, 5]))
    warnings = [r for r in caplog.records if "holds only 30 entries" in r.getMessage()]
    assert len(warnings) == 1 and "k = 50" in warnings[0].getMessage()


def test_bf16_mixed_raft_trains_the_ram_and_keeps_keys_float32(data_and_ckpt) -> None:
    """Under ``trainer.precision: bf16-mixed`` the RAM trains, queries are encoded in float32
    (what the float32 bank holds), and evaluation equals a float32 evaluation."""
    data, ckpt = data_and_ckpt
    dm = _dm(data)
    module = _module(ckpt)
    ram_before = {k: v.clone() for k, v in module.ram.state_dict().items()}
    _trainer(precision="bf16-mixed", limit_train_batches=4).fit(module, datamodule=dm)
    assert any(not torch.equal(v, ram_before[k]) for k, v in module.ram.state_dict().items())
    ids = _batch(dm, "val", 32)["input_ids"]
    plain = module.retriever.encode(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.retriever.encode(ids)
        with torch.no_grad():  # autocast does reach the encoder's products when nothing opts out
            assert not torch.equal(module.encoder(ids), plain)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
    bf16 = _trainer(precision="bf16-mixed").validate(module, datamodule=dm, verbose=False)[0]
    fp32 = _trainer().validate(module, datamodule=dm, verbose=False)[0]
    assert bf16 == fp32


@pytest.mark.parametrize("index", ["flat", "ivf_flat"])
def test_raft_test_metrics_do_not_depend_on_eval_batch_size(data_and_ckpt, index: str) -> None:
    """RecBole #1556: the same model and bank rank every test query the same whatever the eval batch
    size (7: faiss's per-query path and a ragged last batch; 128: its BLAS path), and the logged
    metrics are those of the per-query ranks (every query counted once). The packed encoder's
    float sums depend on how a batch buckets its rows (about 1e-8 here), so an exact score tie
    may break the other way: at most a few queries move, by one rank."""
    from raserec.evaluation.per_query import metrics_from_ranks, module_scores, query_ranks

    data, ckpt = data_and_ckpt
    module = _module(ckpt, index=index, nprobe=2)
    torch.manual_seed(0)
    with torch.no_grad():  # a RAM that is not the identity, so the memories matter
        for p in module.ram.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logged, ranks = [], []
    for eval_batch_size in (128, 7):
        dm = synthetic_dm(data, batch_size=64, eval_batch_size=eval_batch_size)
        logged.append(_trainer(limit_test_batches=None).test(module, datamodule=dm, verbose=False)[0])
        ranks.append(query_ranks(module_scores(module), dm.dataset("test"), batch_size=eval_batch_size))
    moved = ranks[0] != ranks[1]
    assert moved.sum() <= 3 and (np.abs(ranks[0] - ranks[1])[moved] <= 1).all()
    for metrics, r in zip(logged, ranks, strict=True):
        expected = metrics_from_ranks(r)
        assert set(expected) <= {k.removeprefix("test/") for k in metrics}
        for key, value in expected.items():
            assert metrics[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert logged[0]["test/NDCG@10"] > 0
