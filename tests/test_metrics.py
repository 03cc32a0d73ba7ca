"""Full-ranking evaluation: ranks, tie handling, HR/NDCG values and batch-size independence."""

from __future__ import annotations

import math

import pytest
import torch

from raserec.evaluation.metrics import RankingMetrics
from raserec.evaluation.ranking import target_ranks, top_items


def test_target_ranks_pessimistic_ties() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    ranks = target_ranks(scores, torch.tensor([3, 1]))  # items 3 (0.5, tied with item 4) and 1
    assert ranks.tolist() == [2, 3]  # 0.9 and the tie rank above item 3; constant scores rank last


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])  # one row per chunk, a ragged last chunk, one chunk
def test_chunked_count_equals_the_bool_sum(monkeypatch, chunk) -> None:
    from raserec.evaluation import ranking

    monkeypatch.setattr(ranking, "_CHUNK", chunk * 50)
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (23, 50), generator=g).float()  # many ties
    scores[0, :5] = float("-inf")
    scores[1, 3] = float("nan")
    threshold = scores[:, 7:8].clone()
    threshold[2] = float("-inf")  # every finite entry counts
    expected = (scores >= threshold).sum(1)
    assert torch.equal(ranking.count_at_least(scores, threshold), expected)
    assert torch.equal(ranking.count_at_least(scores.bfloat16(), threshold.bfloat16()), expected)
    assert ranking.count_at_least(scores, threshold).dtype == torch.int64


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22])
@pytest.mark.parametrize("masked", [False, True])
def test_product_ranks_equal_ranks_of_the_full_score_matrix(monkeypatch, chunk, masked) -> None:
    from raserec.evaluation import ranking

    monkeypatch.setattr(ranking, "_CHUNK", chunk * 40)
    g = torch.Generator().manual_seed(1)
    users = torch.randint(-2, 3, (19, 8), generator=g).float()  # integer products: exact ties
    items = torch.randint(-2, 3, (40, 8), generator=g).float()
    target = torch.randint(1, 41, (19,), generator=g)
    history = torch.randint(0, 41, (19, 6), generator=g) if masked else None
    if masked:
        history[0, 0] = target[0]  # the target in the history is never masked
    expected = ranking.target_ranks(users @ items.T, target, history)
    assert torch.equal(ranking.product_ranks(users, items, target, history), expected)
    assert torch.equal(ranking.product_ranks(users.bfloat16(), items.bfloat16(), target, history), expected)
    # parameters that require grad are fine (evaluation outside no_grad), and float64 stays float64
    assert torch.equal(ranking.product_ranks(users.requires_grad_(), items, target, history), expected)
    close = torch.tensor([[1.0]], dtype=torch.float64)
    pair = torch.tensor([[1.0], [1.0 + 1e-12]], dtype=torch.float64)  # a float32 tie, not a float64 one
    assert ranking.product_ranks(close, pair, torch.tensor([2])).tolist() == [0]


def test_history_mask_keeps_target() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    history = torch.tensor([[0, 1, 2]])
    assert target_ranks(scores, torch.tensor([3])).tolist() == [2]
    assert target_ranks(scores, torch.tensor([3]), history).tolist() == [0]
    assert target_ranks(scores, torch.tensor([2]), history).tolist() == [0]  # target 2 is in history
    assert top_items(scores, 2, history).tolist() == [[3, 4]]
    assert top_items(scores, 2).tolist() == [[1, 2]]


def test_metric_values_by_hand() -> None:
    m = RankingMetrics(ks=(1, 5, 10))
    m.update(torch.tensor([0, 3, 7, 20]))
    out = m.compute()
    assert out["HR@1"].item() == pytest.approx(0.25)
    assert out["HR@5"].item() == pytest.approx(0.5)
    assert out["HR@10"].item() == pytest.approx(0.75)
    ndcg10 = (1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(9)) / 4
    assert out["NDCG@10"].item() == pytest.approx(ndcg10, rel=1e-6)
    assert out["MRR@10"].item() == pytest.approx((1 + 1 / 4 + 1 / 8) / 4, rel=1e-6)


def test_metrics_independent_of_batching() -> None:
    g = torch.Generator().manual_seed(0)
    ranks = torch.randint(0, 80, (1000,), generator=g)
    whole = RankingMetrics()
    whole.update(ranks)
    expected = whole.compute()
    for bs in (1, 7, 333):
        m = RankingMetrics()
        for chunk in ranks.flip(0).split(bs):
            m.update(chunk)
        got = m.compute()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_rejects_bad_cutoffs() -> None:
    with pytest.raises(ValueError):
        RankingMetrics(ks=(0, 5))


def test_full_ranking_evaluation_never_sorts_the_item_scores(monkeypatch) -> None:
    """PITFALLS 17: the test pass ranks by one score matmul and a count per batch; a sort, argsort
    or top-k over the [B, N] scores (O(N log N) per query) is the slow way, refused here."""
    import lightning as L

    from raserec.pretrain.module import PretrainModule
    from tests.test_memory_bank import synthetic_dm

    dm = synthetic_dm(batch_size=16, eval_batch_size=8)
    torch.manual_seed(0)
    model = PretrainModule(dm.num_items, positive_pair="none", lambda_ret=0.0)
    products = []
    model.item_weights = (lambda f: lambda: products.append(1) or f())(model.item_weights)

    def refusing(original):
        def guarded(x, *args, **kwargs):  # small sorts (the encoder's length buckets) are fine
            if x.dim() >= 2 and x.size(-1) >= dm.num_items:
                raise AssertionError(f"full-ranking evaluation sorted a {tuple(x.shape)} score matrix")
            return original(x, *args, **kwargs)
        return guarded

    for name in ("sort", "argsort", "topk", "kthvalue", "msort"):
        monkeypatch.setattr(torch, name, refusing(getattr(torch, name)))
        monkeypatch.setattr(torch.Tensor, name, refusing(getattr(torch.Tensor, name)))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    batches = math.ceil(len(dm.pairs("test")) / 8)
    assert len(products) == batches  # one item-score product per test batch
    assert 0.0 <= metrics["test/NDCG@10"] <= metrics["test/HR@10"] <= 1.0


def test_relative_change_of_a_zero_baseline_is_null_in_polars_too() -> None:
    import polars as pl

    from raserec.evaluation.metrics import relative_change_pct

    assert relative_change_pct(0.2, 0.0) is None and relative_change_pct(0.3, 0.2) == pytest.approx(50.0)
    df = pl.DataFrame({"HR@5": [0.1, 0.2]})
    out = df.select(relative_change_pct(pl.col("HR@5"), 0.0).alias("c"), relative_change_pct(pl.col("HR@5"), 0.1).alias("d"))
    assert out["c"].to_list() == [None, None] and out["d"].to_list() == pytest.approx([0.0, 100.0])
