"""One us_x pre-training step on Beauty (CPU), A/B in one process: Adam's per-tensor loop against
``foreach``, and dropout masks from a float draw against one random byte per element; plus one
``[1024 x 64] x [64 x N]`` scoring product in float32 and bfloat16. Writes results/step_bench.json.

The step is the module's own ``training_step`` (us_x: CE + InfoNCE over dropout and same-target
views, batch 256, the pre-training config) on the same fixed batches for every variant, outside
Lightning (no loop, logging or checkpoint overhead). Variants alternate round by round, so a
change in machine load hits them alike; each figure is the median over rounds of the mean step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch

from raserec.benchmarks.common import save
from raserec.data.batch import PretrainBatch
from raserec.data.datamodule import SequenceDataModule
from raserec.models import layers
from raserec.models.layers import float_keep_mask  # the former mask of every rate
from raserec.pretrain.module import PretrainModule
from raserec.runtime import tune_allocator

#: (Adam foreach, byte masks) per variant; "former" is the code before 2026-12-05.
VARIANTS = {"former": (False, False), "foreach": (True, False), "byte_masks": (False, True), "both": (True, True)}


@contextlib.contextmanager
def mask_variant(byte_masks: bool) -> Iterator[None]:
    """Dropout draws its masks with :func:`raserec.models.layers.keep_mask` (byte path where the
    rate allows) or, inside this context with ``byte_masks=False``, with :func:`float_keep_mask`."""
    current = layers.keep_mask
    if not byte_masks:
        layers.keep_mask = float_keep_mask
    try:
        yield
    finally:
        layers.keep_mask = current


def fixed_batches(dm: SequenceDataModule, count: int) -> list[PretrainBatch]:
    """The first ``count`` training batches of epoch 0, positives attached."""
    out = []
    for batch in dm.train_dataloader():
        out.append(dm.add_positives(batch, epoch=0))
        if len(out) == count:
            break
    return out


def step_model(num_items: int, foreach: bool) -> tuple[PretrainModule, torch.optim.Optimizer]:
    L.seed_everything(0)
    model = PretrainModule(num_items, positive_pair="dropout_and_same_target", lambda_ret=0.1)
    model.log_dict = lambda *args, **kwargs: None  # no trainer: nothing to log to
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, foreach=foreach)


def steps_ms(model: PretrainModule, optimizer: torch.optim.Optimizer, batches: list[PretrainBatch],
             byte_masks: bool) -> float:
    """Mean wall time of one step (forward, backward, Adam) over ``batches``, in ms."""
    with mask_variant(byte_masks):
        start = time.perf_counter()
        for i, batch in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            model.training_step(batch, i).backward()
            optimizer.step()
    return 1000.0 * (time.perf_counter() - start) / len(batches)


def step_ab(dm: SequenceDataModule, steps: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median (over ``rounds``) mean step time of each variant, alternating variants per round."""
    batches = fixed_batches(dm, steps)
    models = {name: step_model(dm.num_items, foreach) for name, (foreach, _) in VARIANTS.items()}
    for name, (model, optimizer) in models.items():  # warm-up: allocator, kernels, Adam state
        steps_ms(model, optimizer, batches[:3], VARIANTS[name][1])
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, (model, optimizer) in models.items():
            times[name].append(steps_ms(model, optimizer, batches, VARIANTS[name][1]))
    return {name: {"step_ms": round(statistics.median(t), 2), "rounds_ms": [round(x, 2) for x in t]}
            for name, t in times.items()}


def product_ms(rows: int, dim: int, items: int, dtype: torch.dtype, repeats: int) -> float:
    """Median time of one ``[rows x dim] x [dim x items]`` product in ``dtype``, in ms."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, dim, generator=g).to(dtype)
    b = torch.randn(items, dim, generator=g).to(dtype)
    a @ b.T  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b.T
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--steps", type=int, default=40, help="training steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--product-repeats", type=int, default=20)
    args = parser.parse_args()
    tune_allocator()
    start = time.perf_counter()
    dm = SequenceDataModule(args.data / "Beauty.txt", batch_size=256, eval_batch_size=1024, cache_dir=None)
    dm.setup("fit")
    ab = step_ab(dm, args.steps, args.rounds)
    print("us_x step", ab)
    n = dm.num_items
    products = {str(dtype).removeprefix("torch."): product_ms(1024, 64, n, dtype, args.product_repeats)
                for dtype in (torch.float32, torch.bfloat16)}
    print("product ms", products)
    flops = 2 * 1024 * 64 * n
    former, both = ab["former"]["step_ms"], ab["both"]["step_ms"]
    save("step_bench.json", {
        "dataset": "Beauty",
        "model": "SASRec (d=64, 2 layers, dropout 0.5) us_x step, batch 256; scoring product 1024 x 64 x N",
        "seeds": [0],
        "metrics": {
            **{f"usx_step_ms/{name}": d["step_ms"] for name, d in ab.items()},
            "usx_step/speedup_both": round(former / both, 3),
            "usx_step/speedup_foreach": round(former / ab["foreach"]["step_ms"], 3),
            "usx_step/speedup_byte_masks": round(former / ab["byte_masks"]["step_ms"], 3),
            "product_ms/float32": round(products["float32"], 3),
            "product_ms/bfloat16": round(products["bfloat16"], 3),
            "product/bf16_speedup": round(products["float32"] / products["bfloat16"], 2),
            "product_gflops/float32": round(flops / products["float32"] / 1e6, 1),
        },
        "notes": f"{args.steps} fixed batches per variant and round, {args.rounds} alternating rounds, median of "
                 "the rounds' mean step; variants: former = Adam per-tensor loop + float-draw masks (the code "
                 "before 2026-12-05), foreach = Adam foreach=True, byte_masks = one random byte per mask element, "
                 "both = the current code. Products: median of "
                 f"{args.product_repeats}, N = {n} items, bf16 without the casts",
        "details": {"usx_step": ab, "products_ms": products},
    }, started=start)


if __name__ == "__main__":
    main()
