"""SASRec encoder and the pre-training losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raserec.models.encoders import SASRec
from raserec.models.layers import FastDropout, PackedLayout, keep_mask
from raserec.models.losses import info_nce, next_item_loss


def _ids(b: int = 8, t: int = 12, n: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, n + 1, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    ids[torch.arange(t)[None, :] < (t - lengths)[:, None]] = 0
    return ids


def test_packed_forward_equals_dense() -> None:
    torch.manual_seed(0)
    for layers in (1, 2, 3):
        model = SASRec(50, hidden_size=16, max_len=12, num_layers=layers, inner_size=32).eval()
        ids = _ids()
        assert torch.allclose(model(ids), model.dense_forward(ids), atol=1e-5)


def _lengths_ids(lengths: list[int], t: int = 12, n: int = 50) -> torch.Tensor:
    ids = torch.randint(1, n + 1, (len(lengths), t), generator=torch.Generator().manual_seed(1))
    ids[torch.arange(t)[None, :] < (t - torch.tensor(lengths))[:, None]] = 0
    return ids


def _train_and_eval_passes(model: SASRec, ids: torch.Tensor, target: torch.Tensor) -> list:
    """(output, parameter gradients) of one CE step in training mode, then in eval mode."""
    passes = []
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        out = model(ids)
        next_item_loss(out, model.item_weights(), target).backward()
        passes.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    return passes


def test_length_buckets_are_views_or_grids_and_equal_dense(monkeypatch) -> None:
    # Rows are sorted by length; a bucket closes once it holds PACK_MIN_ROWS rows. A bucket of one
    # length is a view of the packed tokens (no grid, no mask); one of several lengths is a padded
    # grid. A batch of one length (how the memory bank encodes) is one bucket, rows unpermuted.
    uniform = _lengths_ids([5] * 6)
    mixed = _lengths_ids([7, 1, 4, 12, 3, 4, 1, 7])
    layout = PackedLayout.build(uniform, min_rows=2)
    assert layout.sorted_rows and len(layout.buckets) == 1 and layout.buckets[0].grid_pos is None
    layout = PackedLayout.build(mixed, min_rows=2)
    assert not layout.sorted_rows
    assert layout.order.tolist() == [1, 6, 4, 2, 5, 0, 7, 3]  # stable sort by length
    assert [(b.rows, b.width, b.tokens, b.grid_pos is None) for b in layout.buckets] == [
        (2, 1, 2, True), (3, 4, 11, False), (2, 7, 14, True), (1, 12, 12, True)]
    assert layout.last_token.tolist() == [0, 1, 4, 8, 12, 19, 26, 38]
    assert [len(b) for b in (PackedLayout.build(mixed, min_rows=1).buckets, PackedLayout.build(mixed).buckets)] \
        == [5, 1]  # one bucket per length; the default (64) gathers all 8 rows into one grid
    torch.manual_seed(0)
    model = SASRec(50, hidden_size=16, max_len=12, num_layers=2, inner_size=32, dropout=0.0, attn_dropout=1e-12)
    for min_rows in (1, 2, 3, 64):
        monkeypatch.setattr("raserec.models.layers.PACK_MIN_ROWS", min_rows)
        for ids in (uniform, mixed, _ids(b=300, seed=3)):
            target = torch.randint(1, 51, (len(ids),))
            (a, ga), (b, gb) = _train_and_eval_passes(model, ids, target)
            assert torch.allclose(a, model.dense_forward(ids).detach(), atol=1e-5)
            assert torch.allclose(a, b, atol=1e-5)
            # gradients are ~1e-4 here: compare them relatively
            assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-9) for x, y in zip(ga, gb, strict=True))
            # and the gradients of the dense reference (the last block projects queries only at
            # the last token; its query weights still get their gradient)
            model.zero_grad()
            next_item_loss(model.dense_forward(ids), model.item_weights(), target).backward()
            assert all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-9)
                       for p, g in zip(model.parameters(), gb, strict=True))


def test_item_embeddings_follow_their_rows_through_the_sort() -> None:
    # Adapters pass transformed history embeddings; the sort by length must carry them with their rows.
    torch.manual_seed(0)
    model = SASRec(50, hidden_size=16, max_len=12, num_layers=2, inner_size=32).eval()
    ids = _lengths_ids([7, 1, 4, 12, 3, 4, 1, 7])
    emb = model.item_embedding(ids) * 1.5
    out = model(ids, item_embeddings=emb)
    assert not torch.allclose(out, model(ids), atol=1e-3)
    for r in range(len(ids)):  # each row alone (a batch of one is never permuted)
        assert torch.allclose(out[r], model(ids[r:r + 1], item_embeddings=emb[r:r + 1])[0], atol=1e-5)


def test_output_ignores_padding_and_future() -> None:
    torch.manual_seed(0)
    model = SASRec(50, hidden_size=16, max_len=12).eval()
    ids = _ids()
    base = model(ids)
    # trimming leading padding columns or changing the width of padding changes nothing
    wider = torch.cat([torch.zeros(8, 0, dtype=torch.long), ids], 1)
    assert torch.allclose(model(wider), base, atol=1e-6)
    assert torch.allclose(model(ids[:, -6:][ids[:, -7] == 0]), base[ids[:, -7] == 0], atol=1e-6)
    # causal: the hidden state at position t does not change when later items change
    hidden = model.hidden_states(ids)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] % 50) + 1
    assert torch.allclose(model.hidden_states(changed)[:, :-1], hidden[:, :-1], atol=1e-6)
    assert not torch.isnan(hidden).any()


def test_sasrec_reference_settings() -> None:
    model = SASRec(12101)
    assert model.item_embedding.weight.shape == (12102, 64)
    assert model.position_embedding.weight.shape == (50, 64)
    assert len(model.blocks) == 2 and model.blocks[0].num_heads == 2
    assert model.blocks[0].ffn[0].out_features == 256
    assert model.input_norm.eps == 1e-12
    std = model.item_embedding.weight.std().item()
    assert abs(std - 0.02) < 0.002
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.ones(2, 51, dtype=torch.long))


@pytest.mark.parametrize("p", [0.5, 0.25, 0.2, 0.1777])
def test_fast_dropout_statistics(p: float) -> None:
    """Byte draws (p a multiple of 1/256) and float draws (other p) keep each element with
    probability 1 - p, independently, and scale by 1 / (1 - p)."""
    torch.manual_seed(0)
    drop = FastDropout(p).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    dropped = (y == 0).float()
    assert abs(dropped.mean().item() - p) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01 and torch.allclose(y[y > 0], torch.tensor(1 / (1 - p)))
    # independence: neighbouring elements (the bytes of one 64-bit draw) are uncorrelated
    a, b = dropped[:, :-1].flatten(), dropped[:, 1:].flatten()
    assert abs((a * b).mean().item() - p * p) < 0.005
    assert not torch.equal(drop(x), y)  # a fresh draw per call
    assert torch.equal(drop.eval()(x), x)
    # the same draw gives exactly x * keep_mask, in values and in gradients
    x = torch.randn(64, 8, requires_grad=True)
    torch.manual_seed(1)
    y = drop.train()(x)
    torch.manual_seed(1)
    keep = keep_mask(x.detach(), p)
    assert torch.equal(y, x * keep)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, keep)
    # odd sizes (not a multiple of 8) and other dtypes
    odd = keep_mask(torch.ones(3, 5, dtype=torch.float64), p)
    assert odd.shape == (3, 5) and odd.dtype == torch.float64


def test_next_item_loss_excludes_padding() -> None:
    h = torch.randn(4, 8)
    table = torch.randn(6, 8)  # rows 1..6
    target = torch.tensor([1, 6, 3, 2])
    expected = F.cross_entropy(h @ table.T, target - 1)
    assert torch.allclose(next_item_loss(h, table, target), expected)


@pytest.mark.parametrize("batch", [1, 31, 100])
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)])
def test_chunked_cross_entropy_equals_the_score_matrix_form(batch: int, grads: tuple[bool, bool]) -> None:
    # Loss and gradients of the row-block CE (grads taken in the forward pass) against F.cross_entropy
    # over the materialised scores; large scores check the log-sum-exp's stability.
    g = torch.Generator().manual_seed(batch)
    h = (torch.randn(batch, 16, generator=g) * 4).requires_grad_(grads[0])
    table = (torch.randn(301, 16, generator=g) * 4).requires_grad_(grads[1])
    target = torch.randint(1, 301, (batch,), generator=g)
    target[0] = 300  # the last class
    expected = F.cross_entropy(h @ table[1:].T, target - 1)
    want = [x for x in (h, table) if x.requires_grad]
    expected_grads = torch.autograd.grad(expected * 3.0, want)
    got = next_item_loss(h, table[1:], target)
    assert isinstance(got.grad_fn, torch.autograd.function.BackwardCFunction)  # the chunked path ran
    got_grads = torch.autograd.grad(got * 3.0, want)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, expected_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(next_item_loss(h, table[1:], target), expected, rtol=1e-5, atol=1e-5)
    # first order only: a second derivative is refused, never silently zero
    first = torch.autograd.grad(next_item_loss(h, table[1:], target), want, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(first[0].sum(), want)


def test_info_nce_matches_hand_computation() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    loss = info_nce(z1, z2, temperature=0.5)
    z = torch.cat([z1, z2])
    total = 0.0
    for i in range(6):
        pos = (i + 3) % 6
        logits = [(z[i] @ z[j]).item() / 0.5 for j in range(6) if j != i]  # 2(B-1) negatives + 1 positive
        assert len(logits) == 5
        total += -((z[i] @ z[pos]).item() / 0.5 - math.log(sum(math.exp(v) for v in logits)))
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)
    # perfectly aligned, well separated pairs give a loss near zero
    e = torch.eye(3) * 20
    assert info_nce(e, e).item() < 1e-3
    assert info_nce(z1, z2, similarity="cos").item() > 0
    assert info_nce(z1[:1], z2[:1]).item() == 0.0


def test_two_dropout_views_of_one_batch_differ() -> None:
    # us_x feeds the same sequences twice in one call: the views must get independent dropout
    # masks (an augmentation that reuses a tensor in place would make them identical).
    torch.manual_seed(0)
    model = SASRec(50, hidden_size=16, max_len=12)
    ids = _ids()
    model.train()
    a, b = model(torch.cat([ids, ids])).split(len(ids))
    assert (a - b).abs().max() > 1e-3
    model.eval()
    a, b = model(torch.cat([ids, ids])).split(len(ids))
    assert torch.equal(a, b)


def test_item_embeddings_override_equals_table_lookup() -> None:
    torch.manual_seed(0)
    model = SASRec(50, hidden_size=16, max_len=12).eval()
    ids = _ids()
    emb = model.item_embedding(ids)
    assert torch.allclose(model(ids, item_embeddings=emb), model(ids), atol=1e-6)
    assert not torch.allclose(model(ids, item_embeddings=emb * 2), model(ids), atol=1e-3)


def test_training_attention_path_equals_eval_path_without_dropout() -> None:
    # In training mode attention is written out (FastDropout's draw instead of SDPA's
    # bernoulli_); with a keep probability of ~1 it must give SDPA's values and gradients, and
    # the rows of the padded bucket grids whose keys are all padding must not put NaN in backward.
    torch.manual_seed(0)
    model = SASRec(50, hidden_size=16, max_len=12, num_layers=2, inner_size=32, dropout=0.0, attn_dropout=1e-12)
    ids = _ids()
    (a, ga), (b, gb) = _train_and_eval_passes(model, ids, torch.randint(1, 51, (len(ids),)))
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.isfinite(x).all() and torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb, strict=True))


def test_attention_dropout_statistics() -> None:
    # Uniform attention over w keys times v = identity exposes the dropped attention matrix.
    torch.manual_seed(0)
    block = SASRec(50, hidden_size=16, max_len=12, attn_dropout=0.5).blocks[0].train()
    w = 40
    q = torch.zeros(64, 2, w, 8)
    v = torch.eye(w).expand(64, 2, w, w)
    mask = torch.ones(64, 1, w, w, dtype=torch.bool)
    attn = block._attend(q, q, v, mask)
    assert abs((attn == 0).float().mean().item() - 0.5) < 0.01
    assert abs(attn.mean().item() - 1 / w) < 0.01 / w
    assert torch.allclose(block.eval()._attend(q, q, v, mask), torch.full_like(attn, 1 / w))
