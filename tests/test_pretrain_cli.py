"""Pre-training stage end to end through the CLI: configs, checkpoints, determinism, resume,
DDP exactness and W&B offline logging. All on real Beauty with short schedules."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from raserec.checkpoint import RECORD_KEY, load_encoder
from raserec.cli import main
from raserec.data.datamodule import SequenceDataModule
from raserec.evaluation.per_query import metrics_from_ranks
from raserec.pretrain.module import PretrainModule
from tests.conftest import BEAUTY, require
from tests.wandb_log import logged

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _overrides(tmp: Path, name: str = "run") -> list[str]:
    return [
        "--trainer.logger.init_args.save_dir", str(tmp / "logs"),
        "--checkpoint.dirpath", str(tmp / name),
        "--data.cache_dir", str(tmp / "cache"),
    ]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One debug pre-training run on Beauty (5 train batches, 1 epoch) shared by several tests."""
    require(BEAUTY)
    tmp = tmp_path_factory.mktemp("pretrain")
    rc = main(["fit", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config", str(CONFIGS / "debug.yaml"),
               *_overrides(tmp), "--results.path", str(tmp / "result.json")])
    assert rc == 0
    return tmp


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses(config: str, capsys: pytest.CaptureFixture) -> None:
    # overlays that apply to one stage only go on top of that stage's config
    stage_of_overlay = {"ram_": "beauty_raft.yaml", "ada_authors": "ada_beauty.yaml", "grasp_": "beauty_grasp.yaml"}
    overlay_base = next((v for k, v in stage_of_overlay.items() if config.startswith(k)), "beauty_pretrain.yaml")
    base = [] if config.endswith(("pretrain.yaml", "sasrec.yaml", "raft.yaml")) else [
        "--config", str(CONFIGS / overlay_base)]
    with pytest.raises(SystemExit) as exc:
        main(["fit", *base, "--config", str(CONFIGS / config), "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("raserec.")
    assert printed["data"]["data_path"].startswith("../shared/data/")


def test_logger_overlay_parses(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config",
              str(CONFIGS / "logger" / "wandb.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["logger"]["class_path"].endswith("WandbLogger")


def test_unknown_config_key_is_an_error(capsys: pytest.CaptureFixture) -> None:
    # the Ada-Retrieval authors' --n_heads was silently dropped: here it is one error line, not 95 of usage
    assert main(["fit", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--model.init_args.n_heads", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "n_heads" in err and "raserec fit --help" in err


def test_paper_settings_in_beauty_configs() -> None:
    cfg = yaml.safe_load((CONFIGS / "beauty_pretrain.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert args["positive_pair"] == "dropout_and_same_target" and args["lambda_ret"] == 0.1
    assert args["temperature"] == 1.0 and args["lr"] == 0.001
    assert cfg["data"]["batch_size"] == 256 and cfg["trainer"]["max_epochs"] == 100
    assert cfg["early_stopping"]["patience"] == 10
    assert args["encoder"]["init_args"]["dropout"] == 0.5
    base = yaml.safe_load((CONFIGS / "beauty_sasrec.yaml").read_text())["model"]["init_args"]
    assert base["lambda_ret"] == 0.0 and base["positive_pair"] == "none"


def test_debug_run_writes_self_describing_checkpoint(debug_run: Path) -> None:
    ckpt = debug_run / "run" / "best.ckpt"
    assert ckpt.exists() and (debug_run / "run" / "last.ckpt").exists()
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    record = blob[RECORD_KEY]
    assert record["class_path"] == "raserec.models.encoders.sasrec.SASRec"
    assert record["init_args"]["num_items"] == 12_101 and record["data"]["num_items"] == 12_101
    encoder, fingerprint = load_encoder(ckpt)
    assert fingerprint["content_hash"]
    # the rebuilt encoder has exactly the trained module's weights
    module = PretrainModule.load_from_checkpoint(ckpt, encoder=lambda n: type(encoder)(n))
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, module.encoder.state_dict()[name]), name


def test_debug_run_results_file(debug_run: Path) -> None:
    result = json.loads((debug_run / "result.json").read_text())
    for key in ("command", "hardware", "dataset", "model", "seeds", "wall_time_s", "metrics"):
        assert key in result
    assert result["seeds"] == [2024]
    assert 0.0 <= result["metrics"]["test/HR@10"] <= 1.0
    assert result["metrics"]["test/NDCG@10"] <= result["metrics"]["test/HR@10"]
    assert not any(k.endswith("_std") for k in result["metrics"])  # one seed: no std
    assert result["config"]["model"]["init_args"]["lambda_ret"] == 0.1  # resolved config beside the figures
    assert [c["epoch"] for c in result["val_curve"]] == [1]
    # a one-epoch debug run says in its own record that it is not a result
    assert result["schedule"] == "capped at max_epochs 1: not converged"
    assert result["notes"].endswith("capped at max_epochs 1: not converged")


def test_predict_writes_original_ids(debug_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "top.csv"
    rc = main(["predict", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config", str(CONFIGS / "debug.yaml"),
               *_overrides(tmp_path), "--trainer.limit_predict_batches", "1.0",
               "--ckpt_path", str(debug_run / "run" / "best.ckpt"),
               "--predict_output", str(out)])
    assert rc == 0
    import polars as pl

    top = pl.read_csv(out)
    assert top.height == 22_363 and top["user"].n_unique() == 22_363  # every user once
    assert top.columns[:2] == ["user", "rank_1"]
    assert top["user"].cast(str).to_list()[:3] == ["1", "2", "3"]  # original user ids
    assert top["rank_1"].min() >= 1 and top["rank_1"].max() <= 12_101


def test_an_encoder_record_is_evaluated_like_its_checkpoint(debug_run: Path, tmp_path: Path, capsys) -> None:
    """``raserec test --ckpt_path results/<name>/seed_<s>/encoder.pt`` (a committed reference
    encoder, no Lightning state): the same metrics and per-query ranks as its checkpoint; a fit
    from it, a config of another model class or another encoder shape: one error line."""
    from raserec.checkpoint import save_encoder

    best = debug_run / "run" / "best.ckpt"
    encoder, data = load_encoder(best)
    record = save_encoder(encoder, tmp_path / "encoder.pt", data)
    base = ["--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config", str(CONFIGS / "debug.yaml"),
            *_overrides(tmp_path), "--trainer.limit_test_batches", "4"]
    for name, ckpt in (("ckpt", best), ("record", record)):
        assert main(["test", *base, "--ckpt_path", str(ckpt), "--results.path", str(tmp_path / f"{name}.json")]) == 0
    by_ckpt, by_record = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("ckpt", "record"))
    assert by_record == by_ckpt and by_ckpt["test/HR@50"] > 0
    assert np.array_equal(np.load(tmp_path / "record.ranks_test.npz")["rank"],
                          np.load(tmp_path / "ckpt.ranks_test.npz")["rank"])
    # the same results file without ranks: the earlier rank file goes too (it would pass for this run's)
    assert main(["test", *base, "--ckpt_path", str(record), "--results.path", str(tmp_path / "record.json"),
                 "--results.ranks", "false"]) == 0
    assert "ranks_file" not in json.loads((tmp_path / "record.json").read_text())
    assert not (tmp_path / "record.ranks_test.npz").exists()
    capsys.readouterr()
    cases = [(["fit", *base, "--ckpt_path", str(record)], "cannot resume a fit"),
             (["test", "--config", str(CONFIGS / "beauty_raft.yaml"), *_overrides(tmp_path), "--ckpt_path", str(record)],
              "evaluate it with a pre-training config"),
             (["test", *base, "--model.init_args.encoder.init_args.hidden_size", "32", "--ckpt_path", str(record)],
              "does not fit the config's")]
    for args, expected in cases:
        assert main(args) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and expected in err[0], err


def _short_fit(seed: int, max_epochs: int, ckpt_dir: Path | None = None, resume: str | None = None):
    L.seed_everything(seed, workers=True)
    dm = SequenceDataModule(require(BEAUTY), batch_size=64, cache_dir=None)
    dm.setup("fit")
    model = PretrainModule(dm.num_items, encoder=lambda n: __import__("raserec.models.encoders", fromlist=["SASRec"])
                           .SASRec(n, hidden_size=16, inner_size=32))
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1))
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=4, limit_val_batches=2, logger=False,
                        enable_checkpointing=ckpt_dir is not None, callbacks=callbacks, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(model, datamodule=dm, ckpt_path=resume)
    return model, trainer


def test_same_seed_same_metrics() -> None:
    a, ta = _short_fit(7, 1)
    b, tb = _short_fit(7, 1)
    c, tc = _short_fit(8, 1)
    assert ta.callback_metrics["val/HR@50"] == tb.callback_metrics["val/HR@50"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.encoder.item_embedding.weight, c.encoder.item_embedding.weight)


def test_resume_reaches_the_same_weights(tmp_path: Path) -> None:
    full, _ = _short_fit(3, 2)
    _short_fit(3, 1, ckpt_dir=tmp_path)
    resumed, _ = _short_fit(3, 2, ckpt_dir=tmp_path / "again", resume=str(tmp_path / "last.ckpt"))
    for (name, x), y in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_rng_states_cover_cuda_and_survive_a_weights_only_round_trip(tmp_path: Path) -> None:
    from raserec.evaluation.module import rng_states, set_rng_states

    states = rng_states()
    assert isinstance(states["cuda"], list)  # one state per CUDA device ([] on a CPU-only machine)
    assert len(states["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    torch.save(states, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    first = [torch.rand(4, device=d) for d in devices]
    set_rng_states(loaded)
    assert all(torch.equal(torch.rand(4, device=d), x) for d, x in zip(devices, first, strict=True))
    # a checkpoint saved before CUDA states were kept (or on another machine) still restores the rest
    set_rng_states({k: v for k, v in loaded.items() if k != "cuda"})
    assert torch.equal(torch.rand(4), first[0])
    set_rng_states({**loaded, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 3})
    assert torch.equal(torch.rand(4), first[0])


def _test_metrics(tmp: Path, ckpt: Path, devices: int) -> dict[str, float]:
    result = tmp / f"ddp{devices}.json"
    cmd = [sys.executable, "-m", "raserec.cli", "test", "--config", str(CONFIGS / "beauty_pretrain.yaml"),
           *_overrides(tmp, f"d{devices}"), "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
           "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.enable_progress_bar", "false",
           "--ckpt_path", str(ckpt), "--results.path", str(result), "--data.eval_batch_size", "500"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())["metrics"]


def test_ddp_two_processes_equal_single_process(debug_run: Path) -> None:
    ckpt = debug_run / "run" / "best.ckpt"
    single = _test_metrics(debug_run, ckpt, 1)
    double = _test_metrics(debug_run, ckpt, 2)
    # 22,363 queries over 2 ranks: a padding sampler would count one query twice
    assert single == double
    assert single["test/HR@50"] > 0
    # the per-query ranks are gathered from both processes into one file, in query order
    one, two = (np.load(debug_run / f"ddp{d}.ranks_test.npz") for d in (1, 2))
    assert np.array_equal(one["row"], np.arange(22363)) and np.array_equal(two["row"], one["row"])
    # each process packs other batches, whose float sums differ by ~1e-8: a tied target may move
    # by one rank (here 1 query of 22,363, at rank ~3,500); the metrics above are equal
    moved = one["rank"] != two["rank"]
    assert moved.sum() <= 3 and np.abs(one["rank"] - two["rank"]).max() <= 1
    assert metrics_from_ranks(two["rank"], (10,))["NDCG@10"] == pytest.approx(double["test/NDCG@10"], abs=1e-6)


def test_wandb_offline_receives_metrics_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require(BEAUTY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    rc = main(["fit", "--config", str(CONFIGS / "beauty_sasrec.yaml"), "--config", str(CONFIGS / "debug.yaml"),
               "--config", str(CONFIGS / "logger" / "wandb.yaml"), "--trainer.logger.init_args.save_dir",
               str(tmp_path), "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--test_after_fit", "true"])
    assert rc == 0
    import wandb

    wandb.finish()
    runs = glob.glob(str(tmp_path / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    assert runs, "no offline W&B run file"
    history, config = logged(runs[0])
    assert 0.0 <= history["val/HR@10"] <= 1.0 and 0.0 <= history["test/NDCG@10"] <= 1.0
    resolved = config["config"]
    assert resolved["model"]["init_args"]["lambda_ret"] == 0.0
    assert resolved["data"]["data_path"].endswith("Beauty.txt")
    assert resolved["trainer"]["logger"]["class_path"].endswith("WandbLogger")


def test_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("prepare", "stats", "fit", "validate", "test", "predict"):
        assert f"\n  {command}" in out


def test_missing_dataset_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["fit", "--config", str(CONFIGS / "beauty_sasrec.yaml"), "--data.data_path", str(tmp_path / "nope.txt"),
               "--checkpoint.dirpath", str(tmp_path / "ckpt")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "nope.txt" in err[-1]
    assert not (tmp_path / "ckpt").exists()


def test_unknown_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["train"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_test_metrics_do_not_depend_on_eval_batch_size() -> None:
    torch.manual_seed(0)
    results = []
    model = None
    for bs in (1024, 333):
        dm = SequenceDataModule(require(BEAUTY), eval_batch_size=bs, cache_dir=None)
        dm.setup("test")
        if model is None:
            model = PretrainModule(dm.num_items, positive_pair="none", lambda_ret=0.0)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        results.append(trainer.test(model, datamodule=dm, verbose=False)[0])
    assert results[0] == results[1]


def test_results_writer_state_survives_resume() -> None:
    from raserec.results import ResultsWriter

    first = ResultsWriter("unused.json", "Beauty", "m")
    first._curve.append({"epoch": 1, "val/HR@10": 0.1})
    state = first.state_dict()
    second = ResultsWriter("unused.json", "Beauty", "m")
    second.load_state_dict(state)
    second.on_train_start(None, None)  # resumed fit: the earlier curve and time carry over
    assert second._curve == [{"epoch": 1, "val/HR@10": 0.1}]
    assert second.state_dict()["elapsed_s"] >= state["elapsed_s"]
    # testing a checkpoint restores callback states too, but must not rewind the record
    third = ResultsWriter("unused.json", "Beauty", "m")
    third._curve.append({"epoch": 5})
    third.load_state_dict(state)
    third.on_test_start(None, None)
    assert third._curve == [{"epoch": 5}]


class Worsening(L.LightningModule):
    """A toy module whose validation score is best at the first epoch and worse after."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/HR@10", 1.0 / (self.current_epoch + 1))

    def test_step(self, batch, batch_idx):
        self.log("test/HR@10", 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("on_train_epoch_end", [None, False])  # both hooks Lightning saves in
def test_last_checkpoint_is_written_every_epoch_not_only_on_improvement(tmp_path, on_train_epoch_end) -> None:
    """Lightning 2.6 writes save_last only beside a new best; a resumed run would then restart
    from its best epoch. EpochCheckpoint writes last.ckpt after every validation."""
    import torch

    from raserec.lightning_cli import EpochCheckpoint

    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)
    ckpt = EpochCheckpoint(dirpath=tmp_path, monitor="val/HR@10", mode="max", filename="best", save_last=True,
                           enable_version_counter=False, save_on_train_epoch_end=on_train_epoch_end)
    trainer = L.Trainer(max_epochs=3, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Worsening(), data, data)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] == 0
    # The state keeps plain ModelCheckpoint's key: older checkpoints resume with their best score.
    (key,) = [k for k in last["callbacks"] if "Checkpoint" in k]
    assert key.startswith("ModelCheckpoint{") and last["callbacks"][key]["best_model_score"] == 1.0


class Recovering(Worsening):
    """Worse after the first epoch, then better every epoch from the fourth on."""

    def validation_step(self, batch, batch_idx):
        e = self.current_epoch
        self.log("val/HR@10", 1.0 / (e + 1) if e < 3 else float(e))


@pytest.mark.parametrize("how", ["early_stopping", "max_epochs", "max_time", "max_steps", "min_epochs", "resumed"])
def test_results_record_how_the_fit_ended(tmp_path, how) -> None:
    """The record's schedule says whether early stopping ended the fit or a cap cut it; a stop
    restored from an earlier fit, or one that min_epochs overruled, is not convergence."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from raserec.results import ResultsWriter

    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)

    def fit(max_epochs: int, ckpt_path: str | None = None, **limits) -> dict:
        writer = ResultsWriter(str(tmp_path / "r.json"), "toy", "m", notes="toy schedule")
        callbacks = [writer, ModelCheckpoint(dirpath=tmp_path, save_last=True)]
        if how in ("early_stopping", "min_epochs", "resumed"):
            callbacks.append(EarlyStopping("val/HR@10", mode="max", patience=2))
        trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, **limits)
        model = Recovering() if ckpt_path else Worsening()
        trainer.fit(model, data, data, ckpt_path=ckpt_path)
        trainer.test(model, data, verbose=False)
        return json.loads((tmp_path / "r.json").read_text())

    limits = {"max_time": {"max_time": {"seconds": 0}}, "max_steps": {"max_steps": 3},
              "min_epochs": {"min_epochs": 5}}.get(how, {})
    record = fit(6, **limits)
    if how == "resumed":  # stopped early after 3 epochs; resumed, it improves and runs to the cap
        assert record["schedule"].startswith("converged")
        record = fit(8, ckpt_path=str(tmp_path / "last.ckpt"))
    expected = {
        "early_stopping": "converged: early stopping on val/HR@10 (patience 2) ended the fit after 3 epochs",
        "max_epochs": "capped at max_epochs 6: not converged (no early stopping)",
        "max_time": "time-capped after 0 epochs (max_time): not converged",
        "max_steps": "capped at max_steps 3 (2 epochs): not converged",
        # patience ran out at epoch 3; min_epochs kept the fit going and early stopping ended it at 5
        "min_epochs": "converged: early stopping on val/HR@10 (patience 2) ended the fit after 5 epochs",
        "resumed": "capped at max_epochs 8: not converged",
    }[how]
    assert record["schedule"] == expected and record["notes"] == f"toy schedule; {expected}"


def test_a_run_resumed_on_another_machine_records_both(tmp_path, monkeypatch) -> None:
    """A carried checkpoint finished elsewhere: the record names every machine with its epochs,
    not only the one that finished the run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    import raserec.results as results

    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)

    def fit(machine: str, max_epochs: int, ckpt_path: str | None = None) -> dict:
        monkeypatch.setattr(results, "hardware", lambda: machine)
        writer = results.ResultsWriter(str(tmp_path / "r.json"), "toy", "m")
        trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                            enable_model_summary=False,
                            callbacks=[writer, ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        model = Worsening()
        trainer.fit(model, data, data, ckpt_path=ckpt_path)
        trainer.test(model, data, verbose=False)
        return json.loads((tmp_path / "r.json").read_text())

    one = fit("GPU box", 3)
    assert one["hardware"] == "GPU box" and "segments" not in one
    two = fit("CPU box", 5, ckpt_path=str(tmp_path / "last.ckpt"))
    assert two["hardware"] == "GPU box: epochs 1-3, then CPU box: epochs 4-5"
    assert [(s["hardware"], s["first_epoch"], s["last_epoch"]) for s in two["segments"]] == [
        ("GPU box", 1, 3), ("CPU box", 4, 5)]
    # resumed again on the same machine: one entry for it, not two
    three = fit("CPU box", 6, ckpt_path=str(tmp_path / "last.ckpt"))
    assert three["hardware"] == "GPU box: epochs 1-3, then CPU box: epochs 4-6"
    assert len(three["segments"]) == 2
    # resumed with nothing left to train (e.g. a crash while testing): the record is unchanged
    four = fit("Laptop", 6, ckpt_path=str(tmp_path / "last.ckpt"))
    assert four["hardware"] == three["hardware"] and four["val_curve"] == three["val_curve"]


def test_a_checkpoint_from_before_machines_were_recorded_says_so() -> None:
    from types import SimpleNamespace

    from raserec.results import NOT_RECORDED, ResultsWriter, hardware, hardware_of

    writer = ResultsWriter("unused.json", "Beauty", "m")
    writer.load_state_dict({"curve": [], "elapsed_s": 10.0})  # an older checkpoint: no segments
    writer.on_train_start(SimpleNamespace(current_epoch=8), None)
    writer._end_segment_at(12)
    assert hardware_of(writer._segments) == f"{NOT_RECORDED}: epochs 1-8, then {hardware()}: epochs 9-12"
    # a resume that stopped before finishing an epoch adds nothing, and does not hide the machine
    # that did run the epochs
    assert hardware_of([{"hardware": "A", "first_epoch": 1, "last_epoch": 4},
                        {"hardware": "B", "first_epoch": 5, "last_epoch": 4}]) == "A"
    assert hardware_of([]) == hardware()  # a test-only run


def test_the_cli_record_of_a_resumed_fit_saved_at_validation_end(beauty_slice: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Checkpoints saved at validation end hold the writer's state of that epoch (the writer runs
    before the checkpoint callbacks), and resuming a fit with nothing left to train keeps the
    record of the machines that trained it."""
    import raserec.results as results

    def fit(machine: str, max_epochs: int, *extra: str) -> dict:
        monkeypatch.setattr(results, "hardware", lambda: machine)
        rc = main(["fit", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                   *_overrides(tmp_path), "--data.data_path", str(beauty_slice), "--trainer.max_epochs",
                   str(max_epochs), "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
                   "--checkpoint.save_on_train_epoch_end", "false", "--early_stopping.check_on_train_epoch_end",
                   "false", "--results.path", str(tmp_path / "r.json"),
                   *extra])
        assert rc == 0
        return json.loads((tmp_path / "r.json").read_text())

    assert fit("A", 2)["hardware"] == "A"
    last = str(tmp_path / "run" / "last.ckpt")
    record = fit("B", 3, "--ckpt_path", last)
    assert record["hardware"] == "A: epochs 1-2, then B: epoch 3"
    assert [c["epoch"] for c in record["val_curve"]] == [1, 2, 3]
    again = fit("C", 3, "--ckpt_path", last)  # already at max_epochs: trains nothing
    assert again["hardware"] == "A: epochs 1-2, then B: epoch 3"
    assert [c["epoch"] for c in again["val_curve"]] == [1, 2, 3]


def test_a_fit_without_progress_bar_logs_one_line_per_epoch(beauty_slice: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Background runs (``--trainer.enable_progress_bar false``) say how each epoch went: its
    validation metrics (the same as the results file's curve), the best so far and how long ago
    (against early stopping's patience), in one line; a resumed fit keeps the best."""
    import re

    def fit(max_epochs: int, *extra: str) -> list[str]:
        rc = main(["fit", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                   *_overrides(tmp_path), "--data.data_path", str(beauty_slice), "--trainer.max_epochs",
                   str(max_epochs), "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
                   "--results.path", str(tmp_path / "r.json"), *extra])
        assert rc == 0
        lines = [r.getMessage() for r in caplog.records if r.name == "raserec.epoch_log"]
        caplog.clear()
        return lines

    lines = fit(3)
    assert [re.search(r"epoch (\d+)/3:", line).group(1) for line in lines] == ["1", "2", "3"]
    curve = json.loads((tmp_path / "r.json").read_text())["val_curve"]
    values = [float(re.search(r"val/HR@10 ([\d.]+) ", line).group(1)) for line in lines]
    assert values == pytest.approx([c["val/HR@10"] for c in curve], abs=6e-5)
    best = max(range(3), key=lambda i: (curve[i]["val/HR@10"], -i))
    assert f"at epoch {best + 1}, {2 - best} of patience 10)" in lines[-1]
    assert re.search(r"\), val/NDCG@10 [\d.]+, train/loss [\d.]+, \d+ s$", lines[-1])  # @10 only
    # resumed for a fourth epoch: the best of the first three is still known
    resumed = fit(4, "--ckpt_path", str(tmp_path / "run" / "last.ckpt"))
    assert len(resumed) == 1 and resumed[0].count("epoch 4/4:") == 1
    fourth = json.loads((tmp_path / "r.json").read_text())["val_curve"][-1]["val/HR@10"]
    expected = max(curve[best]["val/HR@10"], fourth)
    assert f"best {expected:.4f} at epoch {best + 1 if fourth <= curve[best]['val/HR@10'] else 4}, " in resumed[0]
    assert fit(1, "--trainer.enable_progress_bar", "true") == []  # the bar says it


def test_early_stopping_judges_where_the_checkpoint_is_saved(beauty_slice: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture, capsys) -> None:
    """``checkpoint.save_on_train_epoch_end false``: an unset early stopping follows it, so a fit resumed
    from a checkpoint saved at validation's end runs (Lightning failed: "Early stopping conditioned on
    metric val/HR@10 which is not available"); one set against it is one error line; and with
    validation every 2 epochs the epoch line's best epoch counts validations, not epochs."""
    import re

    def fit(max_epochs: int, *extra: str) -> int:
        return main(["fit", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config", str(CONFIGS / "debug.yaml"),
                     *_overrides(tmp_path), "--data.data_path", str(beauty_slice), "--trainer.max_epochs",
                     str(max_epochs), "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
                     "--test_after_fit", "false", *extra])

    at_validation = ("--checkpoint.save_on_train_epoch_end", "false")
    assert fit(1, *at_validation) == 0
    assert fit(2, *at_validation, "--ckpt_path", str(tmp_path / "run" / "last.ckpt")) == 0
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["epoch"] == 1  # the second epoch ran
    capsys.readouterr()
    for bad in (at_validation, ("--trainer.check_val_every_n_epoch", "2")):
        assert fit(1, *bad, "--early_stopping.check_on_train_epoch_end", "true") == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "a resumed fit would find no validation metric" in err[0]
    caplog.clear()
    assert fit(6, "--trainer.check_val_every_n_epoch", "2", "--checkpoint.dirpath", str(tmp_path / "every2")) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "raserec.epoch_log"]
    assert [re.search(r"epoch (\d+)/6:", line).group(1) for line in lines] == ["2", "4", "6"]
    # the best two validations ago is 4 epochs ago (on hand-set state: real curves need not fall)
    from types import SimpleNamespace

    from raserec.epoch_log import EpochLog

    stopper = SimpleNamespace(monitor="val/HR@10", best_score=torch.tensor(0.2), wait_count=2, patience=10)
    callback = EpochLog()
    callback._pending = (10, {"val/HR@10": 0.1}, None)
    caplog.clear()
    callback._flush(SimpleNamespace(early_stopping_callback=stopper, check_val_every_n_epoch=2, max_epochs=20))
    assert caplog.records[-1].getMessage() == "epoch 10/20: val/HR@10 0.1000 (best 0.2000 at epoch 6, 2 of patience 10)"


def test_a_ddp_fit_logs_each_epoch_once(beauty_slice: Path, tmp_path: Path) -> None:
    """Two processes (gloo on CPU), progress bar off: one epoch line per epoch, from rank 0."""
    cmd = [sys.executable, "-m", "raserec.cli", "fit", "--config", str(CONFIGS / "beauty_sasrec.yaml"), "--config",
           str(CONFIGS / "debug.yaml"), *_overrides(tmp_path), "--data.data_path", str(beauty_slice),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
           "--test_after_fit", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "raserec.epoch_log" in line]
    assert [line.split(":")[1].strip().split()[1] for line in lines] == ["1/2", "2/2"], lines


def test_a_checkpoint_stores_the_encoder_once_and_carries_slim(debug_run: Path, tmp_path: Path) -> None:
    """The encoder record beside ``state_dict`` shares its storage (the weights are written once),
    and the slim copies ``raserec experiment --carry`` commits still test and resume exactly."""
    from raserec.experiments.runner import CARRY_DROPS, slim_copy

    best = debug_run / "run" / "best.ckpt"
    blob = torch.load(best, weights_only=True)
    record = blob["raserec_encoder"]["state_dict"]
    table = blob["state_dict"]["encoder.item_embedding.weight"]
    assert record["item_embedding.weight"].untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
    nbytes = sum(t.numel() * t.element_size() for t in blob["state_dict"].values())
    assert best.stat().st_size < 3.3 * nbytes  # weights + Adam's two moments + small state (was 4 copies)
    slim = slim_copy(best, tmp_path / "best.ckpt", CARRY_DROPS["best"])
    assert slim.stat().st_size < 1.2 * nbytes
    base = ["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config", str(CONFIGS / "debug.yaml"),
            *_overrides(tmp_path)]
    metrics = []
    for ckpt in (best, slim):
        out = tmp_path / f"{ckpt.parent.name}.json"
        assert main([*base, "--ckpt_path", str(ckpt), "--results.path", str(out)]) == 0
        metrics.append(json.loads(out.read_text())["metrics"])
    assert metrics[0] == metrics[1] and metrics[0]["test/HR@50"] > 0


def test_resume_from_a_slim_carried_checkpoint_reaches_the_same_weights(tmp_path: Path) -> None:
    from raserec.experiments.runner import CARRY_DROPS, slim_copy

    full, _ = _short_fit(3, 2)
    _short_fit(3, 1, ckpt_dir=tmp_path)
    slim = slim_copy(tmp_path / "last.ckpt", tmp_path / "carried" / "last.ckpt", CARRY_DROPS["last"])
    resumed, _ = _short_fit(3, 2, ckpt_dir=tmp_path / "again", resume=str(slim))
    for (name, x), y in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_a_slim_carried_raft_checkpoint_finds_its_encoder_on_a_fresh_machine(short_experiment, beauty_slice,
                                                                             tmp_path) -> None:
    """A RAFT stage's carried ``last`` keeps its encoder record: on a machine without stage 1's files
    (the path recorded in its hyper-parameters is gone) it still validates from itself."""
    from raserec.experiments.runner import CARRY_DROPS, slim_copy

    _, runs, name = short_experiment
    blob = torch.load(runs / name / "seed_1" / "finetune" / "checkpoints" / "last.ckpt", weights_only=True)
    blob["hyper_parameters"]["encoder_checkpoint"] = str(tmp_path / "gone" / "best.ckpt")  # another machine's path
    blob["raserec_encoder"]["state_dict"] = {k: v.clone() for k, v in blob["raserec_encoder"]["state_dict"].items()}
    torch.save(blob, tmp_path / "full.ckpt")  # as a GPU run writes it: the record a second copy
    slim = slim_copy(tmp_path / "full.ckpt", tmp_path / "carried.ckpt", CARRY_DROPS["last"])
    assert slim.stat().st_size < (tmp_path / "full.ckpt").stat().st_size  # the two copies merged
    rc = main(["validate", "--config", str(CONFIGS / "beauty_raft.yaml"), *_overrides(tmp_path),
               "--data.data_path", str(beauty_slice), "--trainer.limit_val_batches", "2",
               "--trainer.enable_progress_bar", "false", "--ckpt_path", str(slim)])
    assert rc == 0
