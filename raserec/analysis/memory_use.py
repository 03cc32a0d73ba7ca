"""Does the trained RAM use its memories? Test metrics of one RAFT model under four memory regimes:

(a) ``retrieved``: its own retrieved memories (the model as trained and tested);
(b) ``none``: no memories, h~ = h (the frozen encoder);
(c) ``shuffled``: each query gets the memories retrieved for another, random test query (a seeded
    derangement: no query keeps its own);
(d) ``half_bank``: memories retrieved from a bank built from a random half of the test-time bank.

A model whose (a) equals its (c) ignores what it retrieves (it only uses the memories' generic
statistics); (a) well above (c) means retrieval matters. (d) shows how much a smaller bank costs.
Test queries never lose leakage protection by shuffling: no test target is in the bank, and a
test query's user has no entry ending at or after its end.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from raserec.analysis.common import METRICS, Evaluator, bar_line, metrics_from_ranks
from raserec.evaluation.metrics import relative_change_pct
from raserec.evaluation.per_query import ScoreFn, query_ranks
from raserec.memory.bank import MemoryBank, encode_pairs

VARIANTS = {
    "retrieved": "(a) its own retrieved memories",
    "none": "(b) no memories (the encoder)",
    "shuffled": "(c) memories of another random query",
    "half_bank": "(d) retrieved from a random half of the bank",
}


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of ``0..n-1`` without fixed points (n >= 2): a random cycle order
    where every element maps to the next one in the cycle."""
    order = rng.permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def fixed_memory_scores(module, rows: np.ndarray, mask: np.ndarray) -> ScoreFn:
    """Scoring of a RAFT ``module`` whose query ``i`` (the dataset row ``batch['index']``) uses the
    memories at bank ``rows[i]`` (``mask[i]``) of the module's current bank."""
    module.eval()

    def score(batch) -> tuple[torch.Tensor, torch.Tensor]:
        idx = batch["index"].cpu().numpy()
        h = module.encoder(batch["input_ids"])
        if module.uses_retrieval:
            h = module.mix(h, torch.from_numpy(rows[idx]), torch.from_numpy(mask[idx]))
        return h, module.encoder.item_weights()

    return score


def memory_use(ev: Evaluator, seed: int) -> tuple[pl.DataFrame, object, dict]:
    """The four variants' HR/NDCG@5/10 on the test queries, their change against (a), and paired
    tests of (a) against (c) and (b); the figure is a grouped bar chart."""
    from raserec.experiments.summary import paired_tests

    module, dm = ev.module, ev.dm
    dataset = dm.dataset("test")
    bank = ev.test_bank()
    rng = np.random.default_rng(seed)
    h = encode_pairs(module.encoder, dataset, dm.eval_batch_size, progress=ev.progress)
    keys = module.retriever.query_keys(torch.from_numpy(h), dataset.prefixes(torch.arange(len(dataset))))
    rows, mask = (t.numpy() for t in bank.search(keys, dataset.pairs.user, dataset.pairs.end, module.retriever.k))
    kw = {"batch_size": dm.eval_batch_size, "mask_history": module.mask_history, "progress": ev.progress}

    def ranks_with(memory_rows: np.ndarray, memory_mask: np.ndarray, on: MemoryBank, desc: str) -> np.ndarray:
        module.retriever.bank = on
        return query_ranks(fixed_memory_scores(module, memory_rows, memory_mask), dataset, desc=desc, **kw)

    perm = derangement(len(rows), rng)
    keep = rng.random(len(bank)) < 0.5
    half = bank.subset(keep)
    h_rows, h_mask = (t.numpy() for t in half.search(keys, dataset.pairs.user, dataset.pairs.end, module.retriever.k))
    ranks = {
        "retrieved": ranks_with(rows, mask, bank, "ranking: retrieved"),
        "none": ev.ranks(augmented=False),
        "shuffled": ranks_with(rows[perm], mask[perm], bank, "ranking: shuffled"),
        "half_bank": ranks_with(h_rows, h_mask, half, "ranking: half bank"),
    }
    module.retriever.bank = bank
    memories = {"retrieved": mask.sum(1).mean(), "none": 0.0, "shuffled": mask[perm].sum(1).mean(),
                "half_bank": h_mask.sum(1).mean()}
    bank_sizes = {"retrieved": len(bank), "none": 0, "shuffled": len(bank), "half_bank": len(half)}
    reference = metrics_from_ranks(ranks["retrieved"], (5, 10))
    table_rows = []
    for name, description in VARIANTS.items():
        m = metrics_from_ranks(ranks[name], (5, 10))
        row = {"variant": name, "description": description, "bank_entries": bank_sizes[name],
               "memories_per_query": float(memories[name])}
        row.update({key: m[key] for key in METRICS})
        row.update({f"change_{key}_pct": relative_change_pct(m[key], reference[key])
                    for key in ("HR@10", "NDCG@10")})
        table_rows.append(row)
    table = pl.DataFrame(table_rows)
    tests = {"retrieved_vs_shuffled": paired_tests(ranks["shuffled"], ranks["retrieved"]),
             "retrieved_vs_none": paired_tests(ranks["none"], ranks["retrieved"])}
    p = tests["retrieved_vs_shuffled"]["NDCG@10"]["p_wilcoxon"]
    uses = bool(reference["NDCG@10"] > metrics_from_ranks(ranks["shuffled"], (10,))["NDCG@10"] and p is not None
                and p < 0.01)
    p_text = "n/a" if p is None else f"{p:.1e}"
    fig = bar_line(table, "variant", {"HR@10": "HR@10", "NDCG@10": "NDCG@10"}, "change_NDCG@10_pct",
                   f"Memory use: {'uses its memories' if uses else 'does NOT use its memories'} "
                   f"((a) vs (c) NDCG@10 Wilcoxon p = {p_text})", "test metric",
                   line_label="NDCG@10 change vs (a) (%)")
    extra = {"paired_tests": tests, "uses_retrieved_memories": uses, "half_bank_seed_fraction": 0.5,
             "verdict": ("the model uses its retrieved memories: replacing them with another query's lowers "
                         "NDCG@10 significantly") if uses else
                        ("the model does not use what it retrieves: another query's memories do as well")}
    return table, fig, extra
