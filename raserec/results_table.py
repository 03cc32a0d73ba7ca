"""Generate the README results tables from ``results/*.json`` (never typed by hand).

    python -m raserec.results_table --write README.md   # rewrite the marked block in place
    python -m raserec.results_table                     # print the tables
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raserec.paper import ADA as ADA_PAPER
from raserec.paper import RASEREC as PAPER

START, END = "<!-- results:start -->", "<!-- results:end -->"
QUALITY_KEYS = ["test/HR@5", "test/NDCG@5", "test/HR@10", "test/NDCG@10", "test/HR@20", "test/NDCG@20"]

def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def load(results_dir: Path) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(results_dir.glob("*.json"))]


def quality_table(results: list[tuple[str, dict]]) -> str:
    head = "| dataset | model | " + " | ".join(k.removeprefix("test/") for k in QUALITY_KEYS) + \
        " | seeds | epochs | wall time | hardware | command | file |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = [(r["dataset"], name, r) for name, r in results
            if any(k in r.get("metrics", {}) for k in QUALITY_KEYS) and "base/test/HR@50" not in r["metrics"]]
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
    head = "| dataset | model | " + " | ".join(ADA_KEYS) + " | history masked | command | file |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results:
        if "base/test/HR@50" not in r.get("metrics", {}):
            continue
        masked = (r.get("config") or {}).get("model", {}).get("init_args", {}).get("mask_history", "")
        cells = [_fmt(r["metrics"].get(k)) for k in ADA_KEYS]
        lines.append(f"| {r['dataset']} | {r['model']} | " + " | ".join(cells) + f" | {masked} | `{r['command']}` | {name} |")
    for dataset, (h50, n50, bh50, bn50) in ADA_PAPER.items():
        lines.append(f"| {dataset} | Ada-Retrieval, SASRec (paper) |  |  | {h50:.4f} | {n50:.4f} | {bh50:.4f} | "
                     f"{bn50:.4f} |  | published figure | ../shared/REFERENCE.md |")
    return "\n".join(lines)


def bench_table(results: list[tuple[str, dict]]) -> str:
    lines = ["| benchmark | figures | targets | hardware | command |", "|---|---|---|---|---|"]
    for name, r in results:
        if any(k in r.get("metrics", {}) for k in QUALITY_KEYS):
            continue
        figures = ", ".join(f"{k} = {v}" for k, v in r.get("metrics", {}).items())
        targets = ", ".join(f"{k} <= {v}" for k, v in r.get("targets", {}).items())
        lines.append(f"| {name} | {figures} | {targets} | {r.get('hardware', '')} | `{r['command']}` |")
    return "\n".join(lines)


def render(results_dir: Path) -> str:
    results = load(results_dir)
    return (f"{START}\n### Quality (test set, full ranking)\n\n{quality_table(results)}\n\n"
            f"### Ada-Retrieval (top-50 lists)\n\n{ada_table(results)}\n\n"
            f"### Speed benchmarks\n\n{bench_table(results)}\n{END}")


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
