"""Training cost of the semantic methods on Beauty (CPU), beside plain SASRec on the same batches.
Writes results/semantic_bench.json.

Each model trains over the same fraction of an epoch at the configs' batch 256 (float32, no
validation); the training loop is timed apart from the one-off setup (semantic neighbours and,
for GRASP, the similar users of every training pair, read from or written to the semantic cache).
SRA-CL's step encodes 13 sequences per training pair (the pair, two neighbour-substituted views
and its k = 10 semantic neighbour prefixes, all with gradients, as the official code), where
SASRec encodes one and us_x three; GRASP's step adds Holistic Attention over each item's neighbours.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L

from raserec.benchmarks.common import save
from raserec.benchmarks.train_bench import epoch_time, model_epoch_time
from raserec.data.datamodule import SequenceDataModule
from raserec.pretrain.module import PretrainModule
from raserec.pretrain.objectives import NextItemCE
from raserec.runtime import tune_allocator
from raserec.semantic.grasp import GRASPModule
from raserec.semantic.space import SemanticConfig
from raserec.semantic.sracl import SRACLInterUser, SRACLIntraUser

#: The configs' settings (configs/beauty_sracl.yaml, configs/beauty_grasp.yaml).
SEMANTIC = SemanticConfig(embedder="minilm", prefix_vectors="mean_items", k=10)


def build(name: str, num_items: int) -> L.LightningModule:
    """A fresh semantic model (``sracl`` or ``grasp``), built as the Beauty configs build it."""
    if name == "sracl":
        return PretrainModule(num_items, objectives=[
            NextItemCE(), SRACLInterUser(0.1, SEMANTIC), SRACLIntraUser(0.1, SEMANTIC, substitution=0.2)])
    if name == "grasp":
        return GRASPModule(num_items, semantic=SEMANTIC, similar_users=10)
    raise ValueError(f"unknown method {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--batches", type=float, default=0.25, help="fraction of an epoch to time per model")
    args = parser.parse_args()
    tune_allocator()
    dm = SequenceDataModule(args.data / "Beauty.txt", batch_size=256, eval_batch_size=1024, cache_dir=None)
    dm.setup("fit")
    start = time.perf_counter()
    # The references are train_bench's own SASRec and us_x epochs, on the same batches.
    details = {"sasrec": epoch_time(dm, "none", args.batches),
               "usx": epoch_time(dm, "dropout_and_same_target", args.batches)}
    for name in ("sracl", "grasp"):
        L.seed_everything(0)
        details[name] = model_epoch_time(dm, build(name, dm.num_items), args.batches)
    for name, figures in details.items():
        print(name, figures)
    metrics = {f"{name}/epoch_s": d["epoch_s"] for name, d in details.items()}
    metrics.update({f"{name}/step_s": d["step_s"] for name, d in details.items()})
    metrics.update({f"{name}/cost_vs_sasrec": round(d["epoch_s"] / details["sasrec"]["epoch_s"], 2)
                    for name, d in details.items() if name != "sasrec"})
    save("semantic_bench.json", {
        "dataset": "Beauty",
        "model": "SASRec, us_x, SASRec + SRA-CL, SASRec + GRASP (d=64, 2 layers; MiniLM semantics, k=10)",
        "seeds": [0],
        "batch_size": 256,
        "metrics": metrics,
        "notes": f"training loop over {args.batches:g} of an epoch per model, float32, no validation, "
                 "scaled to the 131,413 training pairs; setup_s (semantic neighbours, similar users) "
                 "apart in details",
        "details": details,
    }, started=start)


if __name__ == "__main__":
    main()
