"""The experiment runner: stages per seed, resumption, per-query ranks, summaries and the paired test."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raserec.checkpoint import load_encoder
from raserec.cli import main
from raserec.errors import RaserecError
from raserec.evaluation.per_query import metrics_from_ranks
from raserec.experiments.compare import Side, available_ranks, compare
from raserec.experiments.runner import (
    ExperimentSpec,
    ranks_from_checkpoint,
    ranks_from_stage_files,
    restore_carried,
    stage_command,
)
from raserec.experiments.summary import paired_tests
from raserec.results import write_results

pytestmark = pytest.mark.slow


def test_each_seed_has_both_stages_ranks_and_configs(short_experiment):
    results, runs, name = short_experiment
    for seed in (1, 2):
        pre = json.loads((results / name / f"seed_{seed}" / "pretrain.json").read_text())
        fine = json.loads((results / name / f"seed_{seed}" / "finetune.json").read_text())
        assert pre["seeds"] == [seed] and fine["seeds"] == [seed]
        assert pre["config"]["seed_everything"] == seed
        # stage 2 used stage 1's best checkpoint of the same seed
        assert fine["config"]["model"]["init_args"]["encoder_checkpoint"] == \
            str(runs / name / f"seed_{seed}" / "pretrain" / "checkpoints" / "best.ckpt")
        ranks = np.load(results / name / f"seed_{seed}" / "ranks_test.npz")
        assert len(ranks["encoder"]) == len(ranks["finetune"]) == 1500  # one test query per user
        # the per-query ranks reproduce the Lightning test loop's metrics exactly
        for stage, key in ((pre, "encoder"), (fine, "finetune")):
            m = metrics_from_ranks(ranks[key], (5, 10, 20, 50))
            for metric in ("HR@5", "NDCG@10", "HR@50"):
                assert m[metric] == pytest.approx(stage["metrics"][f"test/{metric}"], abs=1e-6), (key, metric)
        # the stage-1 encoder is exported beside the results, identical to the best checkpoint's
        exported, data = load_encoder(results / name / f"seed_{seed}" / "encoder.pt")
        best, _ = load_encoder(runs / name / f"seed_{seed}" / "pretrain" / "checkpoints" / "best.ckpt")
        assert all(torch.equal(t, exported.state_dict()[k]) for k, t in best.state_dict().items())
        assert data["exported_from"].endswith("best.ckpt") and data["num_items"] > 0
    # different seeds train different models
    a = json.loads((results / name / "seed_1" / "pretrain.json").read_text())["metrics"]
    b = json.loads((results / name / "seed_2" / "pretrain.json").read_text())["metrics"]
    assert a != b


def test_summary_is_the_mean_and_std_over_seeds(short_experiment):
    results, _, name = short_experiment
    summary = json.loads((results / name / "summary.json").read_text())
    per = [json.loads((results / name / f"seed_{s}" / "finetune.json").read_text())["metrics"] for s in (1, 2)]
    values = [p["test/NDCG@10"] for p in per]
    assert summary["finetune"]["test/NDCG@10"] == pytest.approx(np.mean(values))
    assert summary["finetune"]["test/NDCG@10_std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["seeds"] == [1, 2]
    assert set(summary["paper"]) == {"DuoRec (paper)", "RaSeRec (paper)"}
    for seed_entry in summary["per_seed"]:
        for test in seed_entry["paired_test"].values():
            assert 0.0 <= test["p_ttest"] <= 1.0 and 0.0 <= test["p_wilcoxon"] <= 1.0
    record = json.loads((results / f"{name}.json").read_text())
    for key in ("command", "hardware", "dataset", "model", "seeds", "wall_time_s", "metrics"):
        assert key in record
    assert record["command"].startswith("raserec experiment --name beauty_raserec")
    assert record["metrics"]["test/HR@10"] == summary["finetune"]["test/HR@10"]
    # a debug schedule labels itself in the record the README reads, for both stages
    capped = "capped at max_epochs 1: not converged"
    assert record["notes"] == f"{capped}; seed 1 stage 1 {capped}; seed 2 stage 1 {capped}"
    assert summary["per_seed"][0]["schedule"] == {"pretrain": capped, "finetune": capped}
    md = (results / name / "summary.md").read_text()
    assert "RaSeRec (paper) | 0.0569" in md and "Paired significance tests" in md


def test_rerun_skips_finished_stages(short_experiment, capsys, monkeypatch):
    results, runs, name = short_experiment
    stamps = {p: p.stat().st_mtime_ns for p in (results / name).rglob("*.json") if p.parent.name.startswith("seed")}
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["experiment", "--name", name, "--pretrain", "configs/beauty_pretrain.yaml", "--finetune",
                 "configs/beauty_raft.yaml", "--seeds", "1", "2", "--results-dir", str(results),
                 "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 6
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_carry_copies_unfinished_stages_for_the_next_machine(tmp_path, capsys, monkeypatch):
    from raserec.experiments.runner import main as experiment

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = ["--name", "x", "--pretrain", "configs/beauty_pretrain.yaml", "--finetune", "configs/beauty_raft.yaml",
            "--seeds", "1", "2", "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]
    spec = ExperimentSpec("x", Path("configs/beauty_pretrain.yaml"), Path("configs/beauty_raft.yaml"), [1, 2],
                          results_dir=tmp_path / "results", runs_dir=tmp_path / "runs")
    assert experiment([*argv, "--carry"]) == 0 and "nothing to carry" in capsys.readouterr().out
    # seed 1: stage 1 finished (results file), stage 2 interrupted; seed 2: stage 1 interrupted
    def checkpoint(seed: int, stage: str, which: str) -> dict:
        weights = {"encoder.w": torch.full((64, 64), float(seed))}
        return {"epoch": 3, "tag": f"{seed}-{stage}-{which}", "state_dict": weights,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(64, 64), "exp_avg_sq": torch.ones(64, 64)}}}],
                "lr_schedulers": [], "callbacks": {"ResultsWriter": {"curve": [{"epoch": 3}]}},
                "raserec_encoder": {"state_dict": {"w": weights["encoder.w"].clone()}}}  # a GPU run's second copy

    for seed, stage in ((1, "pretrain"), (1, "finetune"), (2, "pretrain")):
        for which in ("last", "best"):
            path = spec.checkpoint(seed, stage, which)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint(seed, stage, which), path)
    spec.stage_results(1, "pretrain").parent.mkdir(parents=True, exist_ok=True)
    spec.stage_results(1, "pretrain").write_text("{}")
    assert experiment([*argv, "--carry"]) == 0
    carried = sorted(p.relative_to(tmp_path / "results") for p in (tmp_path / "results").rglob("*.ckpt"))
    assert [str(p) for p in carried] == ["x/seed_1/finetune_best.ckpt", "x/seed_1/finetune_last.ckpt",
                                         "x/seed_2/pretrain_best.ckpt", "x/seed_2/pretrain_last.ckpt"]
    assert "carried" in capsys.readouterr().out
    # carried slim: `last` keeps all a resumed fit restores; `best` (only ever tested) leaves its optimizer
    # state; in both the encoder record's weights are the module's own, stored once
    last = torch.load(spec.carried(2, "pretrain", "last"), weights_only=True)
    best = torch.load(spec.carried(2, "pretrain", "best"), weights_only=True)
    full = checkpoint(2, "pretrain", "last")
    assert set(last) == set(full) and last["tag"] == "2-pretrain-last"
    assert set(best) == set(full) - {"optimizer_states", "lr_schedulers"} and best["tag"] == "2-pretrain-best"
    assert torch.equal(last["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(64, 64))
    for blob in (last, best):
        record, table = blob["raserec_encoder"]["state_dict"]["w"], blob["state_dict"]["encoder.w"]
        assert torch.equal(record, torch.full((64, 64), 2.0))
        assert record.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
    assert not [p for p in spec.seed_dir(2).rglob("*") if ".tmp" in p.name]  # no temporary left behind
    for which, share in (("last", 0.8), ("best", 0.6)):  # of the full copy's 4 weight-sized tensors: 3 and 2 left
        assert spec.carried(2, "pretrain", which).stat().st_size < share * spec.checkpoint(2, "pretrain", which).stat().st_size
    # on a fresh machine (no runs/), the same command restores them and resumes
    import shutil

    shutil.rmtree(tmp_path / "runs")
    assert restore_carried(spec, 2, "pretrain")
    assert torch.load(spec.checkpoint(2, "pretrain", "last"), weights_only=True)["tag"] == "2-pretrain-last"
    args = stage_command(spec, 2, "pretrain")
    assert args[args.index("--ckpt_path") + 1] == str(spec.checkpoint(2, "pretrain", "last"))


def test_finished_seeds_are_summarized_before_the_experiment_ends(tmp_path, capsys, monkeypatch):
    """A three-seed run can take days: the seeds that finished are summarized after each seed and
    by --carry, not only when the last seed ends."""
    import raserec.experiments.runner as runner
    from raserec.errors import RaserecError
    from raserec.results import write_results

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = ["--name", "x", "--pretrain", "configs/beauty_sasrec.yaml", "--seeds", "1", "2",
            "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]

    def stage(spec, seed, stage, lock_fd=None):  # seed 1 finishes, seed 2 is cut off
        if seed == 2:
            raise RaserecError("x: seed 2, stage pretrain failed (exit -9)")
        write_results(spec.stage_results(seed, stage), {
            "metrics": {"test/HR@10": 0.25, "test/NDCG@10": 0.125}, "epochs": 3, "wall_time_s": 60.0,
            "command": "raserec fit", "hardware": "cpu", "model": "SASRec", "dataset": "Beauty",
            "schedule": "converged"})

    monkeypatch.setattr(runner, "run_stage", stage)
    monkeypatch.setattr(runner, "check_stage_commands", lambda spec: None)
    with pytest.raises(RaserecError, match="seed 2"):
        runner.run(runner.parse_args(argv))
    record = json.loads((tmp_path / "results" / "x.json").read_text())
    assert record["seeds"] == [1] and record["metrics"]["test/HR@10"] == 0.25
    assert "summary of seeds 1:" in capsys.readouterr().out
    (tmp_path / "results" / "x.json").unlink()
    assert runner.main([*argv, "--carry"]) == 0  # nothing to carry, but the finished seed is summarized
    assert json.loads((tmp_path / "results" / "x.json").read_text())["seeds"] == [1]


def test_status_says_where_each_seed_stands(tmp_path, capsys, monkeypatch):
    from raserec.experiments.runner import main as experiment
    from raserec.results import write_results

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    argv = ["--name", "x", "--pretrain", "configs/beauty_sracl.yaml", "--seeds", "1", "2", "3", "4",
            "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]
    spec = ExperimentSpec("x", Path("configs/beauty_sracl.yaml"), None, [1, 2, 3, 4],
                          results_dir=tmp_path / "results", runs_dir=tmp_path / "runs")
    write_results(spec.stage_results(1, "pretrain"), {"epochs": 71, "metrics": {"test/NDCG@10": 0.04694},
                                                      "schedule": "converged: early stopping"})

    def checkpoint(path: Path, epochs: int, wait: int, every: int = 1) -> None:
        # validation every `every` epochs: early stopping's wait counts validations, not epochs
        curve = [{"epoch": e, "val/HR@10": 0.1 + 0.001 * min(e, epochs - wait * every)}
                 for e in range(every, epochs + 1, every)]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": epochs - 1, "state_dict": {}, "callbacks": {
            "EarlyStopping{'monitor': 'val/HR@10', 'mode': 'max'}": {
                "wait_count": wait, "best_score": torch.tensor(curve[-1]["val/HR@10"]), "patience": 10},
            "ResultsWriter": {"curve": curve, "elapsed_s": 1.0}},
            "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": epochs}}}}}, path)

    checkpoint(spec.checkpoint(2, "pretrain", "last"), 12, 3, every=2)
    checkpoint(spec.carried(3, "pretrain", "last"), 8, 0)
    assert experiment([*argv, "--status"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "x seed 1 pretrain: finished: 71 epochs, test NDCG@10 0.0469 (converged: early stopping)",
        f"x seed 2 pretrain: unfinished: 12 epochs saved in {spec.checkpoint(2, 'pretrain', 'last')}; "
        "best val/HR@10 0.1060 at epoch 6, 3 of patience 10",
        f"x seed 3 pretrain: unfinished: 8 epochs saved in {spec.carried(3, 'pretrain', 'last')}; "
        "best val/HR@10 0.1080 at epoch 8, 0 of patience 10 (carried)",
        "x seed 4 pretrain: not started"]
    assert not (tmp_path / "results" / "x.json").exists()  # --status writes nothing
    # a damaged file is one error line; the other seeds are still listed
    spec.carried(3, "pretrain", "last").write_bytes(b"junk")
    with pytest.raises(RaserecError, match="seed 3 pretrain: .*not a loadable checkpoint"):
        experiment([*argv, "--status"])
    assert len(capsys.readouterr().out.splitlines()) == 3
    # a stage 1 that --stage1-from will take
    two = ["--name", "y", "--pretrain", "configs/beauty_pretrain.yaml", "--finetune", "configs/beauty_raft.yaml",
           "--stage1-from", "x", "--seeds", "1", "5", "--results-dir", str(tmp_path / "results"),
           "--runs-dir", str(tmp_path / "runs")]
    (spec.seed_dir(1) / "encoder.pt").write_bytes(b"")
    assert experiment([*two, "--status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"y seed 1 pretrain: to be taken from {spec.seed_dir(1)}"
    assert out[2] == f"y seed 5 pretrain: --stage1-from x has not finished it ({spec.seed_dir(5)})"


def test_one_run_per_experiment(tmp_path, capsys, monkeypatch):
    """A second run, a carry and a status of an experiment that is running: refused with one line
    naming the holder (nothing created), refused, and told; the lock outlives the runner in its
    `raserec fit` children (inherited descriptor) and goes with the last of them."""
    import subprocess
    import sys

    from raserec.experiments.lock import hold, lock_path, running
    from raserec.experiments.runner import main as experiment

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    results, runs = tmp_path / "results", tmp_path / "runs"
    argv = ["--name", "x", "--pretrain", "configs/beauty_pretrain.yaml", "--seeds", "1",
            "--results-dir", str(results), "--runs-dir", str(runs)]
    assert running(runs, "x") is None and not runs.exists()  # read-only: creates nothing
    ckpt = ExperimentSpec("x", Path("configs/beauty_pretrain.yaml"), None, [1], results_dir=results,
                          runs_dir=runs).checkpoint(1, "pretrain", "last")
    ckpt.parent.mkdir(parents=True)
    torch.save({"epoch": 2, "state_dict": {}}, ckpt)
    with hold(runs, "x") as fd:
        assert running(runs, "x") == os.getpid()
        with pytest.raises(RaserecError, match=rf"x: cannot run: the experiment is running now \(started by pid {os.getpid()}"):
            experiment(argv)
        assert not results.exists()  # refused before the results directory was made
        with pytest.raises(RaserecError, match="x: cannot carry: the experiment is running now"):
            experiment([*argv, "--carry"])
        assert not results.exists()
        assert experiment([*argv, "--status"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"x: running now (pid {os.getpid()})"
        # a child given the descriptor keeps the lock after this process lets go of it
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(fd,))
    try:
        assert running(runs, "x") == os.getpid()  # still held, by the child
    finally:
        child.kill()
        child.wait()
    assert running(runs, "x") is None and lock_path(runs, "x").is_file()  # released; the file is harmless
    assert experiment([*argv, "--carry"]) == 0  # not running any more: carried
    assert "carried" in capsys.readouterr().out


def test_a_stage_2_conflict_is_refused_before_stage_1_trains(tmp_path, monkeypatch):
    """What `raserec fit` refuses only once it starts (validation off under early stopping, early
    stopping at the epoch's end against a checkpoint at validation's) is read off each stage's printed
    config, so a bad stage 2 fails before stage 1 runs for hours; nothing is created."""
    import yaml

    from raserec.experiments.runner import main as experiment
    from raserec.lightning_cli import fit_config_conflicts

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    raft = yaml.safe_load((repo / "configs" / "beauty_raft.yaml").read_text())
    cases = {"epoch_end": ({"checkpoint": {"save_on_train_epoch_end": False},
                            "early_stopping": {"check_on_train_epoch_end": True}}, "a resumed fit would find no"),
             "no_validation": ({"trainer": {"limit_val_batches": 0}}, "turns validation off")}
    for name, (change, why) in cases.items():
        config = {**raft, **{k: {**(raft.get(k) or {}), **v} for k, v in change.items()}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(RaserecError, match=f"the finetune stage's `raserec fit` command is refused: .*{why}"):
            experiment(["--name", "x", "--pretrain", "configs/beauty_pretrain.yaml", "--finetune", str(path),
                        "--seeds", "1", "--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")])
        assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()
    # validation every 2 epochs puts the checkpoint at validation's end too; unset early stopping is fine
    every2 = {"trainer": {"check_val_every_n_epoch": 2}, "checkpoint": {"save_on_train_epoch_end": None}}
    assert len(fit_config_conflicts({**every2, "early_stopping": {"check_on_train_epoch_end": True}})) == 1
    assert fit_config_conflicts({**every2, "early_stopping": {"check_on_train_epoch_end": None}}) == []
    assert fit_config_conflicts({"checkpoint": {"save_on_train_epoch_end": True},
                                 "early_stopping": {"check_on_train_epoch_end": True}}) == []
    # as Lightning: check_val_every_n_epoch null is not "every epoch"; its debug flags rewrite the schedule
    stop_at_end = {"early_stopping": {"check_on_train_epoch_end": True}}
    assert len(fit_config_conflicts({"trainer": {"check_val_every_n_epoch": None}, **stop_at_end})) == 1
    for debug in ({"fast_dev_run": True}, {"overfit_batches": 2}):
        assert fit_config_conflicts({"trainer": {"limit_val_batches": 0, **debug}, **stop_at_end,
                                     "checkpoint": {"monitor": "val/HR@10", "save_on_train_epoch_end": False}}) == []


def test_a_stage_child_inherits_the_experiment_lock(tmp_path, monkeypatch):
    import raserec.experiments.runner as runner

    spec = ExperimentSpec("x", Path("configs/beauty_pretrain.yaml"), None, [1], results_dir=tmp_path / "results",
                          runs_dir=tmp_path / "runs")
    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(kwargs)
        write_results(spec.stage_results(1, "pretrain"), {"metrics": {}})
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    monkeypatch.setattr(runner, "export_encoder", lambda spec, seed: None)
    runner.run_stage(spec, 1, "pretrain", lock_fd=7)
    assert seen["pass_fds"] == (7,)


def test_interrupted_stage_resumes_from_last_checkpoint(tmp_path):
    spec = ExperimentSpec("x", Path("configs/beauty_pretrain.yaml"), Path("configs/beauty_raft.yaml"), [7],
                          results_dir=tmp_path / "results", runs_dir=tmp_path / "runs")
    args = stage_command(spec, 7, "pretrain")
    assert "--ckpt_path" not in args
    assert args[args.index("--trainer.enable_progress_bar") + 1] == "false"  # stages write to a log file
    bar = ExperimentSpec("x", spec.pretrain, spec.finetune, [7], results_dir=spec.results_dir, runs_dir=spec.runs_dir,
                         extra_args=["--trainer.enable_progress_bar", "true"])
    assert stage_command(bar, 7, "pretrain").count("--trainer.enable_progress_bar") == 1  # the user's, once
    last = spec.checkpoint(7, "pretrain", "last")
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    args = stage_command(spec, 7, "pretrain")
    assert args[args.index("--ckpt_path") + 1] == str(last)
    # on another machine (no runs/): checkpoints carried beside the results are restored first
    carried_last, carried_best = spec.carried(7, "finetune", "last"), spec.carried(7, "finetune", "best")
    carried_last.parent.mkdir(parents=True)
    carried_last.write_bytes(b"last")
    carried_best.write_bytes(b"best")
    assert restore_carried(spec, 7, "finetune")
    assert spec.checkpoint(7, "finetune", "last").read_bytes() == b"last"
    assert spec.checkpoint(7, "finetune", "best").read_bytes() == b"best"
    args = stage_command(spec, 7, "finetune")
    assert args[args.index("--ckpt_path") + 1] == str(spec.checkpoint(7, "finetune", "last"))
    assert not restore_carried(spec, 7, "finetune")  # nothing missing: nothing copied
    fine = stage_command(spec, 7, "finetune")
    # no stage-1 checkpoint on this machine (runs/ is not committed): the exported encoder record
    assert fine[fine.index("--model.init_args.encoder_checkpoint") + 1] == str(spec.encoder_record(7))
    spec.checkpoint(7, "pretrain").write_bytes(b"")
    fine = stage_command(spec, 7, "finetune")
    assert fine[fine.index("--model.init_args.encoder_checkpoint") + 1] == str(spec.checkpoint(7, "pretrain"))
    assert fine[fine.index("--seed_everything") + 1] == "7"


def test_a_failing_stage_is_reported_with_its_log(tmp_path, capsys, beauty_slice, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    for attempt in ("first", "second"):  # the same stage log: each failure reports its own error
        code = main(["experiment", "--name", "bad", "--pretrain", "configs/beauty_pretrain.yaml", "--finetune",
                     "configs/beauty_raft.yaml", "--seeds", "1", "--results-dir", str(tmp_path / "r"),
                     "--runs-dir", str(tmp_path / "runs"), "--fit-args", f"--data.data_path /nonexistent/{attempt}.txt"])
        assert code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "stage pretrain failed" in errors[0], errors
        assert f"/nonexistent/{attempt}.txt: no such file" in errors[0] and "stage.log" in errors[0], errors


def test_missing_config_is_a_clear_error(capsys):
    assert main(["experiment", "--name", "x", "--pretrain", "nope.yaml", "--finetune", "configs/beauty_raft.yaml"]) == 2
    assert "nope.yaml: no such config file" in capsys.readouterr().err


def test_paired_tests_detect_a_real_difference():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, 5000)
    better = np.where(rng.random(5000) < 0.3, base // 4, base)  # 30% of queries move up
    t = paired_tests(base, better)["NDCG@10"]
    assert t["mean_diff"] > 0 and t["p_ttest"] < 1e-6 and t["queries_worse"] == 0
    same = paired_tests(base, base)["NDCG@10"]
    assert same["p_ttest"] == 1.0 and same["mean_diff"] == 0.0


def test_fit_args_cannot_override_what_the_runner_manages(capsys):
    assert main(["experiment", "--name", "x", "--pretrain", "configs/beauty_pretrain.yaml", "--finetune",
                 "configs/beauty_raft.yaml", "--fit-args=--results.path=elsewhere.json"]) == 2
    assert "--fit-args must not set --results.path=elsewhere.json" in capsys.readouterr().err


def test_readme_table_is_generated_from_the_experiment(short_experiment):
    from raserec.results_table import END, START, render

    results, _, name = short_experiment
    summary = json.loads((results / name / "summary.json").read_text())
    block = render(results)
    assert block.startswith(START) and block.endswith(END)
    mean, std = summary["finetune"]["test/HR@10"], summary["finetune"]["test/HR@10_std"]
    row = next(line for line in block.splitlines() if "| ours: RaSeRec |" in line)
    assert f"{mean:.4f} ± {std:.4f}" in row and "| 1, 2 |" in row
    assert "| not converged in every stage and seed (see the records' schedule): not a result |" in row
    assert "| Beauty | sasrec | RaSeRec (paper) | 0.0569 | 0.0369 | 0.0860 | 0.0463 |" in block
    # the experiment's results-file is not listed a second time among the single runs
    assert f"| {name}.json |" not in block
    # cost per stage: epochs and seconds per epoch from the per-seed records
    cost = next(line for line in block.splitlines() if line.startswith(f"| {name} | Beauty | finetune |"))
    epochs = [e["epochs"]["finetune"] for e in summary["per_seed"]]
    per_epoch = np.mean([e["wall_time_s"]["finetune"] / e["epochs"]["finetune"] for e in summary["per_seed"]])
    assert f"| 2 | {', '.join(map(str, epochs))} |" in cost and f"| {per_epoch:.0f} |" in cost


def test_summary_of_an_ada_experiment_without_ranks(tmp_path):
    """Ada-Retrieval stage-2 files carry only @20/@50 and base/test/*; the summary copes."""
    from raserec.experiments.summary import summarize

    spec = ExperimentSpec("beauty_ada", Path("a.yaml"), Path("b.yaml"), [1], results_dir=tmp_path, command="c")
    seed_dir = spec.seed_dir(1)
    seed_dir.mkdir(parents=True)
    common = {"command": "raserec fit", "hardware": "cpu", "dataset": "Beauty", "epochs": 1, "wall_time_s": 2.0}
    (seed_dir / "pretrain.json").write_text(json.dumps({**common, "metrics": {"test/HR@10": 0.1, "test/HR@50": 0.3}}))
    (seed_dir / "finetune.json").write_text(json.dumps({**common, "model": "Ada", "metrics": {
        "test/HR@50": 0.32, "base/test/HR@50": 0.3}, "config": {"model": {"init_args": {"mask_history": False}}}}))
    summary = summarize(spec)
    assert summary["finetune"] == {"test/HR@50": 0.32}  # one seed: no std
    assert summary["per_seed"][0]["base_same_protocol"] == {"HR@50": 0.3}
    record = json.loads((tmp_path / "beauty_ada.json").read_text())
    assert record["metrics"] == {"test/HR@50": 0.32, "base/test/HR@50": 0.3}  # the README's Ada table reads both
    from raserec.results_table import ada_table, load

    row = next(line for line in ada_table(load(tmp_path)).splitlines() if "beauty_ada.json" in line)
    assert "| 0.3200 |  | 0.3000 |" in row and "| +6.7% |" in row and "| False |" in row
    md = (tmp_path / "beauty_ada" / "summary.md").read_text()
    # Ada's own protocol: top-50 metrics against the frozen backbone scored the same way
    assert "| ours: frozen pre-trained backbone, same protocol |  |  | 0.3000 |  |" in md
    assert "| ours: gain over encoder |  |  | +6.7% |  |" in md
    assert "| 1 | 0.3000 | 0.3200 | — | — |" in md
    # and the RaSeRec experiments table, which reads @5/@10, leaves it to the Ada table
    from raserec.results_table import experiments_table

    assert "beauty_ada" not in experiments_table(tmp_path) and "Ada" not in experiments_table(tmp_path)


def test_a_one_stage_experiment_summarises_its_stage_over_seeds(tmp_path, capsys):
    """Without --finetune (SASRec, SRA-CL, GRASP over seeds): one stage per seed, no ranks step,
    an encoder record only where the checkpoint holds one, and the results file holds that
    stage's mean and std."""
    from raserec.experiments.runner import parse_args, run

    spec = parse_args(["--name", "beauty_grasp", "--pretrain", "configs/beauty_grasp.yaml", "--seeds", "1", "2",
                       "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    assert spec.finetune is None and spec.stages == ("pretrain",)
    values = {1: 0.03, 2: 0.05}
    for seed, ndcg in values.items():
        spec.seed_dir(seed).mkdir(parents=True)
        (spec.seed_dir(seed) / "pretrain.json").write_text(json.dumps({
            "command": f"raserec fit --seed_everything {seed}", "hardware": f"cpu {seed % 2}", "dataset": "Beauty",
            "model": "SASRec + GRASP", "epochs": 30 + seed, "wall_time_s": 100.0, "notes": "to early stopping",
            "metrics": {"test/NDCG@10": ndcg, "test/HR@10": 2 * ndcg}}))
    # seed 1 left a checkpoint without an encoder record (as GRASP's, whose backbone alone is not
    # the model): nothing is exported and the run still summarises
    spec.checkpoint(1, "pretrain").parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, spec.checkpoint(1, "pretrain"))
    summary = run(spec)
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 2 and "ranks" not in out
    assert not spec.encoder_record(1).exists()
    record = json.loads((tmp_path / "beauty_grasp.json").read_text())
    assert record["metrics"]["test/NDCG@10"] == pytest.approx(0.04)
    assert record["metrics"]["test/NDCG@10_std"] == pytest.approx(np.std([0.03, 0.05], ddof=1))
    assert record["seeds"] == [1, 2] and record["model"] == "SASRec + GRASP" and record["wall_time_s"] == 200.0
    assert record["epochs"] == "31, 32" and summary["metrics"] == record["metrics"]
    assert record["hardware"] == "cpu 1, cpu 0"  # every machine the seeds ran on, in seed order
    assert "| 2 | — | — | 0.1000 | 0.0500 | 32 | 100 s |" in (tmp_path / "beauty_grasp" / "summary.md").read_text()
    # one seed: no _std keys (only where there are several seeds)
    single = parse_args(["--name", "beauty_grasp", "--pretrain", "configs/beauty_grasp.yaml", "--seeds", "2",
                         "--results-dir", str(tmp_path)])
    assert run(single)["metrics"] == {"test/NDCG@10": 0.05, "test/HR@10": 0.1}
    # the README tables list it once, as a single-model row (not as a two-stage experiment)
    from raserec.results_table import render

    block = render(tmp_path)
    assert block.count("| beauty_grasp.json |") == 2  # the quality table and the semantic table
    assert "ours: pre-trained encoder" not in block


def test_reproduction_queue_reads_done_and_carried_seeds(tmp_path):
    from raserec.experiments.plan import PLAN, Planned, check_plan, queue_table

    check_plan(PLAN, Path(__file__).resolve().parents[1])  # every planned command names real configs
    with pytest.raises(FileNotFoundError, match="configs/nope.yaml"):
        check_plan((Planned("x", "--pretrain configs/nope.yaml"),), Path(__file__).resolve().parents[1])
    plan = (Planned("beauty_a", "--pretrain configs/beauty_sasrec.yaml"),
            Planned("beauty_b", "--pretrain configs/beauty_grasp.yaml", (2024,)),
            Planned("beauty_c", "--pretrain configs/beauty_sracl.yaml"))
    (tmp_path / "beauty_a" / "seed_2025").mkdir(parents=True)
    (tmp_path / "beauty_a" / "summary.json").write_text(json.dumps({"seeds": [2024], "wall_time_s": 7200.0}))
    (tmp_path / "beauty_a" / "seed_2025" / "pretrain_last.ckpt").write_bytes(b"")
    (tmp_path / "beauty_b").mkdir()
    (tmp_path / "beauty_b" / "summary.json").write_text(json.dumps({"seeds": [2024], "wall_time_s": 3600.0}))
    rows = queue_table(tmp_path, plan).splitlines()[2:]
    assert rows[0] == ("| beauty_a | 2024 / 3 | 2025 | 2.0 | `raserec experiment --name beauty_a --pretrain "
                       "configs/beauty_sasrec.yaml --seeds 2024 2025 2026` |")
    assert rows[1] == "| beauty_b | 2024 / 1 |  | 1.0 | done |"
    assert rows[2].startswith("| beauty_c | none / 3 |  |  | `raserec experiment --name beauty_c")


def test_plan_lists_and_acts_on_the_queue_in_plan_order(tmp_path, capsys, monkeypatch):
    from raserec.experiments import runner
    from raserec.experiments.lock import hold
    from raserec.experiments.plan import Planned
    from raserec.experiments.plan import main as plan_main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    plan = (Planned("a", "--pretrain configs/beauty_sasrec.yaml"),
            Planned("b", "--pretrain configs/beauty_grasp.yaml", (2024,)),
            Planned("c", "--pretrain configs/beauty_sracl.yaml"),
            Planned("d", "--pretrain configs/beauty_pretrain.yaml --finetune configs/beauty_raft.yaml "
                         "--stage1-from a"))
    results, runs = tmp_path / "results", tmp_path / "runs"
    dirs = ["--results-dir", str(results), "--runs-dir", str(runs)]
    (results / "a" / "seed_2025").mkdir(parents=True)
    (results / "a" / "summary.json").write_text(json.dumps({"seeds": [2024], "wall_time_s": 7200.0}))
    (results / "a" / "seed_2025" / "pretrain_last.ckpt").write_bytes(b"")
    (results / "b").mkdir()
    (results / "b" / "summary.json").write_text(json.dumps({"seeds": [2024], "wall_time_s": 3600.0}))
    with hold(runs, "c"):
        assert plan_main(dirs, plan) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == ["a: seeds done 2024 / 3; carried 2025",
                       "  raserec experiment --name a --pretrain configs/beauty_sasrec.yaml --seeds 2024 2025 2026",
                       "b: seeds done 2024 / 1", "  done"]
    assert out[4] == f"c: seeds done none / 3; running now (pid {os.getpid()})"
    # actions go to `raserec experiment`, in plan order whatever order the names are given in
    calls = []

    def fake(argv):
        calls.append(argv)
        if argv[1] == "c" and "--status" not in argv:
            raise RaserecError("c: seed 2024, stage pretrain failed")
        if argv[1] == "a" and "--status" in argv:
            raise RaserecError("a seed 2025 pretrain: not a loadable checkpoint")
        return 0

    monkeypatch.setattr(runner, "main", fake)
    with pytest.raises(RaserecError, match=r"^c: seed 2024, stage pretrain failed; not run: d$"):
        plan_main(["--run", "d", "c", "a", *dirs], plan)
    assert [c[1] for c in calls] == ["a", "c"]  # stopped at the first failure
    assert calls[0] == ["--name", "a", "--pretrain", "configs/beauty_sasrec.yaml", "--seeds", "2024", "2025",
                        "2026", *dirs]
    calls.clear()
    with pytest.raises(RaserecError, match="^a seed 2025 pretrain: not a loadable checkpoint$"):
        plan_main(["--status", *dirs], plan)  # default: the unfinished ones, each asked despite a failure
    assert [(c[1], c[-1]) for c in calls] == [("a", "--status"), ("c", "--status"), ("d", "--status")]
    calls.clear()
    assert plan_main(["--carry", "b", *dirs], plan) == 0 and calls[0][-1] == "--carry"
    # the default directories are not passed on: the command a results file records is the planned one
    calls.clear()
    assert plan_main(["--run", "b", "--results-dir", "results", "--runs-dir", str(runs)], plan) == 0
    assert calls == [["--name", "b", "--pretrain", "configs/beauty_grasp.yaml", "--seeds", "2024",
                      "--runs-dir", str(runs)]]
    for bad, why in ((["nope", *dirs], "not a planned experiment: nope"),
                     (["--run", "--carry", *dirs], "not allowed with argument")):
        with pytest.raises(RaserecError, match=why):
            plan_main(bad, plan)


@pytest.mark.parametrize("argv", [["stats", "BEAUTY"], ["plan"]])
def test_a_closed_pipe_ends_quietly(argv, tmp_path):
    """`raserec plan | head`: the reader is gone before anything is written; exit 0, no traceback."""
    import subprocess
    import sys

    from tests.conftest import BEAUTY, require

    argv = [str(require(BEAUTY)) if a == "BEAUTY" else a for a in argv]
    if argv == ["plan"]:  # an empty queue of our own, not the repository's results/ and runs/
        argv += ["--results-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]
    script = f"import sys; from raserec.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    proc.stdout.close()  # long before the child has imported anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""


def test_schedule_notes_list_every_stage_1_and_only_differing_later_schedules():
    from raserec.experiments.summary import ONE_STAGE_NOTES, TWO_STAGE_NOTES, _notes

    conv, cap = "converged: early stopping", "capped at max_epochs 3: not converged"
    two = [{"seed": 1, "schedule": {"pretrain": conv, "finetune": conv}},
           {"seed": 2, "schedule": {"pretrain": cap, "finetune": conv}},
           {"seed": 3, "schedule": {"pretrain": conv, "finetune": cap}}]
    assert _notes("first", two, TWO_STAGE_NOTES) == (
        f"first; seed 1 stage 1 {conv}; seed 2 stage 1 {cap}; seed 3 stage 1 {conv}; seed 3 stage 2 {cap}")
    one = [{"seed": 1, "schedule": conv}, {"seed": 2, "schedule": conv}, {"seed": 3, "schedule": cap},
           {"seed": 4, "schedule": None}]
    assert _notes("", one, ONE_STAGE_NOTES) == f"seed 3 {cap}"


def test_each_stage_test_pass_writes_the_ranks_the_runner_recomputes(short_experiment):
    """Every stage's own test pass (Lightning loop, ``QueryRanks`` metric) writes its per-query
    ranks; they must be exactly the ranks recomputed outside the Trainer from the RAFT checkpoint
    (what the runner falls back to), and the runner's ``ranks_test.npz`` combines them."""
    results, runs, name = short_experiment
    spec = ExperimentSpec(name=name, pretrain=Path("configs/beauty_pretrain.yaml"),
                          finetune=Path("configs/beauty_raft.yaml"), seeds=[1, 2], results_dir=results, runs_dir=runs)
    for seed in (1, 2):
        seed_dir = results / name / f"seed_{seed}"
        raft = np.load(seed_dir / "ranks_test.npz")
        recomputed = ranks_from_checkpoint(spec, seed)
        assert set(recomputed) == set(raft.files)
        for key in raft.files:
            assert np.array_equal(recomputed[key], raft[key]), (seed, key)
        for stage, key in (("pretrain", "encoder"), ("finetune", "finetune")):
            record = json.loads((seed_dir / f"{stage}.json").read_text())
            assert record["ranks_file"] == f"{stage}.ranks_test.npz"
            own = np.load(seed_dir / record["ranks_file"])
            assert np.array_equal(own["row"], np.arange(1500))  # every test query, in query order
            for field in ("user", "end", "target"):
                assert np.array_equal(own[field], raft[field])
            assert np.array_equal(own["rank"], raft[key]), (seed, stage)
        assert set(available_ranks(seed_dir)) == {"pretrain", "finetune"}
    # RAFT against its own encoder, through compare: the same paired tests as the summary's
    record = compare(Side(results / name, "pretrain"), Side(results / name, None))
    summary = json.loads((results / f"{name}.json").read_text())
    assert record["seeds"] == [1, 2]
    for seed in ("1", "2"):
        assert record["paired_test_per_seed"][seed]["paired_test"] == summary["paired_test_per_seed"][seed]
    # over seed means: the summary reads the logged (float32) metrics, compare the ranks (float64)
    for key, test in summary["paired_test_across_seeds"].items():
        for field, value in test.items():
            got = record["paired_test_across_seeds"][key][field]
            assert got == value if value is None else got == pytest.approx(value, rel=1e-5, abs=1e-8), (key, field)


def test_ranks_from_stage_files_refuses_partial_mismatched_or_damaged_files(tmp_path):
    """The runner's ``ranks_test.npz`` from the stages' own files (written in query order); a
    limited test pass, rows out of order, a missing stage, other queries or a damaged file give
    ``None`` (the runner then ranks again from the checkpoint)."""
    n = 6
    user, end, target = np.arange(n) * 3, np.arange(n) + 2, np.arange(n) + 10

    def write(stage, rank, rows=None, total=n, tgt=target):
        rows = np.arange(n) if rows is None else rows
        np.savez(tmp_path / f"{stage}.ranks_test.npz", row=rows, user=user[rows], end=end[rows], target=tgt[rows],
                 rank=rank[rows], queries_total=np.int64(total))

    assert ranks_from_stage_files(tmp_path) is None
    encoder, tuned = np.array([5, 1, 9, 2, 7, 3]), np.array([4, 1, 2, 2, 8, 1])
    write("pretrain", encoder)
    assert ranks_from_stage_files(tmp_path) is None  # no fine-tuned stage yet
    write("finetune", tuned)
    got = ranks_from_stage_files(tmp_path)
    assert got is not None
    for key, want in (("user", user), ("end", end), ("target", target), ("encoder", encoder), ("finetune", tuned)):
        assert np.array_equal(got[key], want), key
    for kwargs in ({"rows": np.arange(n - 1)},  # limited test pass: 5 of 6 queries
                   {"rows": np.array([0, 3, 1, 4, 2, 5])},  # not in query order
                   {"tgt": target + 1}):  # other queries
        write("finetune", tuned, **kwargs)
        assert ranks_from_stage_files(tmp_path) is None, kwargs
    (tmp_path / "finetune.ranks_test.npz").write_bytes(b"PK\x03\x04 cut short")
    assert ranks_from_stage_files(tmp_path) is None
