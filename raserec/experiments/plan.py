"""The converged runs the open reproduction asks for (issues 10 and 15), and how far each has got.

The README's "Reproduction queue" table is generated from this list and ``results/``: seeds
finished (``results/<name>/summary.json``), seeds carried unfinished from an earlier machine
(``results/<name>/seed_<s>/*_last.ckpt``, see ``raserec experiment --carry``), the wall time the
finished seeds took (this experiment's own stages: a stage 1 adopted with ``--stage1-from``
counts 0), and the one command that continues the experiment (finished seeds and stages are
skipped, a carried stage resumes).
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Planned:
    """One experiment of the reproduction."""

    name: str
    """Experiment name: ``results/<name>/`` and ``results/<name>.json``."""
    args: str
    """``raserec experiment`` arguments other than ``--name`` and ``--seeds``."""
    seeds: tuple[int, ...] = (2024, 2025, 2026)
    """The seeds the reproduction wants."""

    def command(self) -> str:
        return (f"raserec experiment --name {self.name} {self.args} "
                f"--seeds {' '.join(map(str, self.seeds))}")


PLAN: tuple[Planned, ...] = (
    Planned("beauty_raserec", "--pretrain configs/beauty_pretrain.yaml --finetune configs/beauty_raft.yaml"),
    Planned("sports_raserec", "--pretrain configs/sports_pretrain.yaml --finetune configs/sports_raft.yaml"),
    Planned("clothing_raserec", "--pretrain configs/clothing_pretrain.yaml --finetune configs/clothing_raft.yaml",
            (2024,)),
    Planned("beauty_sasrec", "--pretrain configs/beauty_sasrec.yaml"),
    Planned("beauty_grasp", "--pretrain configs/beauty_grasp.yaml"),
    Planned("beauty_sracl", "--pretrain configs/beauty_sracl.yaml"),
    Planned("beauty_semkeys_raserec", "--pretrain configs/beauty_pretrain.yaml --finetune "
            "configs/stage/raft_semantic_keys.yaml --data configs/data/beauty.yaml --stage1-from beauty_raserec"),
    Planned("sports_sasrec", "--pretrain configs/sports_sasrec.yaml"),
    Planned("sports_grasp", "--pretrain configs/sports_grasp.yaml"),
    Planned("sports_sracl", "--pretrain configs/sports_sracl.yaml"),
    # The combination row on Sports too (issue 15): semantic memory keys over the Sports RaSeRec encoders.
    Planned("sports_semkeys_raserec", "--pretrain configs/sports_pretrain.yaml --finetune "
            "configs/stage/raft_semantic_keys.yaml --data configs/data/sports.yaml --stage1-from sports_raserec"),
    Planned("beauty_ada", "--pretrain configs/beauty_pretrain.yaml --finetune configs/ada_beauty.yaml "
            "--stage1-from beauty_raserec", (2024,)),
    # RaSeRec + Ada-Retrieval (issue 10, item 6): a fresh RAM over memories of the same frozen encoder in every
    # round. Named apart from results/beauty_ada_raserec.json, the earlier 1-epoch smoke test.
    Planned("beauty_raserec_ada", "--pretrain configs/beauty_pretrain.yaml --finetune configs/ada_raserec_beauty.yaml "
            "--stage1-from beauty_raserec", (2024,)),
    # Ada-Retrieval phase 2 under the authors' objective and evaluation (BCE + 100 negatives, item bias, dropout
    # 0.1777, history masked): why beauty_ada's gain is below the paper's (issue 10, item 6).
    Planned("beauty_ada_authors", "--pretrain configs/beauty_pretrain.yaml --finetune configs/ada_beauty.yaml "
            "--overlay configs/ada_authors.yaml --stage1-from beauty_raserec", (2024,)),
    # The same phase 2 on the authors' own kind of base (SASRec trained with the sampled BCE): beauty_ada_authors
    # lost 2.9% HR@50 on our CE + InfoNCE encoder; does Ada-Retrieval gain over a sampled-loss base?
    Planned("beauty_sasrec_bce", "--pretrain configs/beauty_sasrec_bce.yaml", (2024,)),
    Planned("beauty_ada_authors_bce_base", "--pretrain configs/beauty_sasrec_bce.yaml --finetune configs/ada_beauty.yaml "
            "--overlay configs/ada_authors.yaml --stage1-from beauty_sasrec_bce", (2024,)),
)


def progress(plan: Planned, results_dir: Path) -> dict:
    """Seeds finished and carried, and the wall time of the finished ones, from ``results_dir``."""
    from raserec.errors import RaserecError, read_json_object

    summary = results_dir / plan.name / "summary.json"
    done: list[int] = []
    wall = 0.0
    if summary.is_file():
        s = read_json_object(summary, "experiment summary")
        try:
            done = [int(x) for x in s.get("seeds", [])]
            wall = float(s.get("wall_time_s") or 0.0)
        except (TypeError, ValueError) as exc:
            raise RaserecError(f"{summary}: damaged experiment summary (seeds or wall_time_s: {exc})") from exc
    carried = sorted(int(m.group(1)) for p in (results_dir / plan.name).glob("seed_*/*_last.ckpt")
                     if (m := re.fullmatch(r"seed_(\d+)", p.parent.name)))
    return {"done": done, "carried": [s for s in dict.fromkeys(carried) if s not in done],
            "wall_per_seed_s": wall / len(done) if done else None}


def standing(plan: Planned, results_dir: Path) -> tuple[dict, list[int], bool]:
    """:func:`progress`, the wanted seeds finished, and whether all of them are."""
    g = progress(plan, results_dir)
    done = [s for s in plan.seeds if s in g["done"]]
    return g, done, len(done) == len(plan.seeds)


def queue_table(results_dir: Path, plan: tuple[Planned, ...] = PLAN) -> str:
    """The README table: every planned experiment, its seeds done / wanted, what is carried, the
    hours one finished seed took (on the recorded hardware), and the command that continues it."""
    lines = ["| experiment | seeds done / wanted | carried, unfinished | hours per finished seed | continue with |",
             "|---|---|---|---|---|"]
    for p in plan:
        g, done, finished = standing(p, results_dir)
        hours = "" if g["wall_per_seed_s"] is None else f"{g['wall_per_seed_s'] / 3600:.1f}"
        command = "done" if finished else f"`{p.command()}`"
        lines.append(f"| {p.name} | {', '.join(map(str, done)) or 'none'} / {len(p.seeds)} | "
                     f"{', '.join(map(str, g['carried']))} | {hours} | {command} |")
    return "\n".join(lines)


def check_plan(plan: tuple[Planned, ...] = PLAN, root: Path = Path(".")) -> None:
    """Every config a planned command names exists (a test runs this)."""
    for p in plan:
        words = shlex.split(p.args)
        for flag, value in itertools.pairwise(words):
            if flag in ("--pretrain", "--finetune", "--data", "--overlay", "--model") and not (root / value).is_file():
                raise FileNotFoundError(f"{p.name}: {flag} {value} does not exist")


def select(names: list[str], results_dir: Path, plan: tuple[Planned, ...] = PLAN) -> list[Planned]:
    """The named experiments (default: every unfinished one), always in plan order (a later
    experiment may take its stage 1 from an earlier one); an unknown name is one error line."""
    from raserec.errors import RaserecError

    known = {p.name for p in plan}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RaserecError(f"not a planned experiment: {', '.join(unknown)} (planned: {', '.join(sorted(known))}; "
                           "see raserec/experiments/plan.py)")
    if names:
        return [p for p in plan if p.name in names]
    return [p for p in plan if not standing(p, results_dir)[2]]


def main(argv: list[str], plan: tuple[Planned, ...] = PLAN) -> int:
    """``raserec plan``: list the reproduction queue, or run / status / carry its experiments."""
    from raserec.argparsing import ArgumentParser
    from raserec.errors import RaserecError
    from raserec.experiments import runner
    from raserec.experiments.lock import running

    p = ArgumentParser(
        prog="raserec plan",
        description="The converged runs the reproduction still needs (raserec/experiments/plan.py): without an "
                    "action, one line each (seeds done / wanted, carried, running now) and the command that "
                    "continues it.",
        epilog="example: raserec plan --run beauty_sracl sports_sracl   (then, before the machine goes: "
               "stop it, raserec plan --carry, commit)")
    p.add_argument("names", nargs="*", metavar="NAME", help="planned experiments (default: all to list, "
                                                            "the unfinished ones for an action)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--run", action="store_true",
                     help="run or resume the experiments one after the other, in plan order; stops at the first failure")
    act.add_argument("--status", action="store_true", help="`raserec experiment --status` of each")
    act.add_argument("--carry", action="store_true", help="`raserec experiment --carry` of each (then commit)")
    p.add_argument("--results-dir", type=Path, default=runner.DEFAULT_DIRS["--results-dir"])
    p.add_argument("--runs-dir", type=Path, default=runner.DEFAULT_DIRS["--runs-dir"])
    a = p.parse_args(argv)
    chosen = select(a.names, a.results_dir, plan)
    # Only directories other than the defaults are passed on, so that the command a results file
    # records is the planned one (the README's), not one padded with default paths.
    dirs: list[str] = []
    for flag, value in (("--results-dir", a.results_dir), ("--runs-dir", a.runs_dir)):
        if value != runner.DEFAULT_DIRS[flag]:
            dirs += [flag, str(value)]
    if not (a.run or a.status or a.carry):
        for q in chosen if a.names else plan:
            g, done, finished = standing(q, a.results_dir)
            pid = running(a.runs_dir, q.name)
            print(f"{q.name}: seeds done {', '.join(map(str, done)) or 'none'} / {len(q.seeds)}"
                  + (f"; carried {', '.join(map(str, g['carried']))}" if g["carried"] else "")
                  + ("" if pid is None else "; running now" + (f" (pid {pid})" if pid else "")))
            print(f"  {'done' if finished else q.command()}")
        return 0
    if not chosen:
        print("every planned experiment is finished: nothing to do")
        return 0
    if a.run:
        for i, q in enumerate(chosen):
            try:
                runner.main([*shlex.split(q.command())[2:], *dirs])
            except RaserecError as exc:
                rest = [r.name for r in chosen[i + 1:]]
                raise RaserecError(f"{exc}" + (f"; not run: {', '.join(rest)}" if rest else "")) from exc
        return 0
    errors = []  # --status / --carry: every experiment's lines, then every failure
    for q in chosen:
        try:
            runner.main([*shlex.split(q.command())[2:], *dirs, "--status" if a.status else "--carry"])
        except RaserecError as exc:
            errors.append(str(exc))
    if errors:
        raise RaserecError("; ".join(errors))
    return 0
