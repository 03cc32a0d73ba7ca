"""Config groups (stage / data / model, run name given once) compose to the same settings as the
flat per-run files, which are kept because recorded results name them."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raserec.cli import expand_name
from raserec.errors import ConfigError
from raserec.experiments.runner import parse_args, stage_command

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

#: Flat file -> the groups that compose it (stage, data[, model]).
COMPOSITIONS = {
    **{f"{d}_pretrain.yaml": ["stage/pretrain", f"data/{d}"] for d in ("beauty", "sports", "clothing", "yelp")},
    **{f"{d}_raft.yaml": ["stage/raft", f"data/{d}"] for d in ("beauty", "sports", "clothing")},
    **{f"{d}_sasrec.yaml": ["stage/sasrec", f"data/{d}"] for d in ("beauty", "sports", "clothing")},
    **{f"{d}_{b}_pretrain.yaml": ["stage/pretrain", f"data/{d}", f"model/{b}"]
       for d in ("beauty", "sports") for b in ("gru4rec", "bert4rec")},
    "yelp_gru4rec_pretrain.yaml": ["stage/pretrain", "data/yelp", "model/gru4rec"],
    **{f"{d}_{b}_raft.yaml": ["stage/raft", f"data/{d}"] for d in ("beauty", "sports") for b in ("gru4rec", "bert4rec")},
    **{f"ada_{d}.yaml": ["stage/ada", f"data/{d}"] for d in ("beauty", "sports", "yelp")},
    **{f"ada_{d}_gru4rec.yaml": ["stage/ada", f"data/{d}"] for d in ("beauty", "sports", "yelp")},
    "ada_raserec_beauty.yaml": ["stage/ada_raserec", "data/beauty"],
    "beauty_sasrec_bce.yaml": ["stage/sasrec_bce", "data/beauty"],
    **{f"{d}_{m}.yaml": [f"stage/{m}", f"data/{d}"] for d in ("beauty", "sports") for m in ("sracl", "grasp")},
}
#: Settings that name the run (set by --name or the runner) or describe it in words.
RUN_SPECIFIC = [("trainer", "logger", "init_args", "name"), ("checkpoint", "dirpath"), ("results", "path"),
                ("results", "model"), ("results", "notes"), ("model", "init_args", "encoder_checkpoint")]


def merge(base: dict, over: dict) -> dict:
    """jsonargparse's composition of two configs: nested mappings merge; a different
    ``class_path`` replaces the whole object (its ``init_args`` with it)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            if "class_path" in value and value["class_path"] != out[key].get("class_path"):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def without_run_specific(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for path in RUN_SPECIFIC:
        node = cfg
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return _pruned(cfg)


def _pruned(node):
    if not isinstance(node, dict):
        return node
    return {k: v for k, v in ((k, _pruned(v)) for k, v in node.items()) if v != {}}


@pytest.mark.parametrize("flat", sorted(COMPOSITIONS))
def test_groups_compose_to_the_flat_file(flat: str) -> None:
    composed: dict = {}
    for group in COMPOSITIONS[flat]:
        composed = merge(composed, yaml.safe_load((CONFIGS / f"{group}.yaml").read_text()))
    assert without_run_specific(composed) == without_run_specific(yaml.safe_load((CONFIGS / flat).read_text()))


def test_the_ce_baseline_differs_from_stage_one_only_in_the_retrieval_loss() -> None:
    # The SASRec rows are the baselines RaSeRec's gains are measured against: same encoder, data,
    # schedule and early stopping, only the InfoNCE term off (a drift here would confound them).
    def load(name: str) -> dict:
        cfg = yaml.safe_load((CONFIGS / "stage" / f"{name}.yaml").read_text())
        cfg["results"].pop("model")
        for key in ("positive_pair", "lambda_ret"):
            cfg["model"]["init_args"].pop(key)
        return cfg

    baseline, stage_one = load("sasrec"), load("pretrain")
    assert baseline == stage_one
    raw = yaml.safe_load((CONFIGS / "stage" / "sasrec.yaml").read_text())["model"]["init_args"]
    assert raw["lambda_ret"] == 0.0 and raw["positive_pair"] == "none"


def test_semantic_rows_differ_from_their_baseline_only_in_the_method() -> None:
    # Every semantic row is compared with the SASRec (or RaSeRec) row of the same data, encoder,
    # schedule, optimiser and early stopping: only the method's own settings may differ.
    def load(name: str, method_keys: tuple[str, ...]) -> dict:
        cfg = yaml.safe_load((CONFIGS / "stage" / f"{name}.yaml").read_text())
        cfg["results"].pop("model")
        cfg["model"].pop("class_path")
        for key in method_keys:
            cfg["model"]["init_args"].pop(key, None)
        return cfg

    sasrec_only = ("positive_pair", "lambda_ret", "temperature", "similarity")
    for name, keys in (("sracl", ("objectives",)), ("grasp", ("semantic", "hae", "similar_users"))):
        assert load(name, keys + sasrec_only) == load("sasrec", sasrec_only), name
    assert load("raft_semantic_keys", ("semantic", "semantic_weight")) == load("raft", ())
    # ... and the method's settings are those of the papers' Beauty rows
    sracl = yaml.safe_load((CONFIGS / "stage" / "sracl.yaml").read_text())["model"]["init_args"]["objectives"]
    assert [o.get("init_args", {}).get("weight") for o in sracl] == [None, 0.1, 0.1]
    assert sracl[1]["init_args"]["semantic"]["k"] == 10 and sracl[2]["init_args"]["substitution"] == 0.2


def test_every_flat_run_config_has_a_composition() -> None:
    overlays = {"debug.yaml", "cpu_short.yaml", "ram_residual.yaml", "beauty_semantic_pretrain.yaml", "bf16.yaml",
                "ada_authors.yaml", "grasp_id_residual.yaml"}
    flat = {p.name for p in CONFIGS.glob("*.yaml")} - overlays
    assert flat == set(COMPOSITIONS)


def test_name_is_given_once_and_later_options_still_win() -> None:
    assert expand_name(["--config", "a.yaml", "--name", "sports_sasrec", "--results.path", "x.json"]) == [
        "--config", "a.yaml", "--trainer.logger.init_args.name", "sports_sasrec", "--checkpoint.dirpath",
        "runs/sports_sasrec/checkpoints", "--results.path", "results/sports_sasrec.json", "--results.path", "x.json"]
    assert expand_name(["--name=b"])[1] == "b"
    for bad in (["--name"], ["--name", "../up"], ["--name", "a b"]):
        with pytest.raises(ConfigError):
            expand_name(bad)


def test_composed_run_resolves_through_lightningcli(tmp_path) -> None:
    """The real parser agrees with :func:`merge`: the GRU4Rec group replaces SASRec's arguments."""
    out = subprocess.run([sys.executable, "-m", "raserec.cli", "fit", "--config", "configs/stage/pretrain.yaml",
                          "--config", "configs/data/sports.yaml", "--config", "configs/model/gru4rec.yaml",
                          "--name", "sports_gru4rec_pretrain", "--print_config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["trainer"]["logger"]["init_args"]["name"] == "sports_gru4rec_pretrain"
    assert cfg["checkpoint"]["dirpath"] == "runs/sports_gru4rec_pretrain/checkpoints"
    assert cfg["results"]["path"] == "results/sports_gru4rec_pretrain.json"
    assert cfg["data"]["data_path"] == "../shared/data/Sports_and_Outdoors.txt" and cfg["data"]["batch_size"] == 256
    encoder = cfg["model"]["init_args"]["encoder"]
    assert encoder["class_path"].endswith("GRU4Rec") and "attn_dropout" not in encoder["init_args"]


def test_runner_applies_data_to_both_stages_and_model_to_stage_one() -> None:
    spec = parse_args(["--name", "x", "--pretrain", str(CONFIGS / "stage/pretrain.yaml"), "--finetune",
                       str(CONFIGS / "stage/raft.yaml"), "--data", str(CONFIGS / "data/sports.yaml"), "--model",
                       str(CONFIGS / "model/bert4rec.yaml"), "--seeds", "1"])
    assert spec.backbone == "bert4rec"
    pre, fine = stage_command(spec, 1, "pretrain"), stage_command(spec, 1, "finetune")
    configs = lambda args: [args[i + 1] for i, a in enumerate(args) if a == "--config"]  # noqa: E731
    assert [Path(c).name for c in configs(pre)] == ["pretrain.yaml", "sports.yaml", "bert4rec.yaml"]
    assert [Path(c).name for c in configs(fine)] == ["raft.yaml", "sports.yaml"]
