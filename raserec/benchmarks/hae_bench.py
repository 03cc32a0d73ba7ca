"""GRASP's Holistic Attention with rows grouped by length against the dense reference, on the same
Beauty training batches (CPU). Writes results/hae_bench.json.

One GRASP model (``configs/beauty_grasp.yaml``'s settings, batch 256); whole training steps
(forward, backward, Adam) alternate between ``HolisticAttention.forward`` (rows grouped by length)
and ``dense_forward`` (every row at the batch's full width, as before the grouping) in rounds over
the same batches, in alternating order, the first round discarded as warm-up. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from raserec.benchmarks.common import save
from raserec.data.datamodule import SequenceDataModule
from raserec.models.hae import HolisticAttention
from raserec.runtime import tune_allocator
from raserec.semantic.grasp import GRASPModule
from raserec.semantic.space import SemanticConfig

VARIANTS = {"grouped": HolisticAttention.forward, "dense": HolisticAttention.dense_forward}


def step_ms(model: GRASPModule, optimizer: torch.optim.Optimizer, batches: list) -> float:
    """Mean milliseconds of one training step over ``batches``."""
    start = time.perf_counter()
    for batch in batches:
        model.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / len(batches) * 1000


def ab(model: GRASPModule, batches: list, rounds: int) -> dict[str, list[float]]:
    """Per-round step times of each variant, alternating (round 0, the warm-up, not kept)."""
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for r in range(rounds + 1):
            names = list(VARIANTS) if r % 2 else list(VARIANTS)[::-1]  # neither side always first
            for name in names:
                HolisticAttention.forward = VARIANTS[name]
                ms = step_ms(model, optimizer, batches)
                if r:
                    times[name].append(round(ms, 1))
    finally:
        HolisticAttention.forward = VARIANTS["grouped"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--steps", type=int, default=20, help="training batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    tune_allocator()
    torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    dm = SequenceDataModule(args.data / "Beauty.txt", batch_size=256, eval_batch_size=1024)
    dm.setup("fit")
    L.seed_everything(0)
    model = GRASPModule(dm.num_items, semantic=SemanticConfig(embedder="minilm", prefix_vectors="mean_items", k=10),
                        similar_users=10)
    model.attach(dm)
    model.train()
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(args.steps)]
    per_batch = [(b["input_ids"] > 0).sum(1).float() for b in batches]
    lengths = torch.cat(per_batch)
    times = ab(model, batches, args.rounds)
    means = {name: round(statistics.mean(v), 1) for name, v in times.items()}
    save("hae_bench.json", {
        "dataset": "Beauty", "model": "SASRec + GRASP (HAE grouped by length vs dense)", "seeds": [0],
        "metrics": {"grouped_step_ms": means["grouped"], "dense_step_ms": means["dense"],
                    "speedup": round(means["dense"] / means["grouped"], 2)},
        "rounds_ms": times, "batch": 256, "steps_per_round": args.steps,
        "mean_prefix_items": round(float(lengths.mean()), 2), "shortest_longest_row": int(min(x.max() for x in per_batch)),
        "notes": "training steps (forward, backward, Adam) of one GRASP model, the two HAE paths alternating "
                 "over the same batches; idle machine"}, started)


if __name__ == "__main__":
    main()
