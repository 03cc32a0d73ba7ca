"""Preference drift (beyond the paper, which motivates the dynamic memory bank but never measures
it). Per user, the ``m`` most recent interactions before the validation item are held out; both
stages are trained without them. At test time (inputs = the full history) RaSeRec is evaluated

- with its stale memory bank (the pairs of the reduced data),
- with the memory bank rebuilt from all data, held-out interactions included (no retraining),
- against both stages retrained on all data,

so the gain of refreshing the memory bank alone can be compared with the gain of retraining."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from raserec.analysis.common import METRICS, bar_line
from raserec.analysis.evaluator import Evaluator, load_raft
from raserec.data.datamodule import SequenceDataModule
from raserec.data.sequences import SequenceData
from raserec.errors import RaserecError, read_json_object
from raserec.evaluation.metrics import relative_change_pct
from raserec.evaluation.per_query import metrics_from_ranks

log = logging.getLogger(__name__)


def hold_out_recent(data: SequenceData, m: int) -> tuple[SequenceData, np.ndarray]:
    """``data`` without each user's ``m`` items before the validation item (fewer for users with
    fewer than ``m + 3`` items, who keep 3); also returns how many each user lost. Item ids are
    unchanged, so models trained on either dataset share one item table."""
    if m < 1:
        raise RaserecError(f"--holdout must be >= 1, got {m}")
    n = data.lengths.astype(np.int64)
    lost = np.minimum(m, n - 3)
    pos = np.arange(data.num_interactions) - np.repeat(data.offsets[:-1], n)
    n_rep, lost_rep = np.repeat(n, n), np.repeat(lost, n)
    drop = (pos >= n_rep - 2 - lost_rep) & (pos < n_rep - 2)
    offsets = np.concatenate([[0], np.cumsum(n - lost)]).astype(np.int64)
    return SequenceData(offsets, data.items[~drop], data.user_ids, data.item_ids), lost


def fit_stage(config_args: Sequence[str], data: SequenceData, work_dir: Path, encoder_checkpoint: str | None = None,
              progress: bool = True) -> str:
    """Train one stage (config files + overrides, as for ``raserec fit``) on ``data`` in-process;
    returns the best checkpoint's path.

    Resumable: a stage that finished (``work_dir/done.json``, written after the fit) is not
    trained again, and an interrupted one continues from ``work_dir/checkpoints/last.ckpt``, so
    re-running the same ``raserec analyze drift`` command redoes only what is missing."""
    from raserec.lightning_cli import RaserecCLI

    done = work_dir / "done.json"
    if done.is_file():
        best = str(read_json_object(done, "drift record").get("best", ""))
        if Path(best).is_file():
            log.info("%s: finished earlier, using %s", work_dir, best)
            return best
    args = [*config_args, "--checkpoint.dirpath", str(work_dir / "checkpoints"),
            "--trainer.logger.init_args.save_dir", str(work_dir.parent), "--trainer.logger.init_args.name", work_dir.name,
            "--trainer.enable_progress_bar", str(progress).lower()]
    if encoder_checkpoint is not None:
        args += ["--model.init_args.encoder_checkpoint", encoder_checkpoint]
    cli = RaserecCLI(args=args, run=False)
    cli.datamodule.set_data(data)
    last = work_dir / "checkpoints" / "last.ckpt"
    resume = str(last) if last.is_file() else None
    if resume:
        log.info("%s: resuming from %s", work_dir, resume)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume, weights_only=True)
    if cli.trainer.interrupted:
        raise RaserecError(f"{work_dir}: training was interrupted; re-run the same command to resume it")
    best = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    if not best:
        raise RaserecError(f"{work_dir}: training saved no checkpoint")
    done.write_text(json.dumps({"best": best}))
    return best


def _configs(config: Path, overlays: Sequence[Path]) -> list[str]:
    return [a for c in (config, *overlays) for a in ("--config", str(c))]


def drift(pretrain_config: Path, finetune_config: Path, overlays: Sequence[Path], holdout: int, work_dir: Path,
          retrained_checkpoint: str | None = None, progress: bool = True,
          full_encoder: str | None = None) -> tuple[pl.DataFrame, object, dict]:
    """Train what is missing (resumably, under ``work_dir``) and compare the five variants of the
    module docstring. ``retrained_checkpoint`` (a RAFT checkpoint trained on all data) skips both
    full-data stages; ``full_encoder`` (a stage-1 encoder record or checkpoint trained on all data,
    e.g. ``results/beauty_raserec/seed_2024/encoder.pt``) skips only stage 1 of them."""
    pre_args, fine_args = _configs(pretrain_config, overlays), _configs(finetune_config, overlays)
    probe = _datamodule(pre_args)  # the pre-training config: parsing it loads no checkpoint
    full = probe.data
    reduced, lost = hold_out_recent(full, holdout)

    enc_reduced = fit_stage(pre_args, reduced, work_dir / "reduced_pretrain", progress=progress)
    raft_reduced = fit_stage(fine_args, reduced, work_dir / "reduced_finetune", enc_reduced, progress=progress)
    if retrained_checkpoint is None:
        if full_encoder is None:
            enc_full, stage = fit_stage(pre_args, full, work_dir / "full_pretrain", progress=progress), "full_finetune"
        else:  # its own run directory per given encoder: a finished or interrupted RAFT of another is never reused
            digest = hashlib.sha256(Path(full_encoder).read_bytes()).hexdigest()[:12]
            enc_full, stage = full_encoder, f"full_finetune_{digest}"
        retrained_checkpoint = fit_stage(fine_args, full, work_dir / stage, enc_full, progress=progress)

    module, dm = load_raft(raft_reduced, cache_dir=probe.hparams.cache_dir)
    dm.set_data(full)  # queries: the full history
    dm_reduced = SequenceDataModule(**{k: v for k, v in dm.hparams.items() if not k.startswith("_")})
    dm_reduced.set_data(reduced)
    ev = Evaluator(module, dm, progress=progress)
    stale = ev.bank("test", dm_reduced)
    fresh = ev.bank("test")
    variants = [
        ("encoder, trained without recent", ev.ranks(augmented=False)),
        ("RaSeRec, stale memory bank", ev.ranks(dm.dataset("test"), augmented=True, bank=stale)),
        ("RaSeRec, memory bank + recent (no retraining)", ev.ranks(dm.dataset("test"), augmented=True, bank=fresh)),
    ]
    retrained, dm_full = load_raft(retrained_checkpoint, cache_dir=probe.hparams.cache_dir)
    dm_full.set_data(full)
    ev_full = Evaluator(retrained, dm_full, progress=progress)
    variants += [("encoder, retrained on all", ev_full.ranks(augmented=False)),
                 ("RaSeRec, both stages retrained on all", ev_full.ranks(augmented=True))]
    rows = []
    for name, ranks in variants:
        m = metrics_from_ranks(ranks, (5, 10))
        rows.append({"variant": name, **{k: m[k] for k in METRICS}})
    table = pl.DataFrame(rows)
    stale_ndcg = table.row(1, named=True)["NDCG@10"]
    table = table.with_columns(relative_change_pct(pl.col("NDCG@10"), stale_ndcg).alias("gain_NDCG@10_pct"))
    shown = table.with_columns(pl.Series("variant", [str(i + 1) for i in range(table.height)]))
    fig = bar_line(shown, "variant", {"HR@10": "HR@10", "NDCG@10": "NDCG@10"}, "gain_NDCG@10_pct",
                   f"Preference drift: last {holdout} items before validation held out\n"
                   + "; ".join(f"{i + 1} = {v}" for i, v in enumerate(table["variant"].to_list()[:3])) + "\n"
                   + "; ".join(f"{i + 4} = {v}" for i, v in enumerate(table["variant"].to_list()[3:])),
                   "metric", line_label="NDCG@10 vs stale bank (%)")
    extra = {"holdout": holdout, "users_with_holdout": int((lost > 0).sum()), "held_out_interactions": int(lost.sum()),
             "reduced_checkpoints": [enc_reduced, raft_reduced], "retrained_checkpoint": retrained_checkpoint,
             **({"full_encoder": full_encoder} if full_encoder else {}),
             "pretrain_config": str(pretrain_config), "finetune_config": str(finetune_config),
             "overlays": [str(o) for o in overlays], "dataset": dm.data_path.stem}
    return table, fig, extra


def _datamodule(config_args: Sequence[str]) -> SequenceDataModule:
    """The datamodule a stage config describes (parsed, not trained)."""
    from raserec.lightning_cli import RaserecCLI

    cli = RaserecCLI(args=[*config_args, "--trainer.logger", "false"], run=False)
    cli.datamodule.setup("fit")
    return cli.datamodule
