"""LightningCLI wiring: links the datamodule's item count into the model, configures
checkpointing, early stopping and the results file, and tests the best checkpoint after fit."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from raserec.checkpoint import RECORD_KEY, load_checkpoint_dict
from raserec.data.datamodule import SequenceDataModule
from raserec.epoch_log import EpochLog
from raserec.errors import CheckpointError, ConfigError
from raserec.evaluation.module import RecommenderModule, check_fits_data
from raserec.evaluation.writer import TopNWriter
from raserec.finetune.frozen import FrozenEncoderMixin
from raserec.results import ResultsWriter

log = logging.getLogger(__name__)


def _model_class(class_path: str) -> type | None:
    """The model class ``class_path`` names (the config's, already imported by the parser)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _init_parameters(cls: type) -> set[str] | None:
    """The keyword arguments ``cls`` takes (``None``: any, or unknown)."""
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name != "self"}


@dataclass
class ResultsSpec:
    """Where ``fit``/``test`` record their figures.

    Attributes:
        path: results JSON written after testing (``null``: none, e.g. in the debug overlay).
        dataset: dataset name recorded in the file.
        model: model name recorded in the file.
        notes: free text recorded in the file (schedule, hardware caveats).
        ranks: also write every test query's target rank beside it (``NAME.ranks_test.npz``),
            which ``raserec compare`` reads for paired significance tests between two models.
    """

    path: str | None = None
    dataset: str = ""
    model: str = ""
    notes: str = ""
    ranks: bool = True


EPOCH_END_CONFLICT = ("early_stopping.check_on_train_epoch_end true judges at each training epoch's end, but "
                      "checkpoints are saved at validation's end (checkpoint.save_on_train_epoch_end false, or "
                      "validation not once per epoch): a resumed fit would find no validation metric; leave it "
                      "unset (it follows the checkpoint) or set both alike")


def validation_off(monitors: list[str]) -> str:
    return (f"trainer.limit_val_batches 0 turns validation off, but early stopping and the best checkpoint monitor "
            f"{', '.join(monitors)}, which validation logs; let validation run (limit_val_batches > 0)")


def fit_config_conflicts(config: dict) -> list[str]:
    """Part of what :meth:`RaserecCLI.before_fit` would refuse, read off a resolved ``raserec fit``
    config (``--print_config``'s), so that ``raserec experiment`` refuses every stage's command before
    the first stage trains, not hours later when the second one starts. It reads the ``checkpoint``
    and ``early_stopping`` sections only (not callbacks listed in ``trainer.callbacks``), and nothing
    under Lightning's debug flags, which rewrite the validation schedule."""
    trainer = config.get("trainer") or {}
    ckpt = config.get("checkpoint") or {}
    stopping = config.get("early_stopping") or {}
    if trainer.get("fast_dev_run") or (trainer.get("overfit_batches") or 0) > 0:
        return []
    out = []
    monitors = sorted({m for m in (ckpt.get("monitor"), stopping.get("monitor")) if m})
    if trainer.get("limit_val_batches") == 0 and monitors:
        out.append(validation_off(monitors))
    # as Lightning: validation "every epoch" is check_val_every_n_epoch == 1 exactly (null is not)
    every_epoch = trainer.get("val_check_interval") in (None, 1.0) and trainer.get("check_val_every_n_epoch", 1) == 1
    saved_at_epoch_end = ckpt.get("save_on_train_epoch_end")
    if saved_at_epoch_end is None:
        saved_at_epoch_end = every_epoch
    if stopping.get("check_on_train_epoch_end") is True and not saved_at_epoch_end:
        out.append(EPOCH_END_CONFLICT)
    return out


class EpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is written after *every* validation, not only when
    the monitored metric improves (Lightning 2.6 writes ``save_last`` only beside a top-k save),
    so an interrupted run resumes from the epoch it reached, not from its best one.

    Its state in a checkpoint has ``ModelCheckpoint``'s key, so checkpoints written before this
    class (or by plain Lightning) resume with their best score and path.
    """

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _ensure_last(self, trainer) -> None:
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # Lightning saves in one of these two hooks (which one depends on the validation schedule).
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer) and not trainer.sanity_checking:
            self._ensure_last(trainer)


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` beside the logs and sends the full resolved config to the logger
    (W&B's run config, CSV's hparams.yaml), which LightningCLI does not do by itself."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Without a logger there is no log directory: Lightning would write config.yaml into the
        # working directory (over a file of that name). The results file keeps the config anyway.
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            config = self.parser.dump(self.config, skip_none=False, format="json")
            trainer.logger.log_hyperparams({"config": json.loads(config)})


class RaserecArgumentParser(LightningArgumentParser):
    """Reports a bad option or config value as one :class:`ConfigError` line (the CLI prints
    ``error: ...`` and a hint), not as the full usage text followed by the message."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse is probing alternatives internally
            return super().error(message, ex)
        flat = " ".join(line.strip(" -") for line in str(message).splitlines() if line.strip())
        # jsonargparse explains a rejected option of a subclass inside a long union report; keep its point.
        point = re.search(r"(Option '[^']+' is not accepted|Key '[^']+' is not expected)", flat)
        if point and "class_path" in flat:
            key = re.search(r'Parser key "([^"]+)"', flat)
            flat = f"{point.group(1)}" + (f" by {key.group(1)}" if key else "") + " (unknown option)"
        words = self.prog.replace(" [options]", "").split()
        command = "raserec" + (f" {words[-1]}" if len(words) > 1 else "")
        raise ConfigError(f"{flat[:500]} (run `{command} --help` for the options)") from ex


# The attribute docstrings of the typed configs (BankConfig, RAMConfig) are their --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class RaserecCLI(LightningCLI):
    """``fit``/``validate``/``test``/``predict`` over a :class:`RecommenderModule` subclass
    (``model.class_path``) and a :class:`SequenceDataModule` (``data``)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("parser_class", RaserecArgumentParser)
        super().__init__(
            RecommenderModule,
            SequenceDataModule,
            subclass_mode_model=True,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_items", "model.init_args.num_items", apply_on="instantiate")
        parser.add_lightning_class_args(EpochCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/HR@10", "checkpoint.mode": "max", "checkpoint.filename": "best",
            "checkpoint.save_last": True, "checkpoint.enable_version_counter": False,
        })
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults({"early_stopping.monitor": "val/HR@10", "early_stopping.mode": "max",
                             "early_stopping.patience": 10})
        if "weights_only" in {a.dest for a in parser._actions}:
            # Trainer.fit/test(ckpt_path=...) would unpickle anything (Lightning defaults to
            # weights_only=False): checkpoints are plain weights here, never code.
            parser.set_defaults({"weights_only": True})
        parser.add_class_arguments(ResultsSpec, "results")
        parser.add_argument("--predict_output", type=str, default="predictions.csv",
                            help="predict: file for each user's top-N items (.csv or .parquet)")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, test the best checkpoint (the last weights if none was saved)")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before LightningCLI merges its hyper-parameters into the config:
        the file must exist and load weights-only, and it must belong to the model class the
        config names (its saved class would otherwise silently replace the config's). A checkpoint
        that embeds its frozen encoder (RAFT) loads the encoder from itself, so a moved run
        directory stays usable: the recorded ``encoder_checkpoint`` path is provenance only."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        path = Path(ckpt_path)
        if not path.is_file():
            raise CheckpointError(f"{ckpt_path}: no such checkpoint file")
        blob = load_checkpoint_dict(path)
        if RECORD_KEY in blob and "state_dict" not in blob:
            self._take_encoder_record(subcommand, path)
            return
        if "state_dict" not in blob:
            raise CheckpointError(f"{ckpt_path}: not a checkpoint (no state_dict)")
        hparams = blob.get("hyper_parameters", {})
        saved = hparams.get("_class_path")
        configured = (self.config[subcommand].get("model") or {}).get("class_path")
        if saved and configured and saved != configured:
            raise CheckpointError(f"{ckpt_path} is a {saved.rsplit('.', 1)[-1]} checkpoint, but the config runs "
                                  f"{configured.rsplit('.', 1)[-1]}; pass the config the checkpoint was trained with")
        try:
            self._merge_ckpt_hparams(ckpt_path, dict(hparams), saved, configured)
        except (SystemExit, ConfigError) as exc:
            raise CheckpointError(f"{ckpt_path}: its hyper-parameters do not fit the config's model "
                                  f"{configured}; pass the config the checkpoint was trained with") from exc
        if RECORD_KEY in blob and "encoder_checkpoint" in hparams:
            self.config[subcommand]["model"]["init_args"]["encoder_checkpoint"] = str(path)

    def _take_encoder_record(self, subcommand: str, path: Path) -> None:
        """``--ckpt_path`` names a standalone encoder record (``results/<name>/seed_<s>/encoder.pt``):
        evaluate or predict with a pre-training config's model, its encoder's weights taken from
        the record (loaded in :meth:`_load_encoder_record`, once the model and data exist)."""
        if subcommand == "fit":
            raise CheckpointError(f"{path} is an encoder record, which cannot resume a fit (it holds no optimiser "
                                  "or loop state); resume from runs/.../last.ckpt, or fine-tune on it with "
                                  "--model.init_args.encoder_checkpoint")
        configured = (self.config[subcommand].get("model") or {}).get("class_path") or ""
        from raserec.pretrain.module import PretrainModule

        if configured.rsplit(".", 1)[-1] != PretrainModule.__name__:
            raise CheckpointError(f"{path} is an encoder record: evaluate it with a pre-training config (model "
                                  f"PretrainModule, e.g. configs/beauty_sasrec.yaml), not {configured or 'this one'}")
        self._encoder_record = path
        self.config[subcommand]["ckpt_path"] = None  # Lightning gets the model with the record's weights in it

    def _load_encoder_record(self) -> None:
        path = getattr(self, "_encoder_record", None)
        if path is None:
            return
        from raserec.checkpoint import check_same_data, load_encoder_for

        encoder, data = load_encoder_for(path, getattr(self.datamodule, "num_items", None))
        check_same_data(data, self.datamodule)
        try:
            self.model.encoder.load_state_dict(encoder.state_dict())
        except RuntimeError as exc:  # "Error(s) in loading state_dict ...:" then one line per mismatch
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = (lines[1:] or lines or [""])[0][:200]
            raise CheckpointError(f"{path}: the record's encoder ({encoder.class_path}) does not fit the config's "
                                  f"({self.model.encoder.class_path}): {detail}; pass the config it was trained "
                                  "with") from exc
        log.info("evaluating the encoder record %s", path)

    def _merge_ckpt_hparams(self, ckpt_path: str, hparams: dict, class_path: str | None,
                            configured: str | None) -> None:
        """LightningCLI's merge of a checkpoint's hyper-parameters into the config (``class_path``:
        the class the checkpoint saved; ``configured``: the config's, the same by the check above),
        minus the parent arguments the model fixes itself: GRASP saved its fixed ``objectives``
        in checkpoints written before 2026-12-05, and passing them back failed inside the class.
        Any other argument the class does not take still fails, as one error line."""
        hparams.pop("_instantiator", None)
        hparams.pop("_class_path", None)
        cls = _model_class(class_path or configured or "")
        fixed = [k for k in getattr(cls, "FIXED_HYPERPARAMETERS", ()) if k in hparams]
        for key in fixed:
            hparams.pop(key)
        if fixed:
            log.info("checkpoint hyper-parameters the model fixes itself, ignored: %s", ", ".join(fixed))
        accepted = _init_parameters(cls) if cls is not None else None
        unknown = sorted(set(hparams) - accepted) if accepted is not None else []
        if unknown:  # else a TypeError deep inside jsonargparse's instantiation
            raise CheckpointError(f"{ckpt_path}: hyper-parameters {', '.join(unknown)} are not arguments of "
                                  f"{cls.__name__}; was it written by another version of raserec?")
        if not hparams:
            return
        subcommand = self.config.subcommand
        merged = {subcommand: {"model": {"class_path": class_path, "dict_kwargs": hparams} if class_path else hparams}}
        self.config = self.parser.parse_object(merged, self.config)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        spec = self.config_init[self.subcommand].get("results") if self.subcommand else None
        if spec is not None and spec.path:
            parser = self._parser(self.subcommand)
            config = json.loads(parser.dump(self.config[self.subcommand], skip_none=False, format="json"))
            writer = ResultsWriter(spec.path, spec.dataset, spec.model, spec.notes, config=config, ranks=spec.ranks)
            # Before the checkpoint callbacks (Lightning ordered those last when it built the
            # trainer): a checkpoint saved at validation end must hold the writer's state of that epoch.
            at = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)), len(trainer.callbacks))
            trainer.callbacks.insert(at, writer)
        if self.subcommand == "predict":
            trainer.callbacks.append(TopNWriter(self.config_init["predict"]["predict_output"]))
        if self.subcommand == "fit" and trainer.progress_bar_callback is None:
            trainer.callbacks.append(EpochLog())  # background runs: one line per epoch
        return trainer

    def _check_model_fits_data(self, stage: str) -> None:
        """Before the trainer writes anything: the data's sequences must fit the encoder, and a
        semantic method's item text must exist."""
        check_fits_data(self.model, self.datamodule)
        if self.datamodule is not None:
            # imported here: the semantic stack (faiss, text encoders) is not every run's business
            from raserec.semantic.space import check_item_text

            check_item_text(self.model, self.datamodule.data_path, stage)
        if isinstance(self.model, FrozenEncoderMixin):  # a frozen pre-trained encoder: only on its own data
            self.model.check_encoder_data(self.datamodule)

    def before_fit(self) -> None:
        self._check_model_fits_data("fit")
        self._check_validation_runs()
        self._align_epoch_end_checks()

    def _align_epoch_end_checks(self) -> None:
        """Early stopping judges where the checkpoint is saved. Lightning resolves each one's
        "at the training epoch's end or at validation's end" on its own; when the checkpoint is saved
        at validation's end (``checkpoint.save_on_train_epoch_end false``, or validation not once per
        epoch) and early stopping judges at the epoch's end, a fit resumed from that checkpoint
        restarts at the epoch's end with no validation metric logged and fails in Lightning. An
        unset early stopping follows the checkpoint; one set against it is refused here."""
        trainer = self.trainer
        every_epoch = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1 \
            and getattr(trainer, "_val_check_time_interval", None) is None
        ckpt = trainer.checkpoint_callback
        flag = getattr(ckpt, "_save_on_train_epoch_end", None)
        if ckpt is None or (flag if flag is not None else every_epoch):
            return  # saved at the training epoch's end (or not at all): nothing to align
        for es in (c for c in trainer.callbacks if isinstance(c, EarlyStopping)):
            if es._check_on_train_epoch_end is None:
                es._check_on_train_epoch_end = False
            elif es._check_on_train_epoch_end:
                raise ConfigError(EPOCH_END_CONFLICT)

    def _check_validation_runs(self) -> None:
        """Early stopping and the best checkpoint read a validation metric: a fit without
        validation would train a whole epoch and then fail inside Lightning."""
        if self.trainer.limit_val_batches != 0:
            return
        monitors = sorted({c.monitor for c in self.trainer.callbacks
                           if isinstance(c, EarlyStopping | ModelCheckpoint) and c.monitor})
        if monitors:
            raise ConfigError(validation_off(monitors))

    def before_validate(self) -> None:
        self._check_model_fits_data("validate")
        self._load_encoder_record()

    def before_test(self) -> None:
        self._check_model_fits_data("test")
        self._load_encoder_record()

    def before_predict(self) -> None:
        self._check_model_fits_data("predict")
        self._load_encoder_record()

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True) or self.trainer.interrupted:
            return
        callback = self.trainer.checkpoint_callback
        ckpt = getattr(callback, "best_model_path", "") or None
        if ckpt and not Path(ckpt).is_file():
            # Resumed from a run directory that has since moved: the restored path is stale.
            moved = Path(callback.dirpath or ".") / Path(ckpt).name
            log.warning("best checkpoint %s no longer exists; testing %s", ckpt, moved if moved.is_file() else
                        "the last weights")
            ckpt = str(moved) if moved.is_file() else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)
