"""Generate the README results tables from ``results/*.json`` (never typed by hand).

    python -m raserec.results_table --write README.md   # rewrite the marked block in place
    python -m raserec.results_table                     # print the tables
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raserec.evaluation.metrics import relative_change_pct
from raserec.experiments.plan import queue_table
from raserec.paper import ADA as ADA_PAPER
from raserec.paper import RASEREC as PAPER

START, END = "<!-- results:start -->", "<!-- results:end -->"
QUALITY_KEYS = ["test/HR@5", "test/NDCG@5", "test/HR@10", "test/NDCG@10", "test/HR@20", "test/NDCG@20"]

def mean_std(metrics: dict, key: str, with_std: bool = False) -> str:
    """``test/<key>`` of ``metrics`` as ``0.1234`` (or ``0.1234 ± 0.0012``); empty if absent."""
    value = metrics.get(f"test/{key}")
    if value is None:
        return ""
    std = metrics.get(f"test/{key}_std")
    return f"{value:.4f} ± {std:.4f}" if with_std and std is not None else f"{value:.4f}"


def relative_gain(new: float | None, old: float | None) -> str:
    """``+1.2%``: the change from ``old`` to ``new``; empty if either is missing or ``old`` is 0."""
    return "" if new is None or not old else f"{relative_change_pct(new, old):+.1f}%"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def load(results_dir: Path) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(results_dir.glob("*.json"))]


def quality_table(results: list[tuple[str, dict]]) -> str:
    head = "| dataset | model | " + " | ".join(k.removeprefix("test/") for k in QUALITY_KEYS) + \
        " | seeds | epochs | wall time | hardware | command | file |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = [(r["dataset"], name, r) for name, r in results
            if any(k in r.get("metrics", {}) for k in QUALITY_KEYS) and "base/test/HR@50" not in r["metrics"]
            and "encoder_metrics" not in r]  # two-stage experiments have their own table
    for dataset, name, r in sorted(rows):
        m = r["metrics"]
        cells = [_fmt(m.get(k)) for k in QUALITY_KEYS]
        lines.append(f"| {dataset} | {r['model']} | " + " | ".join(cells) +
                     f" | {', '.join(map(str, r.get('seeds', [])))} | {r.get('epochs', '')} | "
                     f"{r.get('wall_time_s', 0):.0f} s | {r.get('hardware', '')} | `{r['command']}` | {name} |")
    for (dataset, model), figures in PAPER.items():
        cells = [dataset, model, *(_fmt(figures.get(k)) for k in QUALITY_KEYS), "5 (paper)", "", "", "",
                 "published figure", "../shared/REFERENCE.md"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ADA_KEYS = ["test/HR@20", "test/NDCG@20", "test/HR@50", "test/NDCG@50", "base/test/HR@50", "base/test/NDCG@50"]


def ada_table(results: list[tuple[str, dict]]) -> str:
    head = ("| dataset | model | " + " | ".join(ADA_KEYS) +
            " | HR@50 gain over base | NDCG@50 gain over base | history masked | command | file |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results:
        if "base/test/HR@50" not in r.get("metrics", {}):
            continue
        masked = (r.get("config") or {}).get("model", {}).get("init_args", {}).get("mask_history", "")
        m = r["metrics"]
        cells = [_fmt(m.get(k)) for k in ADA_KEYS]
        cells += [relative_gain(m.get("test/HR@50"), m.get("base/test/HR@50")), relative_gain(m.get("test/NDCG@50"), m.get("base/test/NDCG@50"))]
        lines.append(f"| {r['dataset']} | {r['model']} | " + " | ".join(cells) + f" | {masked} | `{r['command']}` | {name} |")
    for dataset, (h50, n50, bh50, bn50) in ADA_PAPER.items():
        lines.append(f"| {dataset} | Ada-Retrieval, SASRec (paper) |  |  | {h50:.4f} | {n50:.4f} | {bh50:.4f} | "
                     f"{bn50:.4f} | {relative_gain(h50, bh50)} | {relative_gain(n50, bn50)} |  | published figure | ../shared/REFERENCE.md |")
    return "\n".join(lines)


def bench_table(results: list[tuple[str, dict]]) -> str:
    lines = ["| benchmark | figures | targets | hardware | command |", "|---|---|---|---|---|"]
    for name, r in results:
        if any(k in r.get("metrics", {}) for k in QUALITY_KEYS) or name == "robustness.json":
            continue
        figures = ", ".join(f"{k} = {v}" for k, v in r.get("metrics", {}).items())
        targets = ", ".join(f"{k} <= {v}" for k, v in r.get("targets", {}).items())
        lines.append(f"| {name} | {figures} | {targets} | {r.get('hardware', '')} | `{r['command']}` |")
    return "\n".join(lines)


EXPERIMENT_KEYS = ["HR@5", "NDCG@5", "HR@10", "NDCG@10"]


def _gains(new: dict, old: dict) -> str:
    return " | ".join(relative_gain(new.get(f"test/{k}"), old.get(f"test/{k}")) for k in EXPERIMENT_KEYS)


def finetune_label(summary: dict) -> str:
    """The row name of an experiment's stage-2 model: plain RAFT is "ours: RaSeRec"; a variant
    (semantic memory keys, an ablation) is named by its results ``model``."""
    plain = (summary.get("finetune_class") or "").rsplit(".", 1)[-1] in ("RAFTModule", "") and \
        summary.get("model", "").startswith("RaSeRec (RAFT")
    return "ours: RaSeRec" if plain else f"ours: {summary['model']}"


def _schedule(s: dict) -> str:
    """How an experiment's stages ended: from the per-seed records where they say it (records made
    since they carry ``schedule``), else from the command (older records)."""
    if "cpu_short" in s["command"]:
        return "CPU short (configs/cpu_short.yaml): smoke test, not a result"
    said = [v for e in s["per_seed"] for v in (e.get("schedule") or {}).values() if v]
    if not all(v.startswith("converged") for v in said):
        return "not converged in every stage and seed (see the records' schedule): not a result"
    return "converged: both stages to early stopping (patience 10)"


def experiments_table(results_dir: Path) -> str:
    """Ours (mean ± std over seeds) next to the paper, from ``results/<experiment>/summary.json``."""
    head = ("| dataset | backbone | row | " + " | ".join(EXPERIMENT_KEYS) +
            " | seeds | epochs (stage 1 + 2) | schedule | wall time | hardware | command |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    # Converged runs (the configs' own schedule, early stopping) first; CPU-short smoke tests after.
    summaries = sorted(results_dir.glob("*/summary.json"), key=lambda p: ("cpu_short" in p.parent.name, p.name))
    for path in summaries:
        s = json.loads(path.read_text())
        if "finetune" not in s:  # a one-stage experiment: its results file is a row of the quality table
            continue
        if s.get("base_same_protocol") or "test/NDCG@10" not in s["finetune"]:
            continue  # Ada-Retrieval's top-50 protocol: the Ada table shows it
        seeds = ", ".join(map(str, s["seeds"]))
        epochs = ", ".join(f"{e['epochs']['pretrain']} + {e['epochs']['finetune']}" for e in s["per_seed"])
        schedule = _schedule(s)
        common = f" | {seeds} | {epochs} | {schedule} | {s['wall_time_s']:.0f} s | {s['hardware']} | `{s['command']}` |"
        rows = [("ours: pre-trained encoder", s["encoder"]), (finetune_label(s), s["finetune"])]
        for label, m in rows:
            lines.append(f"| {s['dataset']} | {s['backbone']} | {label} | " +
                         " | ".join(mean_std(m, k, len(s["seeds"]) > 1) for k in EXPERIMENT_KEYS) + common)
        lines.append(f"| {s['dataset']} | {s['backbone']} | ours: gain over encoder | " +
                     _gains(s["finetune"], s["encoder"]) + " | | | | | | |")
        for name, m in s["paper"].items():
            lines.append(f"| {s['dataset']} | {s['backbone']} | {name} | " + " | ".join(mean_std(m, k) for k in EXPERIMENT_KEYS)
                         + " | 5 runs | | | | | published figure |")
        if len(s["paper"]) == 2:
            enc, tuned = s["paper"].values()
            lines.append(f"| {s['dataset']} | {s['backbone']} | paper: gain | " + _gains(tuned, enc) + " | | | | | | |")
    return "\n".join(lines)


SEMANTIC_KEYS = ["HR@10", "NDCG@10", "HR@20", "NDCG@20"]
#: Single-run files of the semantic comparison, by name: ``<dataset>_<method>.json``.
SEMANTIC_METHODS = ("sasrec", "sracl", "grasp")


def semantic_table(results_dir: Path) -> str:
    """SASRec, SASRec + SRA-CL, SASRec + GRASP and RaSeRec per dataset, each with its gain over
    the same SASRec run (the papers used LLM text and other protocols: compare gains, not levels)."""
    rows: dict[str, list[tuple[str, dict, tuple[int, ...], str]]] = {}
    for path in sorted(results_dir.glob("*.json")):
        # <dataset>_<method>.json, or a variant of a method as <dataset>_<method>_<variant>.json
        parts = path.stem.split("_")
        if not 2 <= len(parts) <= 3 or parts[1] not in SEMANTIC_METHODS:
            continue
        if parts[1] == "sasrec" and len(parts) == 3:
            continue  # another SASRec (e.g. beauty_sasrec_bce), not a semantic method: the single-runs table
        prefix = parts[0]
        r = json.loads(path.read_text())
        if "cpu_short" in r.get("command", "") or "not converged" in r.get("notes", ""):
            continue  # converged runs only, as the RaSeRec rows below
        rows.setdefault(prefix, []).append((r["model"], r["metrics"], tuple(r.get("seeds", [])), path.name))
    for prefix in list(rows):
        # RaSeRec and its variants on the SASRec backbone (e.g. semantic memory keys), converged runs only
        for summary in sorted(results_dir.glob(f"{prefix}_*raserec/summary.json")):
            s = json.loads(summary.read_text())
            if "finetune" not in s or s.get("backbone") != "sasrec" or "cpu_short" in s.get("command", ""):
                continue
            name = s.get("model") if summary.parent.name != f"{prefix}_raserec" else ""
            label = name or "RaSeRec (pre-training + RAFT, collaborative retrieval)"
            rows[prefix].append((label, s["finetune"], tuple(s["seeds"]), f"{summary.parent.name}/summary.json"))
    head = ("| dataset | model (text source + encoder) | " + " | ".join(SEMANTIC_KEYS) +
            " | NDCG@10 vs SASRec | HR@20 vs SASRec | seeds | file |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for prefix, entries in sorted(rows.items()):
        base, base_seeds = next(((m, seeds) for model, m, seeds, name in entries if name == f"{prefix}_sasrec.json"),
                                (None, None))
        for model, m, seeds, name in sorted(entries, key=lambda e: e[3] != f"{prefix}_sasrec.json"):
            gains = ["", ""] if base is None or name == f"{prefix}_sasrec.json" else [
                relative_gain(m.get(f"test/{k}"), base.get(f"test/{k}")) for k in ("NDCG@10", "HR@20")]
            if base is not None and set(seeds) != set(base_seeds) and name != f"{prefix}_sasrec.json":
                # means over other seeds than SASRec's: a seed's split and init are not paired
                gains = [f"{g} (SASRec seeds {_seeds(base_seeds)})" if g else g for g in gains]
            lines.append(f"| {prefix.capitalize()} | {model} | " +
                         " | ".join(mean_std(m, k, len(seeds) > 1) for k in SEMANTIC_KEYS) +
                         f" | {gains[0]} | {gains[1]} | {_seeds(seeds)} | {name} |")
    return "\n".join(lines)


def _seeds(seeds: tuple[int, ...]) -> str:
    return ", ".join(map(str, seeds))


def cost_table(results_dir: Path) -> str:
    """What a converged run cost, per experiment and stage: epochs, wall time and seconds per
    epoch (training + validation) on the recorded hardware, to plan runs on a CPU. A stage taken
    from another experiment (``--stage1-from``) cost nothing and is left out; wall times of runs
    resumed on another machine span both (see each record's notes)."""
    lines = ["| experiment | dataset | stage | seeds | epochs | wall time per seed | s per epoch | hardware |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*/summary.json")):
        s = json.loads(path.read_text())
        if "cpu_short" in s.get("command", "") or "per_seed" not in s:
            continue
        stages = ("pretrain", "finetune") if "finetune" in s else (None,)
        hardware = ", ".join(sorted({e.get("hardware") or s["hardware"] for e in s["per_seed"]}))
        for stage in stages:
            # An adopted stage 1 is recorded with wall time 0, so it drops out here.
            runs = []
            for e in s["per_seed"]:
                n, w = (e["epochs"][stage], e["wall_time_s"][stage]) if stage else (e.get("epochs"), e.get("wall_time_s"))
                if n and w:
                    runs.append((int(n), float(w)))
            if not runs:
                continue
            per_epoch = [w / n for n, w in runs]
            lines.append(f"| {path.parent.name} | {s['dataset']} | {stage or 'single stage'} | {len(runs)} | "
                         f"{', '.join(str(n) for n, _ in runs)} | "
                         f"{sum(w for _, w in runs) / len(runs) / 3600:.2f} h | "
                         f"{sum(per_epoch) / len(per_epoch):.0f} | {hardware} |")
    return "\n".join(lines)


def paired_table(results_dir: Path) -> str:
    """Every ``raserec compare`` record (``results/<experiment>/vs_*.json``): the relative change of
    the means and, per seed, the paired t-test's p-value, for NDCG@10 and HR@10."""
    lines = ["| comparison | dataset | seeds | NDCG@10 | p per seed (NDCG@10) | HR@10 | p per seed (HR@10) | "
             "p across seeds (NDCG@10) | file | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*/vs_*.json")):
        r = json.loads(path.read_text())
        per_seed = r.get("paired_test_per_seed", {})
        if not per_seed or "paired_test" not in next(iter(per_seed.values())):
            continue  # not a raserec compare record
        base, other = r.get("base_metrics", {}), r.get("metrics", {})
        p_ndcg, p_hr = (", ".join(f"{e['paired_test'][key]['p_ttest']:.2g}" for e in per_seed.values())
                        for key in ("NDCG@10", "HR@10"))
        across = r.get("paired_test_across_seeds", {}).get("NDCG@10")
        p_across = f"{across['p_ttest']:.2g}" if across else ""
        lines.append(
            f"| {r['other']} vs {r['base']} | {r.get('dataset', '')} | "
            f"{', '.join(map(str, r['seeds']))} | "
            f"{_fmt(base.get('test/NDCG@10'))} -> {_fmt(other.get('test/NDCG@10'))} "
            f"({relative_gain(other.get('test/NDCG@10'), base.get('test/NDCG@10'))}) | {p_ndcg} | "
            f"{_fmt(base.get('test/HR@10'))} -> {_fmt(other.get('test/HR@10'))} "
            f"({relative_gain(other.get('test/HR@10'), base.get('test/HR@10'))}) | {p_hr} | "
            f"{p_across} | {path.relative_to(results_dir.parent)} | "
            f"`{r.get('command', '')}` |")
    return "\n".join(lines)


def analyses_table(results_dir: Path) -> str:
    lines = ["| analysis | dataset | model | model checkpoint | wall time | hardware | command | files |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("analysis/*/*.json")):
        r = json.loads(path.read_text())
        stem = Path(results_dir.name) / path.with_suffix("").relative_to(results_dir)
        lines.append(f"| {r.get('analysis', stem.name)} | {r.get('dataset', '')} | {r.get('notes', '')} | "
                     f"{r.get('checkpoint', '')} | {r.get('wall_time_s', 0):.0f} s | {r.get('hardware', '')} | "
                     f"`{r.get('command', '')}` | {stem}.csv, .png |")
    return "\n".join(lines)


def robustness_table(results_dir: Path) -> str:
    path = results_dir / "robustness.json"
    if not path.is_file():
        return "(no results/robustness.json yet: run `python -m tests.robustness`)"
    r = json.loads(path.read_text())
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in r["metrics"].items()]
    groups: dict[str, int] = {}
    for case in r.get("cases", []):
        groups[case["group"]] = groups.get(case["group"], 0) + 1
    lines.append("| cases by kind | " + ", ".join(f"{g} {n}" for g, n in groups.items()) + " |")
    return "\n".join(lines) + f"\n\nCommand: `{r['command']}` ({r['hardware']}, {r['wall_time_s']:.0f} s)."


def render(results_dir: Path) -> str:
    results = load(results_dir)
    return (f"{START}\n### Experiments: ours (mean ± std over seeds) vs the paper\n\n"
            f"Made by `raserec experiment` / `make reproduce`; per-seed files, paired tests and configs in "
            f"`results/<experiment>/`.\n\n{experiments_table(results_dir)}\n\n"
            f"### Semantic methods vs the same SASRec (test set, full ranking)\n\n{semantic_table(results_dir)}\n\n"
            f"### Paired comparisons (`raserec compare`, per-query tests on the same test queries)\n\n"
            f"{paired_table(results_dir)}\n\n"
            f"### Single runs (test set, full ranking)\n\n{quality_table(results)}\n\n"
            f"### Ada-Retrieval (top-50 lists)\n\n{ada_table(results)}\n\n"
            f"### Analyses (`raserec analyze`)\n\n{analyses_table(results_dir)}\n\n"
            f"### Speed benchmarks\n\n{bench_table(results)}\n\n"
            f"### What a converged run costs (per seed, from the experiments' records)\n\n{cost_table(results_dir)}\n\n"
            f"### Reproduction queue (`raserec/experiments/plan.py`)\n\n{queue_table(results_dir)}\n\n"
            f"### Robustness (bad inputs, `tests/robustness.py`)\n\n{robustness_table(results_dir)}\n{END}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--write", type=Path, help="file whose marked block is replaced")
    args = parser.parse_args()
    block = render(args.results)
    if args.write is None:
        print(block)
        return
    text = args.write.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {args.write} has no {START} ... {END} block")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    args.write.write_text(before + block + after)


if __name__ == "__main__":
    main()
