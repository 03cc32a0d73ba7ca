"""``raserec compare BASE OTHER``: paired significance tests between two experiments that ranked
the same test queries, seed by seed (the same seed of both: same data split, same queries).

Per-query test ranks come from each seed directory of an experiment (``results/<name>/seed_<s>/``):

- ``<stage>.ranks_test.npz``, written by every ``raserec fit``/``test`` with a results file
  (``results.ranks``): the ranks of that stage's model (column ``pretrain`` or ``finetune``);
- ``ranks_test.npz``, written by a two-stage experiment: its stage-1 encoder (column ``pretrain``)
  and its fine-tuned model (column ``finetune``).

``EXP:COLUMN`` picks a column; the default is the experiment's last stage (``finetune`` where it
exists, else ``pretrain``). So ``raserec compare results/beauty_raserec results/beauty_semkeys_raserec``
tests the semantic-keys RAFT against plain RAFT, and ``results/beauty_raserec:pretrain`` names
RaSeRec's own encoder.

Writes ``results/<other>/vs_<base>.json`` (``vs_<base>_<column>_<column>.json`` where columns are
named; a results file: per-seed paired t and Wilcoxon tests,
both models' metrics, and a t-test over seed means when there are several seeds).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raserec.argparsing import ArgumentParser
from raserec.errors import RaserecError, read_json_object
from raserec.evaluation.per_query import metrics_from_ranks
from raserec.experiments.summary import TEST_KEYS, across_seeds, all_hardware, paired_tests
from raserec.outputs import check_output_file
from raserec.results import hardware, write_results

#: Stage columns a comparison can name.
COLUMNS = ("pretrain", "finetune")
#: Columns of a two-stage experiment's ``ranks_test.npz``, by stage.
_RAFT_FILE_COLUMNS = {"pretrain": "encoder", "finetune": "finetune"}
_SEED_DIR = re.compile(r"seed_(\d+)$")


@dataclass(frozen=True)
class RankColumn:
    """One model's test ranks and the identity of each query."""

    user: np.ndarray
    end: np.ndarray
    target: np.ndarray
    rank: np.ndarray
    source: str
    complete: bool = True  # False: a test pass limited to some of the queries

    def same_queries(self, other: RankColumn) -> bool:
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in ("user", "end", "target"))


@dataclass(frozen=True)
class Side:
    """One side of a comparison: an experiment directory and the column of its ranks."""

    directory: Path
    column: str | None  # None: the last stage that has ranks

    @classmethod
    def parse(cls, text: str) -> Side:
        """``EXP`` or ``EXP:COLUMN`` (an existing directory whose name has a colon is taken whole)."""
        if not text.strip():
            raise RaserecError("an experiment must be named (results/<name>), got an empty argument")
        text = text.rstrip("/") or text
        path, column = text, ""
        if not Path(text).is_dir() and ":" in Path(text).name:
            path, _, column = text.rpartition(":")
            if column not in COLUMNS:
                raise RaserecError(f"{text}: unknown column {column!r}; choose one of {', '.join(COLUMNS)}")
        directory = Path(path)
        if not directory.is_dir():
            raise RaserecError(f"{directory}: no such experiment directory (results/<name>/)")
        return cls(directory, column or None)

    @property
    def name(self) -> str:
        return self.directory.resolve().name

    @property
    def label(self) -> str:
        return self.name + (f":{self.column}" if self.column else "")

    def seeds(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _SEED_DIR.match(p.name)))

    def ranks(self, seed: int) -> RankColumn | None:
        """The ranks of ``seed`` in this side's column, or ``None`` when that seed has none."""
        found = available_ranks(self.directory / f"seed_{seed}")
        if self.column is not None:
            return found.get(self.column)
        return found.get("finetune") or found.get("pretrain")


def available_ranks(seed_dir: Path) -> dict[str, RankColumn]:
    """Every column of ranks a seed directory holds. A stage's own file wins over the runner's
    ``ranks_test.npz`` (it is what that stage's test pass ranked) unless it covers only part of
    the test queries (a limited test pass)."""
    out: dict[str, RankColumn] = {}
    raft = seed_dir / "ranks_test.npz"
    if raft.is_file():
        z = load_ranks_file(raft, ("user", "end", "target", *_RAFT_FILE_COLUMNS.values()))
        for column, key in _RAFT_FILE_COLUMNS.items():
            out[column] = RankColumn(z["user"], z["end"], z["target"], z[key], f"{raft}[{key}]")
    for column in COLUMNS:
        path = seed_dir / f"{column}.ranks_test.npz"
        if path.is_file():
            z = load_ranks_file(path, ("user", "end", "target", "rank", "queries_total"))
            own = RankColumn(z["user"], z["end"], z["target"], z["rank"], str(path),
                             complete=len(z["rank"]) == int(z["queries_total"]))
            if own.complete or column not in out:
                out[column] = own
    return out


def load_ranks_file(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` file, or one error line for a damaged or foreign one."""
    try:
        with np.load(path) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise RaserecError(f"{path}: not a per-query ranks file (missing {', '.join(missing)})")
            arrays = {k: z[k] for k in keys}
    except RaserecError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, pickle-refusal and format errors alike: a bad file
        raise RaserecError(f"{path}: unreadable ranks file ({type(exc).__name__}: {exc})") from exc
    # One integer per query in every column, ranks >= 0, and a scalar query count.
    columns = {k: a for k, a in arrays.items() if k != "queries_total"}
    for key, a in columns.items():
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise RaserecError(f"{path}: {key} must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    if not all(len(a) for a in columns.values()):
        raise RaserecError(f"{path}: no test queries in it")
    if len({len(a) for a in columns.values()}) > 1:
        raise RaserecError(f"{path}: columns of different lengths "
                           f"({', '.join(f'{k} {len(a)}' for k, a in columns.items())})")
    for key in set(columns) & {"rank", *_RAFT_FILE_COLUMNS.values()}:
        if columns[key].min() < 0:
            raise RaserecError(f"{path}: {key} holds negative ranks")
    if "queries_total" in arrays:
        total = arrays["queries_total"]
        if total.ndim != 0 or not np.issubdtype(total.dtype, np.integer) or int(total) < len(arrays["rank"]):
            raise RaserecError(f"{path}: queries_total must be an integer >= the {len(arrays['rank'])} rows, "
                               f"got {total.tolist()!r}")
    return arrays


def compare(base: Side, other: Side, seeds: list[int] | None = None) -> dict[str, Any]:
    """Paired tests of ``other`` against ``base`` on every seed both have ranks for (or on
    ``seeds``, each of which must have them on both sides)."""
    start = time.perf_counter()
    candidates = sorted(set(base.seeds()) & set(other.seeds())) if seeds is None else sorted(set(seeds))
    loaded = {s: (base.ranks(s), other.ranks(s)) for s in candidates}  # each file read once
    if seeds is None:
        candidates = [s for s, (a, b) in loaded.items() if a is not None and b is not None]
    if not candidates:
        raise RaserecError(f"{base.label} and {other.label} have no seed with per-query test ranks in common "
                           f"(seed_<s>/ranks_test.npz or seed_<s>/<stage>.ranks_test.npz)")
    per_seed: dict[str, Any] = {}
    for seed in candidates:
        a, b = loaded[seed]
        for side, ranks in ((base, a), (other, b)):
            if ranks is None:
                raise RaserecError(f"{side.label}: seed {seed} has no per-query test ranks")
        assert a is not None and b is not None
        for ranks in (a, b):
            if not ranks.complete:
                raise RaserecError(f"{ranks.source} covers only {len(ranks.rank)} test queries (a test pass limited "
                                   "by trainer.limit_test_batches?); re-test on all of them")
        if not a.same_queries(b):
            raise RaserecError(f"seed {seed}: {a.source} and {b.source} did not rank the same test queries "
                               f"({len(a.rank)} vs {len(b.rank)}; other data, or a limited test pass?)")
        per_seed[str(seed)] = {"base": metrics_from_ranks(a.rank, (5, 10, 20)),
                               "other": metrics_from_ranks(b.rank, (5, 10, 20)), "queries": len(a.rank),
                               "paired_test": paired_tests(a.rank, b.rank), "sources": [a.source, b.source]}
    base_mean, other_mean = (_mean([e[side] for e in per_seed.values()]) for side in ("base", "other"))
    return {
        "command": "",
        "hardware": hardware(),
        "dataset": _dataset(other.directory),
        "model": f"{other.label} vs {base.label}, same test queries per seed",
        "base": base.label,
        "other": other.label,
        "seeds": candidates,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "metrics": {f"test/{k}": v for k, v in other_mean.items()},
        "base_metrics": {f"test/{k}": v for k, v in base_mean.items()},
        "relative_change_pct": {f"test/{k}": 100.0 * (other_mean[k] - base_mean[k]) / base_mean[k]
                                for k in other_mean if base_mean[k]},
        "paired_test_per_seed": per_seed,
        "paired_test_across_seeds": across_seeds([m["base"] for m in per_seed.values()],
                                                 [m["other"] for m in per_seed.values()]),
        "notes": ("per seed: two-sided paired t-test and Wilcoxon signed-rank test over the test queries "
                  f"({', '.join(TEST_KEYS)}); across seeds (2 or more): paired t-test over the seed means. "
                  f"Models trained on: {_trained_on(base.directory, other.directory, candidates)}"),
    }


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _dataset(directory: Path) -> str:
    summary = directory / "summary.json"
    return str(read_json_object(summary).get("dataset", "")) if summary.is_file() else ""


def _trained_on(base: Path, other: Path, seeds: list[int]) -> str:
    records = [read_json_object(p) for d in (base, other) for s in seeds for stage in COLUMNS
               if (p := d / f"seed_{s}" / f"{stage}.json").is_file()]
    return all_hardware(records) or "unknown"


def default_output(base: Side, other: Side) -> Path:
    """``OTHER/vs_<base>[_<base column>][_<other column>].json``."""
    suffix = f"_{other.column}" if other.column else ""
    base_name = base.name + (f"_{base.column}" if base.column else "")
    return other.directory / f"vs_{base_name}{suffix}.json"


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="raserec compare",
        description="Paired significance tests between two experiments on the same test queries, seed by seed. "
                    "EXP is an experiment directory (results/<name>), optionally EXP:pretrain or EXP:finetune "
                    "(default: its last stage).")
    parser.add_argument("base", help="the reference experiment, e.g. results/beauty_raserec")
    parser.add_argument("other", help="the experiment tested against it, e.g. results/beauty_semkeys_raserec")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to compare (default: every seed both have)")
    parser.add_argument("--out", type=Path, help="output JSON (default: OTHER/vs_<base>.json)")
    args = parser.parse_args(argv)
    base, other = Side.parse(args.base), Side.parse(args.other)
    out = check_output_file(args.out or default_output(base, other), "comparison file", (".json",))
    record = compare(base, other, args.seeds)
    record["command"] = "raserec compare " + " ".join(argv)
    lines = [f"seed {seed}: " + "; ".join(
        f"{k} {entry['base'][k]:.4f} -> {entry['other'][k]:.4f} (p_t {_p(entry['paired_test'][k]['p_ttest'])}, "
        f"p_w {_p(entry['paired_test'][k]['p_wilcoxon'])})" for k in TEST_KEYS)
        for seed, entry in record["paired_test_per_seed"].items()]
    write_results(out, record)
    print("\n".join([*lines, f"wrote {out}"]))
    return 0


def _p(value: float | None) -> str:
    """A p-value for the terminal (``n/a`` where the test is undefined, e.g. no difference at all)."""
    return "n/a" if value is None else f"{value:.3g}"
