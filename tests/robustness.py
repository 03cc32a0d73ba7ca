"""The bad-input probe: every case runs the real ``raserec`` command in-process, in an empty working
directory, and must end in exactly one ``error:`` line with exit code 2, no traceback, no file
left behind and (for hostile checkpoints) no code run. ``tests/test_robustness.py`` asserts it;

    python -m tests.robustness [--out results/robustness.json]

re-runs the probe and records its figures."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BEAUTY = (ROOT.parent / "shared" / "data" / "Beauty.txt").resolve()
DATA = ["--data.data_path", str(BEAUTY), "--data.cache_dir", "null"]
# A case the code fails to refuse must not train for minutes: one batch at most.
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1"]
PRETRAIN = ["fit", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, *SHORT]
RAFT = ["fit", "--config", str(CONFIGS / "beauty_raft.yaml"), *DATA, *SHORT]


@dataclass
class Case:
    """One bad input: ``argv(workdir)`` builds the command (and any files it needs, under
    ``inputs``); ``expect`` is a fragment of the error line; ``marker``: a file a hostile input
    tries to create."""

    name: str
    group: str
    argv: Callable[[Path], list[str]]
    expect: str
    marker: bool = False


@dataclass
class Outcome:
    name: str
    group: str
    code: int | None
    error_lines: list[str]
    traceback: bool
    left_behind: list[str]
    code_ran: bool
    seconds: float
    expected_found: bool
    detail: str = field(default="")

    @property
    def clean(self) -> bool:
        return (self.code == 2 and len(self.error_lines) == 1 and not self.traceback and not self.left_behind
                and not self.code_ran and self.expected_found)


# ----------------------------------------------------------------------------- input builders
def _inputs(work: Path) -> Path:
    d = work.parent / "inputs"
    d.mkdir(exist_ok=True)
    return d


def _file(work: Path, name: str, content: str | bytes) -> str:
    path = _inputs(work) / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _marker(work: Path) -> Path:
    return _inputs(work) / "MARKER"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _encoder(work: Path, num_items: int = 12_101, **changes) -> str:
    from raserec.checkpoint import RECORD_KEY, encoder_record
    from raserec.models.encoders import SASRec

    torch.manual_seed(0)
    record = encoder_record(SASRec(num_items, hidden_size=16, num_layers=1, inner_size=32), {"num_items": num_items})
    record.update(changes)
    path = _inputs(work) / f"encoder_{len(list(_inputs(work).iterdir()))}.pt"
    torch.save({RECORD_KEY: record}, path)
    return str(path)


def _tampered_encoder(work: Path) -> str:
    from raserec.checkpoint import RECORD_KEY

    path = _encoder(work)
    blob = torch.load(path, weights_only=True)
    blob[RECORD_KEY]["state_dict"]["item_embedding.weight"][5, 3] += 1.0
    torch.save(blob, path)
    return path


def _pickle(work: Path) -> str:
    path = _inputs(work) / "hostile.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(_marker(work))}, path)
    return str(path)


def _raft_ckpt_for_pretrain_config(work: Path) -> str:
    import lightning as L

    from raserec.finetune.module import RAFTModule

    module = RAFTModule(num_items=12_101, encoder_checkpoint=_encoder(work))
    module.hparams["_class_path"] = "raserec.finetune.module.RAFTModule"
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(_inputs(work)))
    trainer.strategy.connect(module)
    path = _inputs(work) / "raft.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _raft(work: Path, *extra: str, encoder: str | None = None) -> list[str]:
    return [*RAFT, "--model.init_args.encoder_checkpoint", encoder or _encoder(work), *extra]


def _amazon(work: Path, record: str) -> str:
    return _file(work, "reviews_x_5.json", record + "\n")


AMAZON_OK = '{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}'


def _experiments(work: Path, **broken: object) -> list[str]:
    """Two experiment directories whose seed 1 has per-query ranks; ``broken`` replaces arrays of
    the second one's file (e.g. ``rank=...``)."""
    n = 50
    arrays = {"row": np.arange(n), "user": np.arange(n), "end": np.arange(n) + 3, "target": np.arange(n) + 7,
              "rank": np.arange(n) % 40, "queries_total": np.int64(n)}
    dirs = []
    for name, changes in (("base", {}), ("other", broken)):
        seed = _inputs(work) / f"exp_{name}_{len(list(_inputs(work).iterdir()))}" / "seed_1"
        seed.mkdir(parents=True)
        np.savez(seed / "pretrain.ranks_test.npz", **{**arrays, **changes})
        dirs.append(str(seed.parent))
    return ["compare", *dirs]


def _tensor(work: Path) -> str:
    path = _inputs(work) / "tensor.pt"
    torch.save(torch.zeros(3), path)
    return str(path)


def _experiment(*extra: str) -> list[str]:
    # results and runs inside the case's working directory: nothing may be left there
    return ["experiment", "--name", "t", "--pretrain", str(CONFIGS / "beauty_pretrain.yaml"), "--results-dir", "r",
            "--runs-dir", "rr", *extra]


def _status(work: Path, record: str | None = None, carried: str | None = None) -> list[str]:
    """``experiment --status`` over a results directory whose seed 1 has a damaged stage record or
    a carried checkpoint (a file path whose bytes are copied)."""
    seed = _inputs(work) / f"status_{len(list(_inputs(work).iterdir()))}" / "t" / "seed_1"
    seed.mkdir(parents=True)
    if record is not None:
        (seed / "pretrain.json").write_text(record)
    if carried is not None:
        (seed / "pretrain_last.ckpt").write_bytes(Path(carried).read_bytes())
    return _experiment("--seeds", "1", "--status", "--results-dir", str(seed.parent.parent))


def cases() -> list[Case]:
    """Every bad input of the probe."""
    c = Case
    return [
        # config files and options
        c("empty YAML", "config", lambda w: ["fit", "--config", _file(w, "empty.yaml", "")], "is empty"),
        c("YAML list", "config", lambda w: ["fit", "--config", _file(w, "list.yaml", "- a\n- b\n")], "got a list"),
        c("YAML syntax error", "config", lambda w: ["fit", "--config", _file(w, "bad.yaml", "model: [x\n")],
          "invalid YAML at line"),
        c("missing config", "config", lambda w: ["fit", "--config", str(_inputs(w) / "nope.yaml")],
          "no such config file"),
        c("binary config", "config", lambda w: ["fit", "--config", _file(w, "bin.yaml", b"\xff\xfe\x00\x81")],
          "not a text file"),
        c("unknown option", "config", lambda w: [*PRETRAIN, "--model.init_args.n_heads", "4"], "n_heads"),
        c("wrong option type", "config", lambda w: [*PRETRAIN, "--data.batch_size", "abc"], "batch_size"),
        c("untrusted logger class", "config", lambda w: [*PRETRAIN, "--trainer.logger.class_path", "this.Foo"],
          "outside the trusted modules"),
        c("untrusted logger shorthand", "config", lambda w: [*PRETRAIN, "--trainer.logger", "this.Foo"],
          "outside the trusted modules"),
        c("untrusted class in a config", "config",
          lambda w: [*PRETRAIN, "--config", _file(w, "evil.yaml", "trainer:\n  logger:\n    class_path: this.Foo\n")],
          "outside the trusted modules"),
        # parameters
        c("temperature 0", "parameter", lambda w: [*PRETRAIN, "--model.init_args.temperature", "0"], "temperature"),
        c("lambda_ret < 0", "parameter", lambda w: [*PRETRAIN, "--model.init_args.lambda_ret", "-1"], "lambda_ret"),
        c("lr < 0", "parameter", lambda w: [*PRETRAIN, "--model.init_args.lr", "-0.1"], "lr must be > 0"),
        c("weight decay < 0", "parameter", lambda w: [*PRETRAIN, "--model.init_args.weight_decay", "-1"],
          "weight_decay"),
        c("batch size 0", "parameter", lambda w: [*PRETRAIN, "--data.batch_size", "0"], "batch_size"),
        c("eval batch size -1", "parameter", lambda w: [*PRETRAIN, "--data.eval_batch_size", "-1"],
          "eval_batch_size"),
        c("data max_len 0", "parameter", lambda w: [*PRETRAIN, "--data.max_len", "0"], "max_len"),
        c("hidden size not divisible by heads", "parameter",
          lambda w: [*PRETRAIN, "--model.init_args.encoder.init_args.hidden_size", "30",
                     "--model.init_args.encoder.init_args.num_heads", "4"], "divisible"),
        c("dropout 1", "parameter", lambda w: [*PRETRAIN, "--model.init_args.encoder.init_args.dropout", "1.0"],
          "dropout"),
        c("encoder num_layers 0", "parameter",
          lambda w: [*PRETRAIN, "--model.init_args.encoder.init_args.num_layers", "0"], "num_layers"),
        c("encoder max_len 0", "parameter",
          lambda w: [*PRETRAIN, "--model.init_args.encoder.init_args.max_len", "0"], "max_len"),
        c("validation off under early stopping", "parameter",
          lambda w: [*PRETRAIN, "--trainer.limit_val_batches", "0"], "turns validation off"),
        c("early stopping at the epoch's end, checkpoint at validation's", "parameter",
          lambda w: [*PRETRAIN, "--checkpoint.save_on_train_epoch_end", "false",
                     "--early_stopping.check_on_train_epoch_end", "true"], "a resumed fit would find no validation"),
        c("plan: unknown experiment", "config", lambda w: ["plan", "nope"], "not a planned experiment: nope"),
        c("plan: two actions at once", "config", lambda w: ["plan", "--run", "--carry"], "not allowed with argument"),
        c("data.max_len above the encoder's", "parameter",
          lambda w: [*PRETRAIN, "--data.max_len", "60"], "exceeds the encoder's max_len"),
        c("RAFT alpha 2", "parameter", lambda w: _raft(w, "--model.init_args.ram.alpha", "2"), "alpha and beta"),
        c("RAFT beta -0.5", "parameter", lambda w: _raft(w, "--model.init_args.ram.beta", "-0.5"), "alpha and beta"),
        c("RAFT k -1", "parameter", lambda w: _raft(w, "--model.init_args.bank.k", "-1"), "bank.k (memories per query) must be >= 0"),
        c("RAFT nprobe 0", "parameter", lambda w: _raft(w, "--model.init_args.bank.nprobe", "0"), "nprobe must be >= 1"),
        c("RAFT nlist 0", "parameter", lambda w: _raft(w, "--model.init_args.bank.nlist", "0"), "nlist must be >= 1"),
        c("RAFT dropout 1", "parameter", lambda w: _raft(w, "--model.init_args.ram.dropout", "1"), "dropout must be in [0, 1)"),
        c("RAFT heads not dividing d", "parameter", lambda w: _raft(w, "--model.init_args.ram.num_heads", "3"),
          "divisible"),
        # output paths
        c("predict output is a directory", "output",
          lambda w: ["predict", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, "--predict_output",
                     str(_inputs(w) / "dir.csv")] if (_inputs(w) / "dir.csv").mkdir(exist_ok=True) is None else [],
          "is a directory"),
        c("predict output suffix", "output",
          lambda w: ["predict", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, "--predict_output", "out.txt"],
          "must end in .csv or .parquet"),
        c("results path under a file", "output",
          lambda w: [*PRETRAIN, "--results.path", _file(w, "plain.txt", "x") + "/r.json"], "is a file"),
        c("results path suffix", "output", lambda w: [*PRETRAIN, "--results.path", "results.txt"], "must end in .json"),
        # checkpoints
        c("missing ckpt_path", "checkpoint",
          lambda w: ["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, "--ckpt_path", "nope.ckpt"],
          "no such checkpoint file"),
        c("pickle payload as ckpt_path", "checkpoint",
          lambda w: ["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, "--ckpt_path", _pickle(w)],
          "only plain weights", marker=True),
        c("pickle payload as encoder_checkpoint", "checkpoint", lambda w: _raft(w, encoder=_pickle(w)),
          "only plain weights", marker=True),
        c("encoder record naming os.system", "checkpoint",
          lambda w: _raft(w, encoder=_encoder(w, class_path="os.system",
                                              init_args={"command": f"touch {_marker(w)}"})),
          "outside the trusted encoder modules", marker=True),
        c("checkpoint of another model class", "checkpoint",
          lambda w: ["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, "--ckpt_path",
                     _raft_ckpt_for_pretrain_config(w)], "is a RAFTModule checkpoint"),
        c("tampered encoder weights", "checkpoint", lambda w: _raft(w, encoder=_tampered_encoder(w)),
          "do not match their recorded SHA-256"),
        c("encoder for another item count", "checkpoint", lambda w: _raft(w, encoder=_encoder(w, num_items=50)),
          "trained on 50 items"),
        c("encoder of other data, same item count", "checkpoint",
          lambda w: _raft(w, encoder=_encoder(w, data={"num_items": 12_101, "content_hash": "0" * 64})),
          "pre-trained on other data"),
        c("missing encoder checkpoint", "checkpoint", lambda w: _raft(w, encoder=str(_inputs(w) / "none.pt")),
          "no such checkpoint file"),
        c("encoder record as ckpt_path of a fit", "checkpoint", lambda w: [*PRETRAIN, "--ckpt_path", _encoder(w)],
          "cannot resume a fit"),
        c("encoder record as ckpt_path of a RAFT test", "checkpoint",
          lambda w: ["test", "--config", str(CONFIGS / "beauty_raft.yaml"), *DATA, "--ckpt_path", _encoder(w)],
          "evaluate it with a pre-training config"),
        c("encoder record of another shape as ckpt_path", "checkpoint",
          lambda w: ["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, "--ckpt_path", _encoder(w)],
          "does not fit the config's"),
        c("tampered encoder record as ckpt_path", "checkpoint",
          lambda w: ["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, "--ckpt_path",
                     _tampered_encoder(w)], "do not match their recorded SHA-256"),
        c("compare: missing experiment", "output", lambda w: ["compare", str(_inputs(w) / "none"), str(_inputs(w))],
          "no such experiment directory"),
        c("compare: experiments without ranks", "output", lambda w: ["compare", str(_inputs(w)), str(_inputs(w))],
          "no seed with per-query test ranks"),
        # the hand-written subcommands: usage errors, and bad values found before any work
        c("compare: usage error", "config", lambda w: ["compare", "only_one"], "arguments are required"),
        c("experiment: unknown backbone", "config", lambda w: _experiment("--backbone", "foo"), "invalid choice"),
        c("analyze: no analysis named", "config", lambda w: ["analyze"], "arguments are required"),
        c("embed: k not an integer", "config", lambda w: ["embed", str(BEAUTY), "out", "--k", "x"],
          "invalid int value"),
        c("experiment: unbalanced quote in --fit-args", "config",
          lambda w: _experiment("--fit-args", "--x 'unbalanced"), "No closing quotation"),
        c("experiment: name escaping results/", "config",
          lambda w: ["experiment", "--name", "../escaped", "--pretrain", str(CONFIGS / "beauty_pretrain.yaml")],
          "one path component"),
        c("experiment: empty stage config", "config",
          lambda w: ["experiment", "--name", "t", "--pretrain", _file(w, "empty_stage.yaml", "")], "is empty"),
        c("experiment: --fit-args value of the wrong type", "config",
          lambda w: _experiment("--fit-args", "--data.batch_size abc"), "batch_size"),
        c("experiment: --stage1-from without that stage 1", "config",
          lambda w: _experiment("--finetune", str(CONFIGS / "beauty_raft.yaml"), "--stage1-from", "nope"),
          "has no finished stage 1"),
        c("experiment: --results-dir is a file", "output",
          lambda w: _experiment("--results-dir", _file(w, "results_file", "x")), "is not a directory"),
        c("experiment --status: damaged stage record", "output", lambda w: _status(w, record="{bad"),
          "unreadable results file"),
        c("experiment --status: carried checkpoint is junk", "checkpoint",
          lambda w: _status(w, carried=_file(w, "junk.ckpt", b"junk")), "not a loadable checkpoint"),
        c("experiment --status: carried checkpoint runs code", "checkpoint", lambda w: _status(w, carried=_pickle(w)),
          "not a loadable checkpoint", marker=True),
        c("analyze: --bounds reversed", "parameter",
          lambda w: ["analyze", "partitions", "--checkpoint", "x.ckpt", "--bounds", "6", "3"], "--bounds"),
        c("analyze: --k 1e7", "parameter",
          lambda w: ["analyze", "sensitivity", "--checkpoint", "x.ckpt", "--mode", "eval", "--k", "1e7"],
          "--k values must be integers"),
        c("analyze: --ratios 1e7", "parameter",
          lambda w: ["analyze", "noise", "--checkpoint", "x.ckpt", "--ratios", "1e7"], "--ratios must be in"),
        c("analyze: --alpha 2", "parameter",
          lambda w: ["analyze", "sensitivity", "--checkpoint", "x.ckpt", "--alpha", "0.5 2"], "--alpha values"),
        c("analyze: --out under a file", "output",
          lambda w: ["analyze", "long_tail", "--checkpoint", "x.ckpt", "--out", _file(w, "out_f", "x") + "/a"],
          "is a file"),
        c("embed: OUT_DIR under a file", "output",
          lambda w: ["embed", str(BEAUTY), _file(w, "embed_f", "x") + "/sub", "--embedder", "hash"], "is a file"),
        c("compare: ranks of other lengths", "output", lambda w: _experiments(w, rank=np.arange(49)),
          "columns of different lengths"),
        c("compare: negative ranks", "output", lambda w: _experiments(w, rank=-np.arange(50)),
          "negative ranks"),
        c("compare: float ranks", "output",
          lambda w: _experiments(w, rank=np.full(50, float("nan"))), "1-D integer array"),
        c("analyze: encoder record as checkpoint", "checkpoint",
          lambda w: ["analyze", "long_tail", "--checkpoint", _encoder(w)], "an encoder record"),
        c("analyze: a bare tensor as checkpoint", "checkpoint",
          lambda w: ["analyze", "long_tail", "--checkpoint", _tensor(w)], "not a checkpoint"),
        c("test: a bare tensor as ckpt_path", "checkpoint",
          lambda w: ["test", "--config", str(CONFIGS / "beauty_pretrain.yaml"), *DATA, "--ckpt_path", _tensor(w)],
          "not a checkpoint"),
        c("embed: binary precomputed responses", "data",
          lambda w: ["embed", str(BEAUTY), "out", "--generator", "precomputed", "--generator-path",
                     _file(w, "bin.jsonl", b"\xff\xfe\x00\x81"), "--embedder", "hash"], "not a UTF-8 text file"),
        c("embed: k above the item count", "data",
          lambda w: ["embed", str(BEAUTY), "out", "--embedder", "hash", "--k", "100000", "--data-cache-dir", "none",
                     "--cache-dir", "none"], "must be below the number of items"),
        # data files
        c("prepare: missing file", "data", lambda w: ["prepare", str(_inputs(w) / "none.txt"), "out"], "no such file"),
        c("prepare: empty file", "data", lambda w: ["prepare", _file(w, "e.txt", ""), "out"], "empty file"),
        c("prepare: binary file", "data", lambda w: ["prepare", _file(w, "b.txt", b"\x00\xff\xfe" * 50), "out"],
          "not valid UTF-8"),
        c("prepare: non-integer id", "data", lambda w: ["prepare", _file(w, "n.txt", "1 2 x 4\n"), "out"], "line 1"),
        c("prepare: item id 0", "data", lambda w: ["prepare", _file(w, "z.txt", "1 2 0 4\n"), "out"],
          "not a positive integer"),
        c("prepare: negative item id", "data", lambda w: ["prepare", _file(w, "ni.txt", "1 2 -3 4\n"), "out"],
          "not a positive integer"),
        c("prepare: negative user id", "data", lambda w: ["prepare", _file(w, "nu.txt", "-1 2 3 4\n"), "out"],
          "not a non-negative integer"),
        c("prepare: duplicate user", "data", lambda w: ["prepare", _file(w, "d.txt", "1 2 3 4\n1 5 6 7\n"), "out"],
          "duplicate user"),
        c("prepare: blank line inside", "data", lambda w: ["prepare", _file(w, "bl.txt", "1 2 3 4\n\n2 3 4 5\n"),
                                                           "out"], "blank line"),
        c("prepare: user without items", "data", lambda w: ["prepare", _file(w, "u.txt", "1 2 3 4\n2\n"), "out"],
          "has no items"),
        c("prepare: amazon time 1e300", "data",
          lambda w: ["prepare", _amazon(w, '{"reviewerID": "u", "asin": "a", "unixReviewTime": 1e300}'), "out"],
          "unixReviewTime"),
        c("prepare: amazon asin list", "data",
          lambda w: ["prepare", _amazon(w, '{"reviewerID": "u", "asin": ["x"], "unixReviewTime": 1}'), "out"],
          "asin"),
        c("prepare: amazon missing field", "data",
          lambda w: ["prepare", _amazon(w, '{"reviewerID": "u", "unixReviewTime": 1}'), "out"], "missing field"),
        c("prepare: amazon not JSON", "data", lambda w: ["prepare", _amazon(w, "{not json"), "out"],
          "not a JSON object"),
        c("prepare: .inter without header", "data",
          lambda w: ["prepare", _file(w, "x.inter", "1\t2\t3\n"), "out"], ".inter"),
        c("prepare: OUT_DIR is a file", "data",
          lambda w: ["prepare", _file(w, "ok.txt", "1 2 3 4\n"), _file(w, "out_file", "x")], "out_file"),
        c("stats: tampered prepared directory", "data", _tampered_prepared, "content hash mismatch"),
        c("fit: data file missing", "data", lambda w: [*PRETRAIN, "--data.data_path", str(_inputs(w) / "no.txt")],
          "no such file"),
    ]


def _tampered_prepared(work: Path) -> list[str]:
    from raserec.data.prepare import prepare_dataset

    out = _inputs(work) / "prepared"
    prepare_dataset(_file(work, "p.txt", "1 2 3 4 5\n2 3 4 5 6\n3 4 5 6 7\n"), out)
    import polars as pl

    frame = pl.read_parquet(out / "interactions.parquet")
    frame.with_columns(pl.col(frame.columns[-1]).reverse()).write_parquet(out / "interactions.parquet")
    return ["stats", str(out)]


# ----------------------------------------------------------------------------- running
def run_case(case: Case, root: Path) -> Outcome:
    """Run one case in a fresh working directory under ``root``."""
    from raserec.cli import main

    work = root / case.name.replace(" ", "_").replace("/", "_").replace(":", "")
    work.mkdir(parents=True)
    argv = case.argv(work)
    before = set(work.rglob("*"))
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    start = time.perf_counter()
    code: int | None
    detail = ""
    try:
        os.chdir(work)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            except BaseException:  # noqa: BLE001 - the probe records what escapes
                code = None
                detail = traceback.format_exc()
    finally:
        os.chdir(cwd)
    text = err.getvalue() + detail
    left = sorted(str(p.relative_to(work)) for p in set(work.rglob("*")) - before)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    return Outcome(case.name, case.group, code, errors, "Traceback (most recent call last)" in text, left,
                   case.marker and _marker(work).exists(), round(time.perf_counter() - start, 2),
                   any(case.expect in line for line in errors), detail=text[-2000:] if code != 2 else "")


def run_all(root: Path) -> list[Outcome]:
    return [run_case(case, root) for case in cases()]


def summary(outcomes: list[Outcome]) -> dict:
    hostile = [o for o in outcomes if any(c.marker for c in cases() if c.name == o.name)]
    return {
        "bad_inputs_tried": len(outcomes),
        "clean_one_line_errors": sum(o.clean for o in outcomes),
        "tracebacks": sum(o.traceback or o.code is None for o in outcomes),
        "left_files_behind": sum(bool(o.left_behind) for o in outcomes),
        "malicious_checkpoint_routes_blocked": f"{sum(not o.code_ran and o.code == 2 for o in hostile)} of "
                                               f"{len(hostile)}",
        "max_seconds_to_error": max(o.seconds for o in outcomes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/robustness.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = run_all(Path(tmp))
    from raserec.results import hardware, write_results

    record = {
        "command": "python -m tests.robustness" + (f" --out {args.out}" if argv else ""),
        "hardware": hardware(),
        "dataset": "bad inputs (synthetic files, configs/*.yaml, Beauty)",
        "model": "raserec CLI",
        "seeds": [],
        "wall_time_s": round(time.perf_counter() - start, 2),
        "metrics": summary(outcomes),
        "cases": [{"name": o.name, "group": o.group, "exit_code": o.code, "clean": o.clean,
                   "error": o.error_lines[0] if o.error_lines else None, "seconds": o.seconds,
                   "left_behind": o.left_behind} for o in outcomes],
        "notes": "each case runs `raserec ...` in-process in an empty working directory; clean = exit code 2, "
                 "exactly one `error:` line naming the problem, no traceback, no file left, no payload run",
    }
    write_results(args.out, record)
    print(json.dumps(record["metrics"], indent=2))
    bad = [o for o in outcomes if not o.clean]
    for o in bad:
        print(f"NOT CLEAN: {o.name}: code {o.code}, errors {o.error_lines}, left {o.left_behind}\n{o.detail}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
