"""Other backbones (paper table 3): GRU4Rec and BERT4Rec behind the SequenceEncoder interface,
their padding and direction semantics, BERT4Rec's cloze objective, checkpoints, and both
training stages (pre-training and RAFT) run unchanged on them."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch

from raserec.checkpoint import load_encoder, save_encoder
from raserec.errors import CheckpointError
from raserec.finetune.module import RAFTModule
from raserec.models.encoders import BERT4Rec, GRU4Rec, SASRec, SequenceEncoder
from raserec.pretrain.module import PretrainModule
from tests.test_memory_bank import synthetic_data, synthetic_dm

N_ITEMS = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(b: int = 8, t: int = 12, n: int = N_ITEMS, seed: int = 0) -> torch.Tensor:
    """Left-padded random sequences of lengths 1..t (at least one row full)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, n + 1, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    ids[torch.arange(t)[None, :] < (t - lengths)[:, None]] = 0
    return ids


def _gru(**kwargs) -> GRU4Rec:
    torch.manual_seed(0)
    return GRU4Rec(N_ITEMS, **{"hidden_size": 16, "gru_size": 24, **kwargs}).eval()


def _bert(**kwargs) -> BERT4Rec:
    torch.manual_seed(0)
    return BERT4Rec(N_ITEMS, **{"hidden_size": 16, "max_len": 16, "inner_size": 32, **kwargs}).eval()


BACKBONES = {"gru4rec": _gru, "bert4rec": _bert}


# ----------------------------------------------------------------------------- shared semantics
@pytest.mark.parametrize("name", BACKBONES)
def test_shapes_and_interface(name: str) -> None:
    model = BACKBONES[name]()
    assert isinstance(model, SequenceEncoder)
    assert model.item_embedding.weight.shape == (N_ITEMS + 1, 16) and model.hidden_size == 16
    h = model(_ids())
    assert h.shape == (8, 16) and torch.isfinite(h).all()
    assert model.item_weights().shape == (N_ITEMS, 16)
    assert model.score(h).shape == (8, N_ITEMS)
    assert model.class_path.endswith(type(model).__name__)


@pytest.mark.parametrize("name", BACKBONES)
def test_leading_padding_changes_nothing(name: str) -> None:
    model = BACKBONES[name]()
    ids = _ids()
    base = model(ids)
    wider = torch.cat([torch.zeros(8, 3, dtype=torch.long), ids], 1)
    torch.testing.assert_close(model(wider), base, atol=1e-6, rtol=1e-5)
    # a row alone, with exactly its own length, gives the same representation as in the batch
    for row in range(8):
        seq = ids[row][ids[row] > 0].unsqueeze(0)
        torch.testing.assert_close(model(seq)[0], base[row], atol=1e-6, rtol=1e-5)
    # the embedding override with the table's own rows (garbage at padding) is the same computation
    emb = model.item_embedding(ids)
    emb[ids == 0] = 7.0
    torch.testing.assert_close(model(ids, item_embeddings=emb), base, atol=1e-6, rtol=1e-5)
    # ...and a different embedding of a real item changes the output
    emb[:, -1] += torch.randn(16)  # not a constant shift, which a LayerNorm would remove
    assert not torch.allclose(model(ids, item_embeddings=emb), base, atol=1e-4)


@pytest.mark.parametrize("name", BACKBONES)
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    model = BACKBONES[name](num_layers=2, dropout=0.3)
    path = save_encoder(model, tmp_path / f"{name}.pt", {"num_items": N_ITEMS})
    loaded, fingerprint = load_encoder(path)
    assert type(loaded) is type(model) and loaded.init_args == model.init_args
    assert fingerprint == {"num_items": N_ITEMS}
    ids = _ids(seed=3)
    torch.testing.assert_close(loaded.eval()(ids), model(ids), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("name", BACKBONES)
def test_an_encoder_record_names_every_constructor_argument(name: str) -> None:
    """BERT4Rec forwards the Transformer arguments as **kwargs: its record must still hold all of
    them, defaults included, so a record rebuilds the same model if a default changes later."""
    model = BACKBONES[name](num_layers=1)
    wanted = set()
    for cls in type(model).__mro__:
        if "__init__" in vars(cls) and issubclass(cls, torch.nn.Module) and cls.__module__.startswith("raserec"):
            wanted |= {k for k, p in inspect.signature(cls.__init__).parameters.items()
                       if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    assert set(model.init_args) == wanted
    assert model.init_args["num_layers"] == 1 and "kwargs" not in model.init_args
    if name == "bert4rec":
        assert {"mask_ratio", "ft_ratio", "hidden_size", "layer_norm_eps"} <= wanted
        assert next(iter(model.state_dict())) == "mask_token"  # the order of earlier records and optimiser states


class _SmallSASRec(SASRec):
    """A third-party encoder with a narrower signature than the trunk it builds on."""

    def __init__(self, num_items: int, hidden_size: int = 8) -> None:
        super().__init__(num_items, hidden_size=hidden_size, max_len=6, inner_size=16)


class _ForgetfulSASRec(SASRec):
    """Adds an argument but never records it."""

    def __init__(self, num_items: int, extra: int = 3, **kwargs) -> None:
        super().__init__(num_items, **kwargs)


def test_subclass_records_rebuild_or_refuse_to_save(tmp_path: Path) -> None:
    small = _SmallSASRec(N_ITEMS, hidden_size=12)
    assert small.init_args == {"num_items": N_ITEMS, "hidden_size": 12}  # what its own __init__ accepts
    rebuilt = type(small)(**small.init_args)
    assert rebuilt.max_len == 6 and rebuilt.hidden_size == 12
    forgetful = _ForgetfulSASRec(N_ITEMS, extra=5, hidden_size=8)
    assert forgetful.unrecorded_init_args() == ["extra"]
    with pytest.raises(CheckpointError, match=r"did not record its constructor argument\(s\) \['extra'\]"):
        save_encoder(forgetful, tmp_path / "f.pt")
    assert not (tmp_path / "f.pt").exists()


def test_modules_checkpoint_every_shared_setting_even_when_left_at_default(tmp_path: Path) -> None:
    """Pre-training and RAFT forward lr, weight_decay and the evaluation settings as **kwargs;
    their hparams (what load_from_checkpoint rebuilds from) must still hold all five."""
    shared = {"lr": 1e-3, "weight_decay": 0.0, "metric_ks": (5, 10, 20, 50), "mask_history": False,
              "predict_top_n": 10}
    pre = PretrainModule(N_ITEMS, lambda n: SASRec(n, hidden_size=8, max_len=6, inner_size=16))
    assert {k: pre.hparams[k] for k in shared} == shared
    path = save_encoder(SASRec(N_ITEMS, hidden_size=8, max_len=6, inner_size=16), tmp_path / "e.pt",
                        {"num_items": N_ITEMS})
    raft = RAFTModule(N_ITEMS, encoder_checkpoint=str(path), lr=0.01)
    assert {k: raft.hparams[k] for k in shared} == {**shared, "lr": 0.01}
    assert raft.configure_optimizers().param_groups[0]["params"] == list(raft.ram.parameters())


# ----------------------------------------------------------------------------- GRU4Rec
def test_gru4rec_is_causal_and_depends_only_on_the_sequence() -> None:
    model = _gru()
    ids = _ids()
    base = model(ids)
    # an older item matters (the state carries it), in every row longer than one item
    older = ids.clone()
    long_rows = (ids > 0).sum(1) >= 3
    older[long_rows, -3] = older[long_rows, -3] % N_ITEMS + 1
    moved = (model(older) - base).abs().amax(1)
    assert bool((moved[long_rows] > 1e-4).all()) and bool((moved[~long_rows] == 0).all())
    # the order matters (a recurrent model, not a bag of items)
    flipped = ids.clone()
    flipped[0] = ids[0].flip(0)
    assert not torch.allclose(model(flipped)[0], base[0], atol=1e-4)
    # batch composition does not matter: each row's output is a function of that row only
    torch.testing.assert_close(model(ids[[3, 0, 5]]), base[[3, 0, 5]], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(2, 4, dtype=torch.long))


def test_gru4rec_recbole_layout() -> None:
    model = GRU4Rec(100)
    assert model.gru.hidden_size == 128 and model.gru.num_layers == 1 and not model.gru.bias
    assert model.dense.in_features == 128 and model.dense.out_features == 64
    assert model.input_dropout.p == 0.5
    assert torch.equal(model.item_embedding.weight[0], torch.zeros(64))


# ----------------------------------------------------------------------------- BERT4Rec
def test_bert4rec_is_bidirectional() -> None:
    model = _bert()
    ids = torch.randint(1, N_ITEMS + 1, (4, 10), generator=torch.Generator().manual_seed(1))
    hidden = model.hidden_states(ids)
    first, last = ids.clone(), ids.clone()
    first[:, 0] = first[:, 0] % N_ITEMS + 1
    last[:, -1] = last[:, -1] % N_ITEMS + 1
    assert ((model.hidden_states(first)[:, 1:] - hidden[:, 1:]).abs().amax(-1) > 1e-4).all()  # later positions
    assert ((model.hidden_states(last)[:, :-1] - hidden[:, :-1]).abs().amax(-1) > 1e-4).all()  # earlier positions
    # contrast: SASRec's causal attention leaves earlier positions untouched
    sasrec = SASRec(N_ITEMS, hidden_size=16, max_len=16, inner_size=32).eval()
    torch.testing.assert_close(sasrec.hidden_states(last)[:, :-1], sasrec.hidden_states(ids)[:, :-1])


def test_bert4rec_forward_appends_mask_and_drops_the_oldest_item_at_max_len() -> None:
    model = _bert(max_len=8)
    ids = torch.randint(1, N_ITEMS + 1, (3, 8), generator=torch.Generator().manual_seed(2))
    # the representation is the hidden state of [mask] after the most recent item
    expected = model.hidden_states(torch.cat([ids[:, 1:], torch.ones(3, 1, dtype=torch.long)], 1),
                                   torch.tensor([[False] * 7 + [True]] * 3))[:, -1]
    torch.testing.assert_close(model(ids), expected)
    # a full-length input loses only its oldest item to the [mask] slot
    oldest, second = ids.clone(), ids.clone()
    oldest[:, 0] = oldest[:, 0] % N_ITEMS + 1
    second[:, 1] = second[:, 1] % N_ITEMS + 1
    torch.testing.assert_close(model(oldest), model(ids))
    assert not torch.allclose(model(second), model(ids), atol=1e-4)
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.ones(2, 9, dtype=torch.long))
    # the [mask] vector is not an item: the output table is still num_items + 1 rows
    assert model.mask_token.shape == (16,)


def test_cloze_masking_statistics_and_input_untouched() -> None:
    model = _bert(max_len=50, mask_ratio=0.2)
    ids = _ids(b=4000, t=50, seed=4)
    before = ids.clone()
    masked = model.cloze_mask(ids, torch.Generator().manual_seed(0))
    real = ids > 0
    assert not (masked & ~real).any()  # only real items are masked
    assert masked.any(1).all()  # at least one per row
    # on long rows the forced extra mask is negligible: the fraction is mask_ratio
    long_rows = real.sum(1) >= 30
    frac = masked[long_rows].sum() / real[long_rows].sum()
    assert abs(frac.item() - 0.2) < 0.01, frac
    # short rows always get their one masked item
    one = real.sum(1) == 1
    assert torch.equal(masked[one], real[one])
    g = torch.Generator().manual_seed(1)
    small = ids[:64]  # a view: writing to it would show in ids
    loss = model.train().cloze_loss(small, torch.randint(1, N_ITEMS + 1, (64,)), generator=g)
    assert torch.isfinite(loss) and torch.equal(ids, before)  # the input is copied, never masked in place
    # deterministic given the generator
    again = model.cloze_mask(ids, torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)


def test_cloze_ft_ratio_masks_only_the_most_recent_item() -> None:
    model = _bert(max_len=50, mask_ratio=0.2, ft_ratio=0.5)
    ids = _ids(b=2000, t=50, seed=5)
    masked = model.cloze_mask(ids, torch.Generator().manual_seed(0))
    only_last = masked[:, -1] & (masked.sum(1) == 1)
    assert 0.45 < only_last.float().mean().item() < 0.6  # ft rows + rows where chance masked only the last


def test_cloze_appends_the_target_within_max_len() -> None:
    model = _bert(max_len=6, mask_ratio=1.0)  # everything masked: the labels are the whole sequence
    ids = torch.tensor([[0, 0, 0, 0, 1, 2], [3, 4, 5, 6, 7, 8]])
    target = torch.tensor([9, 10])
    # with all positions masked the loss is the mean CE over [1, 2, 9] and [4, 5, 6, 7, 8, 10]
    seq = torch.tensor([[0, 0, 0, 1, 2, 9], [4, 5, 6, 7, 8, 10]])
    h = model.hidden_states(seq, seq > 0)[seq > 0]
    expected = torch.nn.functional.cross_entropy(h @ model.item_weights().T, seq[seq > 0] - 1)
    torch.testing.assert_close(model.cloze_loss(ids, target), expected)


def test_cloze_loss_decreases() -> None:
    """30 Adam steps on a tiny structured dataset (item i is followed by i + 1)."""
    torch.manual_seed(0)
    model = BERT4Rec(30, hidden_size=32, max_len=10, num_layers=1, inner_size=64, dropout=0.1, attn_dropout=0.1)
    start = torch.randint(1, 31, (64, 1))
    ids = (start + torch.arange(10)) % 30 + 1
    ids[::3, :4] = 0  # some left padding
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss = model.cloze_loss(ids, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses  # from ln(30) ~ 3.4 to ~ 2.8


# ----------------------------------------------------------------------------- both stages
ENCODERS = {
    "gru4rec": lambda n: GRU4Rec(n, hidden_size=16, gru_size=16),
    "bert4rec": lambda n: BERT4Rec(n, hidden_size=16, max_len=20, num_layers=1, inner_size=32),
}


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, accelerator="cpu", devices=1)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def small_data():
    return synthetic_data(num_users=200, num_items=60, max_length=25)


@pytest.mark.parametrize("pair", ["none", "dropout_and_same_target"])
@pytest.mark.parametrize("name", ENCODERS)
def test_pretrain_and_raft_run_on_the_backbone(name: str, pair: str, small_data, tmp_path: Path) -> None:
    dm = synthetic_dm(small_data, max_len=20, batch_size=32, eval_batch_size=128)
    module = PretrainModule(dm.num_items, encoder=ENCODERS[name], positive_pair=pair)
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    trainer = _trainer()
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/HR@10"]) <= 1.0 and "val/NDCG@10" in metrics
    assert torch.isfinite(metrics["train/loss"])
    if pair != "none":
        assert "train/loss_ret" in metrics
    changed = [k for k, v in module.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert "item_embedding.weight" in changed and len(changed) > 3
    if pair == "none":
        return
    # stage 2 on the pre-trained backbone: the self-describing checkpoint is all RAFT needs
    path = save_encoder(module.encoder, tmp_path / "enc.pt", {"num_items": dm.num_items,
                                                               "content_hash": dm.data.content_hash()})
    raft = RAFTModule(dm.num_items, encoder_checkpoint=str(path), bank={"k": 5, "index": "flat"},
                      ram={"dropout": 0.1})
    assert type(raft.encoder) is type(module.encoder)
    raft_trainer = _trainer(limit_train_batches=2)
    raft_trainer.fit(raft, datamodule=dm)
    assert 0.0 <= float(raft_trainer.callback_metrics["val/HR@10"]) <= 1.0


@pytest.mark.parametrize("pair", ["none", "dropout_and_same_target"])
def test_pretrain_with_the_cloze_objective(pair: str, small_data) -> None:
    if "objective" not in inspect.signature(PretrainModule).parameters:
        pytest.skip("PretrainModule has no `objective` argument yet")
    dm = synthetic_dm(small_data, max_len=20, batch_size=32, eval_batch_size=128)
    module = PretrainModule(dm.num_items, encoder=ENCODERS["bert4rec"], positive_pair=pair, objective="cloze")
    calls: list[tuple[int, int]] = []
    cloze = module.encoder.cloze_loss
    module.encoder.cloze_loss = lambda ids, *a, **k: (calls.append(tuple(ids.shape)), cloze(ids, *a, **k))[1]
    trainer = _trainer()
    trainer.fit(module, datamodule=dm)
    assert calls == [(32, 20)] * 3  # L_rec is the cloze loss of every training batch
    assert 0.0 <= float(trainer.callback_metrics["val/HR@10"]) <= 1.0
    assert (pair == "none") != ("train/loss_ret" in trainer.callback_metrics)
    with pytest.raises(ValueError, match="cloze_loss"):
        PretrainModule(dm.num_items, encoder=ENCODERS["gru4rec"], objective="cloze")
