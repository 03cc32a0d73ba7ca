"""``raserec experiment``: pre-train -> fine-tune -> test over several seeds, resumably.

Each stage of each seed is one ``raserec fit`` in a subprocess (a fresh process per stage keeps
seeding and global state exactly as for a hand-run command, and the stage's results file records
that command). Layout, for ``--name beauty_raserec``::

    results/beauty_raserec/
        seed_2024/pretrain.json        stage results (metrics, val curve, resolved config, command)
        seed_2024/finetune.json
        seed_2024/ranks_test.npz       per-query test ranks of the encoder and the fine-tuned model
        ...
        summary.json, summary.md       mean +- std over seeds, paired tests, paper rows
    results/beauty_raserec.json        the summary in the results-file format (README table)
        seed_2024/encoder.pt           the stage-1 encoder record (a few MB, committed): stage 2, the
                                       analyses and predict re-run from it without re-training stage 1
    runs/beauty_raserec/seed_2024/{pretrain,finetune}/...   checkpoints and logs (not committed)

A stage is skipped when its results file exists; an interrupted stage resumes from its
``last.ckpt``. So re-running the same command after a crash redoes only what is missing.

Without ``--finetune`` the experiment has one stage (a baseline or a one-stage method such as
SASRec, SRA-CL or GRASP over several seeds): ``seed_<s>/pretrain.json`` per seed, and the summary
reports that stage's mean +- std.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raserec.argparsing import ArgumentParser
from raserec.cli import check_config_file, check_run_name
from raserec.errors import RaserecError, read_json_object
from raserec.experiments.lock import hold, idle, running
from raserec.outputs import check_output_dir

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
#: Where results and runs go unless ``--results-dir`` / ``--runs-dir`` say otherwise.
DEFAULT_DIRS = {"--results-dir": Path("results"), "--runs-dir": Path("runs")}
BACKBONES = ("sasrec", "gru4rec", "bert4rec")
#: ``raserec fit`` options the runner sets itself for each seed and stage.
MANAGED = ("--seed_everything", "--data.seed", "--trainer.logger.init_args.save_dir", "--trainer.logger.init_args.name",
           "--checkpoint.dirpath", "--results.path", "--model.init_args.encoder_checkpoint", "--ckpt_path")


@dataclass
class ExperimentSpec:
    """What one experiment runs.

    Attributes:
        name: experiment name; results go to ``<results_dir>/<name>/`` and ``<results_dir>/<name>.json``.
        pretrain: stage-1 config (``PretrainModule``).
        finetune: stage-2 config whose model takes ``encoder_checkpoint`` (RAFT or Ada-Retrieval);
            ``None`` for a one-stage experiment (a baseline or a one-stage method over seeds).
        seeds: one full pipeline per seed (the paper averages 5 runs).
        overlays: extra configs applied after each stage's config (e.g. ``configs/cpu_short.yaml``).
        data: a data group (``configs/data/<dataset>.yaml``) applied after both stage configs.
        model: a model group (``configs/model/<backbone>.yaml``) applied after the stage-1 config
            only (stage 2 loads the encoder from stage 1).
        stage1_from: take each seed's stage 1 (results and encoder record) from this experiment
            instead of training it (a new stage 2 on the same encoders).
        dataset: dataset name for the summary (default: the finetune config's ``results.dataset``).
        backbone: ``sasrec`` / ``gru4rec`` / ``bert4rec``: selects the paper rows to compare with.
        results_dir: where result files go.
        runs_dir: where checkpoints and logs go.
        extra_args: extra ``raserec fit`` arguments for both stages.
        command: the command line that launched the experiment (recorded in the summary).
    """

    name: str
    pretrain: Path
    finetune: Path | None
    seeds: list[int]
    overlays: list[Path] = field(default_factory=list)
    dataset: str | None = None
    backbone: str = "sasrec"
    results_dir: Path = Path("results")
    runs_dir: Path = Path("runs")
    extra_args: list[str] = field(default_factory=list)
    command: str = ""
    data: Path | None = None
    model: Path | None = None
    stage1_from: str | None = None

    @property
    def out(self) -> Path:
        return self.results_dir / self.name

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages each seed runs, in order."""
        return STAGES if self.finetune is not None else STAGES[:1]

    @property
    def final_stage(self) -> str:
        """The stage whose model the experiment reports."""
        return self.stages[-1]

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed_{seed}"

    def run_dir(self, seed: int, stage: str) -> Path:
        return self.runs_dir / self.name / f"seed_{seed}" / stage

    def checkpoint(self, seed: int, stage: str, which: str = "best") -> Path:
        return self.run_dir(seed, stage) / "checkpoints" / f"{which}.ckpt"

    def stage_results(self, seed: int, stage: str) -> Path:
        return self.seed_dir(seed) / f"{stage}.json"

    def ranks_file(self, seed: int) -> Path:
        return self.seed_dir(seed) / "ranks_test.npz"

    def carried(self, seed: int, stage: str, which: str = "last") -> Path:
        """A checkpoint of an unfinished stage carried to another machine beside the results
        (``runs/`` is not committed): restored into ``runs/`` before the stage resumes."""
        return self.seed_dir(seed) / f"{stage}_{which}.ckpt"

    def encoder_record(self, seed: int) -> Path:
        """The stage-1 encoder, exported beside the results (kept in the repository)."""
        return self.seed_dir(seed) / "encoder.pt"

    def stage1_encoder(self, seed: int) -> Path:
        """What stage 2 loads: the stage-1 best checkpoint, or (on a machine without ``runs/``)
        the exported encoder record."""
        best = self.checkpoint(seed, "pretrain")
        return best if best.is_file() else self.encoder_record(seed)


def stage_command(spec: ExperimentSpec, seed: int, stage: str) -> list[str]:
    """The ``raserec fit`` arguments of one stage (without the program name)."""
    config = spec.pretrain if stage == "pretrain" else spec.finetune
    run_dir = spec.run_dir(seed, stage)
    args = ["fit", "--config", str(config)]
    if spec.data is not None:
        args += ["--config", str(spec.data)]
    if spec.model is not None and stage == "pretrain":
        args += ["--config", str(spec.model)]
    for overlay in spec.overlays:
        args += ["--config", str(overlay)]
    args += [
        "--seed_everything", str(seed),
        "--data.seed", str(seed),
        "--trainer.logger.init_args.save_dir", str(run_dir.parent),
        "--trainer.logger.init_args.name", stage,
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--results.path", str(spec.stage_results(seed, stage)),
    ]
    if not any(a.startswith("--trainer.enable_progress_bar") for a in spec.extra_args):  # a log file: one line per epoch
        args += ["--trainer.enable_progress_bar", "false"]
    if stage == "finetune":
        args += ["--model.init_args.encoder_checkpoint", str(spec.stage1_encoder(seed))]
    args += spec.extra_args
    last = spec.checkpoint(seed, stage, "last")
    if last.is_file():  # interrupted earlier: continue from where it stopped
        args += ["--ckpt_path", str(last)]
    return args


def restore_carried(spec: ExperimentSpec, seed: int, stage: str) -> bool:
    """Copy carried checkpoints (``results/<name>/seed_<s>/<stage>_{last,best}.ckpt``) into
    ``runs/`` where they are missing, so the stage resumes instead of restarting."""
    restored = False
    for which in ("last", "best"):
        src, dst = spec.carried(seed, stage, which), spec.checkpoint(seed, stage, which)
        if src.is_file() and not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            restored = True
    if restored:
        log.info("seed %d, %s: resuming from checkpoints carried in %s", seed, stage, spec.seed_dir(seed))
    return restored


def carry_unfinished(spec: ExperimentSpec) -> list[Path]:
    """The reverse of :func:`restore_carried`: copy each unfinished stage's ``last``/``best``
    checkpoints from ``runs/`` to ``results/<name>/seed_<s>/<stage>_{last,best}.ckpt`` (to commit
    them), so that the same experiment command resumes the stage on another machine. Finished
    stages (their results file exists) and stages that never saved a checkpoint are skipped."""
    stages = ["pretrain"] + (["finetune"] if spec.finetune is not None else [])
    copied = []
    for seed in spec.seeds:
        for stage in stages:
            last = spec.checkpoint(seed, stage, "last")
            if spec.stage_results(seed, stage).is_file() or not last.is_file():
                continue
            for which in ("last", "best"):
                src, dst = spec.checkpoint(seed, stage, which), spec.carried(seed, stage, which)
                if src.is_file():
                    slim_copy(src, dst, CARRY_DROPS[which])
                    copied.append(dst)
    return copied


#: What a carried checkpoint leaves out (carried files are committed, and every carry adds their
#: full size to the repository's history; one session's carries once exceeded what a submission may
#: hold). ``last`` resumes the fit and keeps everything. ``best`` is only ever tested or exported
#: (``trainer.test`` restores weights and callbacks, never the optimizer), so its optimizer state (two
#: moments per weight) stays behind. The encoder record stays in both: a resumed or tested RAFT stage
#: takes its frozen encoder from it on a machine without stage 1's files.
CARRY_DROPS: dict[str, tuple[str, ...]] = {"last": (), "best": ("optimizer_states", "lr_schedulers")}


def slim_copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """Copy checkpoint ``src`` to ``dst`` without the top-level entries ``drop``, with its encoder
    record's weights stored once (they are the module's ``encoder.*`` weights: a checkpoint written
    on a GPU, or before records shared storage, holds them twice), atomically (read with
    :func:`~raserec.checkpoint.load_checkpoint_dict`: nothing in it is run)."""
    import torch

    from raserec.checkpoint import RECORD_KEY, load_checkpoint_dict, save_atomic

    blob = load_checkpoint_dict(src)
    record, state = blob.get(RECORD_KEY), blob.get("state_dict")
    if isinstance(record, dict) and isinstance(record.get("state_dict"), dict) and isinstance(state, dict):
        weights = record["state_dict"]
        for name, tensor in weights.items():
            twin = state.get(f"encoder.{name}")
            if (isinstance(twin, torch.Tensor) and isinstance(tensor, torch.Tensor) and twin.dtype == tensor.dtype
                    and twin.shape == tensor.shape and torch.equal(twin, tensor)):
                weights[name] = twin  # one storage: torch.save writes it once
    return save_atomic({k: v for k, v in blob.items() if k not in drop}, dst)


def stage_status(spec: ExperimentSpec, seed: int, stage: str) -> str:
    """Where one stage of one seed stands, in one line: finished (epochs, test NDCG@10, how the fit
    ended), unfinished with a checkpoint in ``runs/`` or carried in ``results/`` (epochs saved, the
    best validation score so far and early stopping's patience used), to be taken from another
    experiment (``--stage1-from``), or not started. A file it cannot read is a
    :class:`RaserecError`."""
    results = spec.stage_results(seed, stage)
    if results.is_file():
        record = read_json_object(results)
        metrics = record.get("metrics")
        ndcg = metrics.get("test/NDCG@10") if isinstance(metrics, dict) else None
        how = record.get("schedule") or record.get("notes")
        line = (f"finished: {record.get('epochs', '?')} epochs, test NDCG@10 "
                + (f"{ndcg:.4f}" if isinstance(ndcg, (int, float)) else "-")
                + (f", stage 1 of {record['adopted_from']}" if record.get("adopted_from") else "")
                + (f" ({how})" if how else ""))
        if stage == "finetune" and not spec.ranks_file(seed).is_file() and not _ranks_not_applicable(spec, seed):
            line += "; per-query ranks not combined yet (the same command does it)"
        return line
    for path, carried in ((spec.checkpoint(seed, stage, "last"), False), (spec.carried(seed, stage, "last"), True)):
        if path.is_file():
            return f"unfinished: {_checkpoint_progress(path)}" + (" (carried)" if carried else "")
    if stage == "pretrain" and spec.stage1_from is not None:
        source, missing = _stage1_files(spec, seed)
        return f"--stage1-from {spec.stage1_from} has not finished it ({source})" if missing \
            else f"to be taken from {source}"
    return "not started"


def _checkpoint_progress(path: Path) -> str:
    """Epochs saved in a checkpoint and, from its own records, the best validation score so far
    and early stopping's patience used (read without running any code of the file)."""
    from raserec.checkpoint import load_checkpoint_dict

    ckpt = load_checkpoint_dict(path)
    try:
        # epochs processed, also for a checkpoint saved within an epoch (its `epoch` is that epoch)
        done = int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        epoch = ckpt.get("epoch")
        done = epoch + 1 if isinstance(epoch, int) else None
    line = f"{'?' if done is None else done} epochs saved in {path}"
    callbacks = ckpt.get("callbacks") if isinstance(ckpt.get("callbacks"), dict) else {}
    writer = callbacks.get("ResultsWriter")
    curve = writer.get("curve") if isinstance(writer, dict) else None
    for key, es in callbacks.items():
        monitor = re.search(r"'monitor': '([^']+)'", key)
        if not (key.startswith("EarlyStopping") and monitor and isinstance(es, dict)):
            continue
        name, mode = monitor.group(1), "min" if "'mode': 'min'" in key else "max"
        scored = [c for c in curve or [] if isinstance(c, dict) and isinstance(c.get(name), (int, float))]
        if scored:  # the first best, as early stopping counts (validation may not run every epoch)
            best = (max if mode == "max" else min)(scored, key=lambda c: c[name])
            line += f"; best {name} {best[name]:.4f} at epoch {best.get('epoch', '?')}"
        if isinstance(es.get("wait_count"), int) and isinstance(es.get("patience"), int):
            line += f"{',' if scored else ';'} {es['wait_count']} of patience {es['patience']}"
    return line


def status(spec: ExperimentSpec) -> tuple[list[str], list[str]]:
    """:func:`stage_status` of every seed and stage (``--status``), and the errors of the files
    it could not read (each stage apart: one damaged file does not hide the others)."""
    lines, errors = [], []
    for seed in spec.seeds:
        for stage in spec.stages:
            try:
                lines.append(f"{spec.name} seed {seed} {stage}: {stage_status(spec, seed, stage)}")
            except RaserecError as exc:
                errors.append(f"{spec.name} seed {seed} {stage}: {exc}")
    return lines, errors


def run_stage(spec: ExperimentSpec, seed: int, stage: str, lock_fd: int | None = None) -> None:
    """Run one stage as a ``raserec fit`` child process (log in its run directory). ``lock_fd``,
    the experiment's lock, is inherited by the child, so the lock outlives a killed runner."""
    restore_carried(spec, seed, stage)
    args = stage_command(spec, seed, stage)
    run_dir = spec.run_dir(seed, stage)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "stage.log"
    cmd = [sys.executable, "-m", "raserec.cli", *args]
    log.info("running: raserec %s  (log: %s)", shlex.join(args), log_path)
    with open(log_path, "a") as log_file:
        log_file.write(f"\n$ raserec {shlex.join(args)}\n")
        log_file.flush()
        start = log_file.tell()  # the log holds earlier attempts too: read only this one's output
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                              pass_fds=() if lock_fd is None else (lock_fd,))
    if proc.returncode != 0:
        with open(log_path, "rb") as log_file:
            log_file.seek(start)
            output = log_file.read().decode(errors="replace")
        raise RaserecError(f"{spec.name}: seed {seed}, stage {stage} failed (exit {proc.returncode}): "
                           f"{_why(output)} (log: {log_path}; re-run the same command to resume)")
    if not spec.stage_results(seed, stage).is_file():
        raise RaserecError(f"{spec.name}: stage {stage} of seed {seed} finished without writing "
                           f"{spec.stage_results(seed, stage)} (was the run interrupted?)")
    for which in ("last", "best"):  # the stage is finished: carried checkpoints are no longer needed
        spec.carried(seed, stage, which).unlink(missing_ok=True)
    if stage == "pretrain":  # a record, also of a pretrain-only run: --stage1-from reuses it
        export_encoder(spec, seed)


def export_encoder(spec: ExperimentSpec, seed: int) -> Path | None:
    """Write the stage-1 best encoder as a standalone record (weights, class, data fingerprint,
    weight hash) to ``results/<name>/seed_<s>/encoder.pt``, if not there yet."""
    from raserec.checkpoint import RECORD_KEY, load_encoder, load_weights_only, save_encoder

    target, best = spec.encoder_record(seed), spec.checkpoint(seed, "pretrain")
    if target.is_file() or not best.is_file():
        return None
    blob = load_weights_only(best)
    if not isinstance(blob, dict) or RECORD_KEY not in blob:  # e.g. GRASP: its backbone alone is not the model
        log.info("%s: no encoder record in it, none exported", best)
        return None
    encoder, data = load_encoder(best)
    save_encoder(encoder, target, {**data, "exported_from": str(best)})
    log.info("exported the stage-1 encoder to %s", target)
    return target


def compute_ranks(spec: ExperimentSpec, seed: int) -> None:
    """Write ``ranks_test.npz``: per-query test ranks of the pre-trained encoder (``encoder``) and
    of the fine-tuned model (``finetune``), for the paired significance test and per-group
    analyses (RAFT fine-tuning only). Each stage's own test pass already wrote its ranks
    (``<stage>.ranks_test.npz``), so they are combined; only where one is missing or partial are
    both rankings recomputed from the RAFT checkpoint (:func:`ranks_from_checkpoint`)."""
    ranks = ranks_from_stage_files(spec.seed_dir(seed))
    if ranks is None:
        log.info("seed %d: no complete per-stage rank files; ranking the test queries again", seed)
        ranks = ranks_from_checkpoint(spec, seed)
    from raserec.results import save_npz

    save_npz(spec.ranks_file(seed), **ranks)


def ranks_from_stage_files(seed_dir: Path) -> dict[str, np.ndarray] | None:
    """The ``ranks_test.npz`` arrays from the stages' own rank files (written in test-query order,
    also under DDP); ``None`` when a stage has none, a damaged one, one that covers only part of
    the test queries (a limited test pass) or other queries than the other stage's."""
    from raserec.experiments.compare import load_ranks_file

    columns: dict[str, dict[str, np.ndarray]] = {}
    for stage in ("pretrain", "finetune"):
        path = seed_dir / f"{stage}.ranks_test.npz"
        if not path.is_file():
            return None
        try:
            z = load_ranks_file(path, ("row", "user", "end", "target", "rank", "queries_total"))
        except RaserecError as exc:  # damaged or foreign: rank again from the checkpoint
            log.warning("%s", exc)
            return None
        if not np.array_equal(z["row"], np.arange(int(z["queries_total"]))):
            return None  # a limited test pass: not every query, in order
        columns[stage] = z
    pre, fine = columns["pretrain"], columns["finetune"]
    if not all(np.array_equal(pre[k], fine[k]) for k in ("user", "end", "target")):
        return None
    return {"user": pre["user"], "target": pre["target"], "end": pre["end"],
            "encoder": pre["rank"], "finetune": fine["rank"]}


def ranks_from_checkpoint(spec: ExperimentSpec, seed: int) -> dict[str, np.ndarray]:
    """Both rankings recomputed outside the Trainer: the RAFT checkpoint embeds the frozen stage-1
    encoder and records its data, so it alone gives both."""
    from raserec.analysis.evaluator import Evaluator, load_raft
    from raserec.evaluation.per_query import metrics_from_ranks

    config = read_json_object(spec.stage_results(seed, "finetune"))["config"]
    module, dm = load_raft(spec.checkpoint(seed, "finetune"), cache_dir=config["data"].get("cache_dir"))
    ev = Evaluator(module, dm, progress=sys.stderr.isatty())  # background logs stay readable
    base, tuned = ev.ranks(augmented=False), ev.ranks(augmented=True)
    for stage, ranks in (("pretrain", base), ("finetune", tuned)):
        logged = read_json_object(spec.stage_results(seed, stage))["metrics"].get("test/NDCG@10")
        recomputed = metrics_from_ranks(ranks, (10,))["NDCG@10"]
        if logged is not None and abs(logged - recomputed) > 1e-5:
            log.warning("seed %d, %s: per-query NDCG@10 %.5f != the logged test/NDCG@10 %.5f (was the test pass "
                        "limited, e.g. by trainer.limit_test_batches?); the paired test uses all test queries",
                        seed, stage, recomputed, logged)
    pairs = dm.pairs("test")
    return {"user": pairs.user, "target": pairs.target, "end": pairs.end, "encoder": base, "finetune": tuned}


def adopt_stage1(spec: ExperimentSpec, seed: int) -> bool:
    """Copy stage 1 of ``seed`` (``pretrain.json`` and ``encoder.pt``) from the experiment
    ``spec.stage1_from`` when this experiment has none yet; returns whether it copied."""
    source = stage1_source(spec, seed)
    if source is None:
        return False
    from raserec.results import write_results

    spec.seed_dir(seed).mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "encoder.pt", spec.encoder_record(seed))
    ranks = source / "pretrain.ranks_test.npz"  # named by the record's ranks_file, so it travels with it
    if ranks.is_file():
        shutil.copy2(ranks, spec.seed_dir(seed) / ranks.name)
    record = read_json_object(source / "pretrain.json")
    record["adopted_from"] = str(source)  # the summary does not count its wall time again
    write_results(spec.stage_results(seed, "pretrain"), record)  # last: it marks stage 1 done
    log.info("seed %d: stage 1 taken from %s", seed, source)
    return True


def stage1_source(spec: ExperimentSpec, seed: int) -> Path | None:
    """Where ``--stage1-from`` takes stage 1 of ``seed`` from (``None``: nothing to take); one
    error line if that experiment has not finished it."""
    if spec.stage1_from is None or spec.stage_results(seed, "pretrain").is_file():
        return None
    source, missing = _stage1_files(spec, seed)
    if missing:
        raise RaserecError(f"--stage1-from {spec.stage1_from}: seed {seed} has no finished stage 1 there "
                           f"(missing {', '.join(str(source / m) for m in missing)})")
    return source


def _stage1_files(spec: ExperimentSpec, seed: int) -> tuple[Path, list[str]]:
    """The ``--stage1-from`` seed directory of ``seed`` and the stage-1 files missing there."""
    source = spec.results_dir / spec.stage1_from / f"seed_{seed}"
    return source, [name for name in ("pretrain.json", "encoder.pt") if not (source / name).is_file()]


def check_stage_commands(spec: ExperimentSpec) -> None:
    """Parse every stage's ``raserec fit`` command that still has work (as the first such seed
    will run it) without running it: a bad config file, option or value fails here, as one line,
    before a directory is made or a stage trains."""
    from raserec.cli import main as cli_main

    for stage in spec.stages:
        todo = [s for s in spec.seeds if not spec.stage_results(s, stage).is_file()]
        if not todo:
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main([*stage_command(spec, todo[0], stage), "--print_config"])
            except SystemExit as exc:  # --print_config exits 0 once the command has parsed
                code = exc.code if isinstance(exc.code, int) else 2
            except Exception as exc:  # noqa: BLE001 - whatever the parse raised, one line here
                raise RaserecError(f"{spec.name}: the {stage} stage's `raserec fit` command is refused: "
                                   f"{type(exc).__name__}: {_why(str(exc))}") from exc
        if code != 0:
            raise RaserecError(f"{spec.name}: the {stage} stage's `raserec fit` command is refused: "
                               f"{_why(err.getvalue(), f'exit code {code}')}")
        # what the fit itself would refuse only once it starts (after stage 1, for stage 2)
        import yaml

        from raserec.lightning_cli import fit_config_conflicts

        try:
            printed = yaml.safe_load(out.getvalue())
        except yaml.YAMLError:
            printed = None
        conflicts = fit_config_conflicts(printed) if isinstance(printed, dict) else []  # else: not a config
        if conflicts:
            raise RaserecError(f"{spec.name}: the {stage} stage's `raserec fit` command is refused: {conflicts[0]}")


def _why(output: str, default: str = "no output") -> str:
    """What a `raserec` command's output says went wrong: its last ``error:`` line, else its last
    line (a traceback's exception), shortened to one line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
    return (errors[-1] if errors else lines[-1] if lines else default)[:300]


def run(spec: ExperimentSpec) -> dict | None:
    """Run (or resume) every missing stage of every seed, writing the summaries after each seed."""
    # Before anything is created or trained: a seed missing in --stage1-from, an unwritable
    # directory or a command `raserec fit` refuses fails now, not hours later.
    for seed in spec.seeds:
        stage1_source(spec, seed)
    check_output_dir(spec.results_dir, "--results-dir")
    check_output_dir(spec.runs_dir, "--runs-dir")
    check_stage_commands(spec)
    with hold(spec.runs_dir, spec.name) as lock_fd:  # one run per experiment, from here to the end
        return _run_locked(spec, lock_fd)


def _run_locked(spec: ExperimentSpec, lock_fd: int) -> dict | None:
    spec.out.mkdir(parents=True, exist_ok=True)
    for seed in spec.seeds:
        adopt_stage1(spec, seed)
    steps = (*spec.stages, "ranks") if spec.finetune is not None else spec.stages
    total = len(spec.seeds) * len(steps)
    step = 0
    summary = None
    for i, seed in enumerate(spec.seeds, 1):
        spec.seed_dir(seed).mkdir(parents=True, exist_ok=True)
        for stage in steps:
            step += 1
            prefix = f"[{spec.name} {step}/{total}] seed {seed} ({i}/{len(spec.seeds)}) {stage}"
            done = (spec.ranks_file(seed).is_file() or _ranks_not_applicable(spec, seed)) if stage == "ranks" \
                else spec.stage_results(seed, stage).is_file()
            if done:
                print(f"{prefix}: done earlier, skipped", flush=True)
                if stage == "pretrain":
                    export_encoder(spec, seed)
                continue
            start = time.perf_counter()
            print(f"{prefix}: running", flush=True)
            if stage == "ranks":
                compute_ranks(spec, seed)
            else:
                run_stage(spec, seed, stage, lock_fd)
            print(f"{prefix}: finished in {time.perf_counter() - start:.0f} s", flush=True)
        # After every seed, not only the last: an experiment stopped days into its third seed
        # already has the figures of the first two.
        summary = write_summary(spec)
    return summary


def write_summary(spec: ExperimentSpec) -> dict | None:
    """Summarize the finished seeds (``summary.md``, ``summary.json``, ``results/<name>.json``);
    ``None`` when no seed has finished yet."""
    from raserec.experiments.summary import NoFinishedSeed, summarize

    try:
        summary = summarize(spec)
    except NoFinishedSeed:  # any other error (a damaged stage record) is the user's to see
        return None
    print(f"[{spec.name}] summary of seeds {', '.join(map(str, summary['seeds']))}: {spec.out / 'summary.md'} "
          f"and {spec.results_dir / (spec.name + '.json')}", flush=True)
    return summary


def _ranks_not_applicable(spec: ExperimentSpec, seed: int) -> bool:
    path = spec.stage_results(seed, "finetune")
    if not path.is_file():
        return False
    from raserec.analysis.evaluator import RAFT_CLASSES

    cls = (read_json_object(path).get("config") or {}).get("model", {}).get("class_path") or ""
    return cls.rsplit(".", 1)[-1] not in RAFT_CLASSES


def parse_args(argv: list[str]) -> ExperimentSpec:
    return _parse(argv)[0]


def _parse(argv: list[str]) -> tuple[ExperimentSpec, argparse.Namespace]:
    p = ArgumentParser(
        prog="raserec experiment",
        description="Run pre-train -> fine-tune -> test over several seeds and summarise (resumable: "
                    "re-running the same command skips finished stages and resumes interrupted ones).",
        epilog="example: raserec experiment --name beauty_raserec --pretrain configs/beauty_pretrain.yaml "
               "--finetune configs/beauty_raft.yaml --seeds 2024 2025 2026 2027 2028")
    p.add_argument("--name", required=True, help="experiment name: results/<name>/ and results/<name>.json")
    p.add_argument("--pretrain", required=True, type=Path, help="stage-1 config (pre-training)")
    p.add_argument("--finetune", "--raft", type=Path,
                   help="stage-2 config (RAFT or Ada-Retrieval; its encoder_checkpoint is set to stage 1's best); "
                        "omit it for a one-stage experiment (SASRec, SRA-CL, GRASP over seeds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025, 2026, 2027, 2028],
                   help="one pipeline per seed (default: five, as the paper)")
    p.add_argument("--overlay", type=Path, action="append", default=[],
                   help="config applied after each stage's own (repeatable), e.g. configs/cpu_short.yaml")
    p.add_argument("--data", type=Path, help="data group applied after both stage configs, e.g. configs/data/sports.yaml")
    p.add_argument("--model", type=Path,
                   help="model group applied after the stage-1 config, e.g. configs/model/gru4rec.yaml")
    p.add_argument("--dataset", help="dataset name in the summary (default: from the finetune config)")
    p.add_argument("--backbone", default=None, choices=BACKBONES,
                   help="selects the paper rows compared against (default: the --model group's name, else sasrec)")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_DIRS["--results-dir"])
    p.add_argument("--runs-dir", type=Path, default=DEFAULT_DIRS["--runs-dir"])
    p.add_argument("--stage1-from", metavar="NAME",
                   help="take each seed's stage 1 from experiment NAME (results/NAME/seed_<s>/pretrain.json and "
                        "encoder.pt) instead of training it: a new stage 2 on the same encoders")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--carry", action="store_true",
                   help="run nothing: copy the unfinished stages' last/best checkpoints from runs/ to "
                        "results/<name>/seed_<s>/<stage>_{last,best}.ckpt (commit them; the same command resumes there)")
    only.add_argument("--status", action="store_true",
                   help="run nothing: say where each seed's stages stand (finished, epochs saved and best "
                        "validation score so far, carried, not started)")
    p.add_argument("--fit-args", default="", help="extra `raserec fit` arguments for both stages, one quoted string: --fit-args=\"--trainer.max_epochs 3\"")
    a = p.parse_args(argv)
    check_run_name(a.name)
    for path in (a.pretrain, *([a.finetune] if a.finetune else []), *a.overlay, *([a.data] if a.data else []), *([a.model] if a.model else [])):
        check_config_file(str(path))
    try:
        fit_args = shlex.split(a.fit_args)
    except ValueError as exc:  # e.g. an unbalanced quote
        raise RaserecError(f"--fit-args {a.fit_args!r}: {exc}") from exc
    managed = [arg for arg in fit_args if arg.split("=", 1)[0] in MANAGED]
    if managed:
        raise RaserecError(f"--fit-args must not set {', '.join(managed)}: the runner sets it per seed and stage "
                           "(use --seeds, --results-dir and --runs-dir instead)")
    if a.stage1_from is not None and a.finetune is None:
        raise RaserecError("--stage1-from needs --finetune (it reuses stage 1 for a new stage 2)")
    if len(set(a.seeds)) != len(a.seeds):
        raise RaserecError(f"--seeds must be distinct, got {a.seeds}")
    backbone = a.backbone or (a.model.stem if a.model is not None and a.model.stem in BACKBONES else "sasrec")
    command = shlex.join(["raserec", "experiment", *[arg for arg in argv if arg not in ("--carry", "--status")]])
    spec = ExperimentSpec(a.name, a.pretrain, a.finetune, a.seeds, a.overlay, a.dataset, backbone,
                          a.results_dir, a.runs_dir, fit_args, command=command, data=a.data, model=a.model,
                          stage1_from=a.stage1_from)
    return spec, a


def main(argv: list[str]) -> int:
    spec, options = _parse(argv)
    if options.status:
        lines, errors = status(spec)
        pid = running(spec.runs_dir, spec.name)
        if pid is not None:
            lines.insert(0, f"{spec.name}: running now" + (f" (pid {pid})" if pid else ""))
        for line in lines:
            print(line)
        if errors:  # the CLI prints it as the one error line
            raise RaserecError("; ".join(errors))
        return 0
    if options.carry:
        with idle(spec.runs_dir, spec.name, "carry"):  # never copy a checkpoint that a running trainer is writing
            copied = carry_unfinished(spec)
        for path in copied:
            print(f"carried {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        if not copied:
            print(f"{spec.name}: no unfinished stage with a checkpoint in {spec.runs_dir}: nothing to carry")
        write_summary(spec)  # the seeds that did finish, ready to commit beside the carried ones
        return 0
    run(spec)
    return 0


__all__ = ["ExperimentSpec", "carry_unfinished", "run", "stage_command", "main"]
