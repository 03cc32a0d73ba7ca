"""``raserec analyze <name>``: the paper's analyses (and preference drift), each writing
``<out>/<name>.csv``, ``<name>.png`` and ``<name>.json`` (provenance)."""

from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path

import lightning as L

from raserec.argparsing import ArgumentParser
from raserec.cli import check_config_file
from raserec.errors import RaserecError, check
from raserec.outputs import cache_dir_option, check_output_dir

NAMES = ("long_tail", "user_activity", "partitions", "noise", "sensitivity", "drift", "memory_use")

_DESCRIPTIONS = {
    "long_tail": "RQ3: test queries in equal-size groups by target popularity; NDCG@5 of RaSeRec vs its encoder",
    "user_activity": "RQ6: test queries in equal-size groups by sequence length; HR@5/NDCG@5 with vs without augmentation",
    "partitions": "RQ5: memory bank split S/M/L by prefix length; HR@5/NDCG@5 with every combination (no retraining)",
    "noise": "RQ7: random items inserted into each test sequence; with vs without augmentation",
    "sensitivity": "RQ4: HR/NDCG as alpha, beta and K vary (retrain a RAM per value, or vary at test time)",
    "memory_use": "does the RAM use its memories? test metrics with (a) its retrieved memories, (b) none, "
                  "(c) another random query's memories, (d) memories from a random half of the bank",
    "drift": "beyond the paper: hold out recent interactions, train without them, then add them to the memory bank "
             "only (no retraining) vs retraining",
}


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by spaces or commas, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="raserec analyze", description="Analyses of a trained RaSeRec model "
                                "(paper appendices F-I). Each writes NAME.csv, NAME.png and NAME.json to --out.")
    sub = p.add_subparsers(dest="name", required=True, metavar="NAME")
    for name in NAMES:
        s = sub.add_parser(name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name])
        if name != "drift":
            s.add_argument("--checkpoint", required=True, type=Path,
                           help="trained RAFT (stage 2) checkpoint; it embeds its frozen encoder")
            s.add_argument("--data", type=Path, help="dataset (default: the one recorded in the checkpoint)")
        s.add_argument("--out", type=Path, help="output directory (default: results/analysis/<dataset>)")
        s.add_argument("--seed", type=int, default=2024, help="seed of random draws (noise, retraining)")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.add_argument("--notes", default="", help="which model this is (recorded in NAME.json; the README's model column)")
        s.add_argument("--cache-dir", default=".cache/datasets", help="prepared-dataset cache ('none' to disable)")
    g = sub.choices
    g["long_tail"].add_argument("--groups", type=int, default=10, help="equal-size popularity groups")
    g["user_activity"].add_argument("--groups", type=int, default=8, help="equal-size length groups")
    g["partitions"].add_argument("--bounds", type=int, nargs=2, metavar=("LO", "HI"),
                                 help="S = prefix length < LO, M = LO..HI, L = > HI (default: paper Table 7 for "
                                      "the dataset; 3 6 otherwise)")
    g["noise"].add_argument("--ratios", type=_floats, default=[0.1, 0.2, 0.3],
                            help="fractions of random items inserted (default '0.1 0.2 0.3')")
    s = g["sensitivity"]
    s.add_argument("--params", nargs="+", choices=["alpha", "beta", "k"], default=["alpha", "beta", "k"])
    s.add_argument("--alpha", type=_floats, help="alpha values (default 0.0..1.0 step 0.1)")
    s.add_argument("--beta", type=_floats, help="beta values (default 0.0..1.0 step 0.1)")
    s.add_argument("--k", type=_floats, help="K values (default 5..55 step 5)")
    s.add_argument("--mode", choices=["retrain", "eval"], default="retrain",
                   help="retrain: a fresh RAM per value (the paper); eval: vary the trained RAM at test time "
                        "(alpha and K only)")
    s.add_argument("--split", choices=["val", "test"], default="test",
                   help="queries measured: val (choose values here, with the training-time bank) or test "
                        "(report only; never choose on it)")
    s.add_argument("--epochs", type=int, default=1, help="retrain: RAFT epochs per value")
    s.add_argument("--limit-train-batches", type=float, default=1.0,
                   help="retrain: fraction (<= 1) or number (> 1) of training batches per epoch")
    d = g["drift"]
    d.add_argument("--pretrain-config", required=True, type=Path, help="stage-1 config")
    d.add_argument("--finetune-config", required=True, type=Path, help="stage-2 (RAFT) config")
    d.add_argument("--overlay", type=Path, action="append", default=[], help="config applied after each (repeatable)")
    d.add_argument("--holdout", type=int, default=2, help="m: recent items held out per user (before validation)")
    d.add_argument("--retrained", help="RAFT checkpoint trained on all data (default: train both stages here)")
    d.add_argument("--encoder", help="stage-1 encoder (record or checkpoint) trained on all data: only RAFT is "
                                     "retrained on all data (ignored with --retrained)")
    d.add_argument("--work-dir", type=Path, help="checkpoints of the drift runs (default: runs/drift_<dataset>)")
    return p


#: The largest K the sensitivity analysis sweeps: every query holds K memories of d floats.
MAX_K = 1000
#: The largest noise ratio: random items inserted per item of the queries.
MAX_RATIO = 10.0


def check_args(args: argparse.Namespace) -> None:
    """Every value an analysis takes, checked before the model, the data or the bank is loaded."""
    if args.out is not None:
        check_output_dir(args.out, "--out")
    if getattr(args, "bounds", None) is not None:
        lo, hi = args.bounds
        check(1 <= lo <= hi, f"--bounds LO HI must satisfy 1 <= LO <= HI, got {lo} {hi}")
    for value in getattr(args, "ratios", None) or []:
        # a ratio r inserts r x (the queries' items) random items: 10 is already 11x the data
        check(math.isfinite(value) and 0 <= value <= MAX_RATIO, f"--ratios must be in [0, {MAX_RATIO}], got {value}")
    if getattr(args, "groups", None) is not None:
        check(args.groups >= 1, f"--groups must be >= 1, got {args.groups}")
    for name in ("alpha", "beta"):
        for value in getattr(args, name, None) or []:
            check(0.0 <= value <= 1.0, f"--{name} values must be in [0, 1], got {value}")
    for value in getattr(args, "k", None) or []:
        check(math.isfinite(value) and value == int(value) and 0 <= value <= MAX_K,
              f"--k values must be integers in [0, {MAX_K}], got {value}")
    if hasattr(args, "epochs"):
        check(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
        check(math.isfinite(args.limit_train_batches) and args.limit_train_batches > 0,
              f"--limit-train-batches must be > 0, got {args.limit_train_batches}")
    if hasattr(args, "holdout"):
        check(args.holdout >= 1, f"--holdout must be >= 1, got {args.holdout}")


def main(argv: list[str]) -> int:
    from raserec.analysis.common import Evaluator, Output, load_raft, provenance

    args = build_parser().parse_args(argv)
    check_args(args)
    command = shlex.join(["raserec", "analyze", *argv])  # argv, not sys.argv: main() may be called in-process
    L.seed_everything(args.seed, verbose=False)
    progress = not args.no_progress
    cache_dir = cache_dir_option(args.cache_dir, "--cache-dir")
    if args.name == "drift":
        from raserec.analysis.drift import drift

        for path in (args.pretrain_config, args.finetune_config, *args.overlay):
            check_config_file(str(path))
        for path in (args.retrained, args.encoder):
            if path is not None and not Path(path).is_file():
                raise RaserecError(f"{path}: no such checkpoint")
        stem = args.pretrain_config.stem.split("_")[0]
        out = Output(args.out or Path("results/analysis") / stem, "drift", command)
        table, fig, extra = drift(args.pretrain_config, args.finetune_config, args.overlay, args.holdout,
                                  args.work_dir or Path("runs") / f"drift_{stem}", args.retrained, progress,
                                  full_encoder=args.encoder)
        paths = out.write(table, fig, {"seeds": [args.seed], **extra, **({"notes": args.notes} if args.notes else {})})
        _report(table, paths)
        return 0

    module, dm = load_raft(args.checkpoint, args.data, cache_dir=cache_dir)
    dataset = dm.data_path.stem.lower()
    out = Output(args.out or check_output_dir(Path("results/analysis") / dataset, "--out"), args.name, command)
    ev = Evaluator(module, dm, progress=progress)
    extra: dict = {"seeds": [args.seed], **({"notes": args.notes} if args.notes else {})}
    if args.name == "long_tail":
        from raserec.analysis.groups import long_tail

        table, fig = long_tail(ev, args.groups)
    elif args.name == "user_activity":
        from raserec.analysis.groups import user_activity

        table, fig = user_activity(ev, args.groups)
    elif args.name == "partitions":
        from raserec.analysis.partitions import default_bounds, partitions

        lo, hi = args.bounds or default_bounds(dataset)
        table, fig = partitions(ev, lo, hi)
        extra["bounds"] = [lo, hi]
    elif args.name == "noise":
        from raserec.analysis.noise import noise

        table, fig = noise(ev, args.ratios, args.seed)
    elif args.name == "memory_use":
        from raserec.analysis.memory_use import memory_use

        table, fig, used = memory_use(ev, args.seed)
        extra.update(used)
    else:
        from raserec.analysis.sensitivity import sensitivity

        limit = args.limit_train_batches
        values = {p: getattr(args, p) for p in ("alpha", "beta", "k") if getattr(args, p)}
        table, fig = sensitivity(ev, str(args.checkpoint), args.params, values, args.mode, args.epochs,
                                 int(limit) if limit > 1 else limit, args.seed, args.split)
        extra.update({"mode": args.mode, "split": args.split, "epochs": args.epochs, "limit_train_batches": limit})
    paths = out.write(table, fig, provenance(module, dm, args.checkpoint, **extra))
    _report(table, paths)
    return 0


def _report(table, paths) -> None:
    import polars as pl

    with pl.Config(tbl_rows=100, tbl_cols=20, tbl_width_chars=200, float_precision=4):
        print(table)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
