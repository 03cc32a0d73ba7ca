"""Summaries of an experiment directory: mean +- std over seeds, paired significance tests between
the fine-tuned model and its own pre-trained encoder, and the paper's rows beside ours.

Writes ``results/<name>/summary.json``, ``results/<name>/summary.md`` and the results-file
``results/<name>.json`` (the README table reads the latter)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from raserec.errors import read_json_object
from raserec.evaluation.per_query import per_query_metrics
from raserec.paper import ADA, PAIRS, RASEREC
from raserec.results import write_results
from raserec.results_table import finetune_label, mean_std, relative_gain

KEYS = ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "HR@50", "NDCG@50"]
#: Metrics of the paired tests (per query within a seed; over seed means across seeds).
TEST_KEYS = ["HR@10", "NDCG@10", "NDCG@5"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def paired_tests(base: np.ndarray, tuned: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Two-sided paired t-test and Wilcoxon signed-rank test per metric over the queries of one
    seed (the same test queries ranked by both models)."""
    pb, pt = per_query_metrics(base, (5, 10)), per_query_metrics(tuned, (5, 10))
    out: dict[str, dict[str, float | None]] = {}
    for key in TEST_KEYS:
        diff = pt[key] - pb[key]
        t = stats.ttest_rel(pt[key], pb[key]) if np.any(diff != 0) else None
        w = stats.wilcoxon(pt[key], pb[key]) if np.count_nonzero(diff) > 0 else None
        out[key] = {
            "mean_diff": float(diff.mean()),
            "t": _finite(t.statistic) if t else None,
            "p_ttest": _finite(t.pvalue) if t else 1.0,
            "p_wilcoxon": _finite(w.pvalue) if w else 1.0,
            "queries_better": int((diff > 0).sum()),
            "queries_worse": int((diff < 0).sum()),
        }
    return out


def across_seeds(base: list[dict[str, float]], tuned: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Paired t-test of ``tuned`` against ``base`` over the seeds' means (one value per seed and
    model, in :func:`paired_tests`' order); empty for one seed."""
    across: dict[str, dict[str, float | None]] = {}
    if len(tuned) > 1:
        for k in TEST_KEYS:
            a, b = [m[k] for m in tuned], [m[k] for m in base]
            t = stats.ttest_rel(a, b) if not np.allclose(a, b) else None
            across[k] = {"mean_diff": float(np.mean(np.subtract(a, b))),
                         "t": _finite(t.statistic) if t else None, "p_ttest": _finite(t.pvalue) if t else 1.0}
    return across


class NoFinishedSeed(ValueError):
    """No seed of the experiment has finished every stage yet: nothing to summarize."""


def all_hardware(per_seed: list[dict[str, Any]]) -> str:
    """Every machine the seeds ran on, in seed order, each once (seeds of one experiment often
    run in different sessions, on different machines)."""
    return ", ".join(dict.fromkeys(str(e["hardware"]) for e in per_seed if e.get("hardware")))


def _stage(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _aggregate(per_seed: list[dict[str, Any]], model: str) -> dict[str, float]:
    """``test/<k>`` means over the seeds of ``per_seed[i][model]``, with ``_std`` beside each where
    there are several seeds."""
    out: dict[str, float] = {}
    for k in KEYS:
        values = [e[model][k] for e in per_seed if e[model].get(k) is not None]
        if values:
            out[f"test/{k}"], std = _mean_std(values)
            if len(values) > 1:
                out[f"test/{k}_std"] = std
    return out


def summarize(spec) -> dict[str, Any]:
    """Collect the finished seeds of ``spec`` (an :class:`ExperimentSpec`) and write the summaries."""
    if spec.finetune is None:
        return summarize_single(spec)
    seeds, per_seed = [], []
    for seed in spec.seeds:
        pre, fine = _stage(spec.stage_results(seed, "pretrain")), _stage(spec.stage_results(seed, "finetune"))
        if not pre or not fine:
            continue
        entry: dict[str, Any] = {
            "seed": seed,
            "encoder": {k: pre["metrics"].get(f"test/{k}") for k in KEYS},
            "finetune": {k: fine["metrics"].get(f"test/{k}") for k in KEYS},
            "base_same_protocol": {k: fine["metrics"][f"base/test/{k}"] for k in KEYS
                                   if f"base/test/{k}" in fine["metrics"]},
            "epochs": {"pretrain": pre.get("epochs"), "finetune": fine.get("epochs")},
            # A stage 1 taken from another experiment (--stage1-from) cost this one nothing.
            "wall_time_s": {"pretrain": 0.0 if pre.get("adopted_from") else pre.get("wall_time_s"),
                            "finetune": fine.get("wall_time_s")},
            "stage1_from": pre.get("adopted_from"),
            "schedule": {"pretrain": pre.get("schedule"), "finetune": fine.get("schedule")},
            "commands": {"pretrain": pre.get("command"), "finetune": fine.get("command")},
            "hardware": fine.get("hardware") or pre.get("hardware"),
        }
        ranks_path = spec.ranks_file(seed)
        if ranks_path.is_file():
            ranks = np.load(ranks_path)
            entry["paired_test"] = paired_tests(ranks["encoder"], ranks["finetune"])
        seeds.append(seed)
        per_seed.append(entry)
    if not per_seed:
        raise NoFinishedSeed(f"{spec.name}: no seed has finished both stages yet")
    first_fine = _stage(spec.stage_results(seeds[0], "finetune"))
    dataset = spec.dataset or first_fine.get("dataset") or ""

    encoder, tuned = _aggregate(per_seed, "encoder"), _aggregate(per_seed, "finetune")
    # Ada-Retrieval: the frozen pre-trained backbone scored on the fine-tuned model's own protocol
    # (its plain top-100 list), as ``base/test/<k>`` beside the model's metrics.
    base_same_protocol = _aggregate(per_seed, "base_same_protocol")
    base = {f"base/{k}": v for k, v in base_same_protocol.items()}
    across = across_seeds([e["encoder"] for e in per_seed], [e["finetune"] for e in per_seed])
    paper_names = PAIRS.get((dataset, spec.backbone))
    paper = {name: RASEREC[(dataset, name)] for name in paper_names} if paper_names else {}
    if base:  # Ada-Retrieval (top-50 protocol): its own paper's SASRec rows, never RaSeRec's
        paper = {}
        if spec.backbone == "sasrec" and dataset in ADA:
            h50, n50, bh50, bn50 = ADA[dataset]
            paper = {"SASRec (Ada-Retrieval paper)": {"test/HR@50": bh50, "test/NDCG@50": bn50},
                     "Ada-Retrieval, SASRec (paper)": {"test/HR@50": h50, "test/NDCG@50": n50}}
    wall = sum(float(v or 0) for e in per_seed for v in e["wall_time_s"].values())
    summary = {
        "name": spec.name,
        "dataset": dataset,
        "backbone": spec.backbone,
        "seeds": seeds,
        "seeds_requested": list(spec.seeds),
        "encoder": encoder,
        "finetune": tuned,
        "base_same_protocol": base_same_protocol,
        "paired_test_across_seeds": across,
        "paper": paper,
        "per_seed": per_seed,
        "wall_time_s": round(wall, 1),
        "hardware": all_hardware(per_seed),
        "command": spec.command,
        "notes": _notes(first_fine.get("notes", ""), per_seed, TWO_STAGE_NOTES),
        "model": first_fine.get("model", ""),
        "finetune_class": ((first_fine.get("config") or {}).get("model") or {}).get("class_path", ""),
    }
    spec.out.mkdir(parents=True, exist_ok=True)
    write_results(spec.out / "summary.json", summary)
    (spec.out / "summary.md").write_text(markdown(summary))
    record = {
        "command": spec.command,
        "hardware": summary["hardware"],
        "dataset": dataset,
        "model": summary["model"] or spec.name,
        "seeds": seeds,
        "wall_time_s": summary["wall_time_s"],
        "epochs": ", ".join(f"{e['epochs']['pretrain']}+{e['epochs']['finetune']}" for e in per_seed),
        "notes": summary["notes"],
        "metrics": {**tuned, **base},
        "encoder_metrics": encoder,
        "paired_test_across_seeds": across,
        "paired_test_per_seed": {str(e["seed"]): e.get("paired_test") for e in per_seed},
        "experiment_dir": str(spec.out),
        "config": first_fine.get("config"),  # stage 2's resolved config (first seed; the others differ in seed)
    }
    write_results(spec.results_dir / f"{spec.name}.json", record)
    return summary


def _notes(first_notes: str, per_seed: list[dict[str, Any]],
           parts: Sequence[tuple[str, Callable[[dict[str, Any]], str | None], bool]]) -> str:
    """The first seed's notes (which end with its schedule), then, per seed and per ``(label,
    schedule getter, always)`` part, that schedule: always, or only where it differs from the
    first seed's."""
    extra = []
    for e in per_seed:
        for label, get, always in parts:
            sched = get(e)
            if sched and (always or (e is not per_seed[0] and sched != get(per_seed[0]))):
                extra.append(f"seed {e['seed']} {label}{sched}")
    return "; ".join(n for n in (first_notes, *extra) if n)


#: Two-stage summaries: every seed's stage-1 schedule, and stage-2 schedules unlike the first seed's.
TWO_STAGE_NOTES = (("stage 1 ", lambda e: e["schedule"]["pretrain"], True),
                   ("stage 2 ", lambda e: e["schedule"]["finetune"], False))
#: One-stage summaries: the schedules unlike the first seed's.
ONE_STAGE_NOTES = (("", lambda e: e["schedule"], False),)


def summarize_single(spec) -> dict[str, Any]:
    """The summaries of a one-stage experiment (no ``finetune``): the stage's test metrics, mean
    +- std over the finished seeds."""
    per_seed = []
    for seed in spec.seeds:
        res = _stage(spec.stage_results(seed, "pretrain"))
        if res:
            per_seed.append({"seed": seed, "model": {k: res["metrics"].get(f"test/{k}") for k in KEYS},
                             "epochs": res.get("epochs"), "wall_time_s": res.get("wall_time_s"),
                             "command": res.get("command"), "hardware": res.get("hardware"),
                             "model_name": res.get("model", ""), "notes": res.get("notes", ""),
                             "schedule": res.get("schedule"),
                             "dataset": res.get("dataset", "")})
    if not per_seed:
        raise NoFinishedSeed(f"{spec.name}: no seed has finished yet")
    seeds = [e["seed"] for e in per_seed]
    metrics = _aggregate(per_seed, "model")
    first = per_seed[0]
    summary = {
        "name": spec.name, "dataset": spec.dataset or first["dataset"], "backbone": spec.backbone,
        "seeds": seeds, "seeds_requested": list(spec.seeds), "metrics": metrics, "per_seed": per_seed,
        "wall_time_s": round(sum(float(e["wall_time_s"] or 0) for e in per_seed), 1),
        "hardware": all_hardware(per_seed), "command": spec.command, "model": first["model_name"],
        "notes": _notes(first["notes"], per_seed, ONE_STAGE_NOTES),
    }
    spec.out.mkdir(parents=True, exist_ok=True)
    write_results(spec.out / "summary.json", summary)
    keys = KEYS[:4]
    lines = [f"# {spec.name}: {summary['dataset']}, {summary['model'] or spec.name}", "",
             f"Seeds {', '.join(map(str, seeds))} (of {len(spec.seeds)} requested); total wall time "
             f"{summary['wall_time_s']:.0f} s on {summary['hardware']}.", "",
             *([f"Notes: {summary['notes']}", ""] if summary["notes"] else []),
             "| seed | " + " | ".join(keys) + " | epochs | wall time |", "|---" * (len(keys) + 3) + "|"]
    for e in per_seed:
        lines.append(f"| {e['seed']} | " + " | ".join(_f(e["model"].get(k)) for k in keys)
                     + f" | {e['epochs']} | {float(e['wall_time_s'] or 0):.0f} s |")
    lines.append("| mean | " + " | ".join(mean_std(metrics, k, len(seeds) > 1) for k in keys) + " | | |")
    lines += ["", f"Command: `{spec.command}`", "", f"Stage command of the first seed: `{first['command']}`", ""]
    (spec.out / "summary.md").write_text("\n".join(lines))
    write_results(spec.results_dir / f"{spec.name}.json", {
        "command": spec.command, "hardware": summary["hardware"], "dataset": summary["dataset"],
        "model": summary["model"] or spec.name, "seeds": seeds, "wall_time_s": summary["wall_time_s"],
        "epochs": ", ".join(str(e["epochs"]) for e in per_seed), "notes": summary["notes"], "metrics": metrics,
        "experiment_dir": str(spec.out)})
    return summary


def _gain(new: dict[str, float], old: dict[str, float], k: str) -> str:
    return relative_gain(new.get(f"test/{k}"), old.get(f"test/{k}"))


def markdown(s: dict[str, Any]) -> str:
    # Ada-Retrieval (it alone has a base scored on its own protocol) is measured on its top-50
    # lists (HR/NDCG@20, @50) against that base; RaSeRec on @5 and @10 against its encoder.
    ada = bool(s.get("base_same_protocol"))
    keys = KEYS[4:] if ada else KEYS[:4]
    lines = [f"# {s['name']}: {s['dataset']}, {s['backbone']} backbone", "",
             f"Seeds {', '.join(map(str, s['seeds']))} (of {len(s['seeds_requested'])} requested); "
             f"total wall time {s['wall_time_s']:.0f} s on {s['hardware']}.", ""]
    if s["notes"]:
        lines += [f"Notes: {s['notes']}", ""]
    lines += ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    multi = len(s["seeds"]) > 1
    encoder, enc_label = ((s["base_same_protocol"], "ours: frozen pre-trained backbone, same protocol")
                          if ada else (s["encoder"], "ours: pre-trained encoder"))
    lines.append(f"| {enc_label} | " + " | ".join(mean_std(encoder, k, multi) for k in keys) + " |")
    lines.append(f"| {finetune_label(s)} | " + " | ".join(mean_std(s["finetune"], k, multi) for k in keys) + " |")
    lines.append("| ours: gain over encoder | " + " | ".join(_gain(s["finetune"], encoder, k) for k in keys) + " |")
    names = list(s["paper"])
    for name in names:
        lines.append(f"| {name} | " + " | ".join(mean_std(s["paper"][name], k) for k in keys) + " |")
    if len(names) == 2:
        paper_enc, paper_tuned = s["paper"][names[0]], s["paper"][names[1]]
        lines.append("| paper: gain | " + " | ".join(_gain(paper_tuned, paper_enc, k) for k in keys) + " |")
    if not any(e.get("paired_test") for e in s["per_seed"]):
        lines += ["", "No per-query ranks were saved: no paired tests."]
    else:
        lines += ["", "## Paired significance tests (fine-tuned model vs its own pre-trained encoder)", "",
                  "Per seed, over the test queries (two-sided paired t-test and Wilcoxon signed-rank):", "",
                  "| seed | metric | mean diff | queries better / worse | p (t-test) | p (Wilcoxon) |",
                  "|---|---|---|---|---|---|"]
    for e in s["per_seed"]:
        for k, t in (e.get("paired_test") or {}).items():
            lines.append(f"| {e['seed']} | {k} | {t['mean_diff']:+.5f} | {t['queries_better']} / {t['queries_worse']} | "
                         f"{_p(t['p_ttest'])} | {_p(t['p_wilcoxon'])} |")
    if s["paired_test_across_seeds"]:
        lines += ["", "Across seeds (paired t-test over the per-seed means):", "",
                  "| metric | mean diff | p (t-test) |", "|---|---|---|"]
        for k, t in s["paired_test_across_seeds"].items():
            lines.append(f"| {k} | {t['mean_diff']:+.5f} | {_p(t['p_ttest'])} |")
    ref = "base_same_protocol" if ada else "encoder"
    hr, ndcg = keys[2], keys[3]
    lines += ["", "## Per seed", "", f"| seed | encoder {hr} | fine-tuned {hr} | encoder {ndcg} | fine-tuned {ndcg} | "
              "epochs (stage 1 + 2) | wall time |", "|---|---|---|---|---|---|---|"]
    for e in s["per_seed"]:
        cells = [_f(e[model].get(k)) for k in (hr, ndcg) for model in (ref, "finetune")]
        lines.append(f"| {e['seed']} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | "
                     f"{e['epochs']['pretrain']} + {e['epochs']['finetune']} | "
                     f"{sum(float(v or 0) for v in e['wall_time_s'].values()):.0f} s |")
    lines += ["", f"Command: `{s['command']}`", ""]
    for e in s["per_seed"][:1]:
        lines += ["Stage commands of the first seed:", "", f"- `{e['commands']['pretrain']}`",
                  f"- `{e['commands']['finetune']}`", ""]
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _p(p: float | None) -> str:
    return "" if p is None else f"{p:.2g}"
