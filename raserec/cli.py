"""The ``raserec`` command: LightningCLI subcommands plus data preparation.

    raserec prepare SOURCE OUT_DIR      convert a raw dataset into a cached, versioned directory
    raserec stats PATH [--json]         dataset statistics (paper Table 5)
    raserec fit|validate|test|predict   train / evaluate / recommend, configured by YAML
"""

from __future__ import annotations

import logging
import sys

from raserec.errors import RaserecError

_HELP = """usage: raserec <command> [options]

Retrieval-augmented sequential recommendation (RaSeRec, Ada-Retrieval) on Lightning.

data commands:
  prepare    convert a raw dataset (line .txt, RecBole .inter, Amazon reviews json) into a
             cached, versioned directory (parquet + manifest with a content hash)
  stats      print dataset statistics as in the paper's Table 5 (--json for one JSON object)

training commands (LightningCLI; configure with --config FILE.yaml, repeatable):
  fit        train a model (pre-training, RAFT or Ada-Retrieval) with early stopping; tests the best
             checkpoint afterwards unless --test_after_fit false
  validate   evaluate on the validation queries (--ckpt_path)
  test       evaluate on the test queries (--ckpt_path)
  predict    write each user's top-N items with original ids (--ckpt_path)

experiments:
  experiment pre-train -> fine-tune -> test over several seeds, with per-seed results, mean +- std,
             a paired significance test and a comparison with the paper (resumable)

  analyze    the paper's analyses of a trained model, each writing CSV + PNG: long_tail,
             user_activity, partitions, noise, sensitivity, and drift (beyond the paper)

Run `raserec <command> --help` for the options of one command.
Examples:
  raserec stats ../shared/data/Beauty.txt
  raserec fit --config configs/beauty_pretrain.yaml
  raserec fit --config configs/beauty_pretrain.yaml --config configs/debug.yaml
"""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be swapped, e.g. by pytest)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _lightning_main(argv: list[str]) -> int:
    from raserec.lightning_cli import RaserecCLI

    # From the console script the arguments are sys.argv itself; passing them again would make
    # LightningCLI warn that both were given.
    RaserecCLI(args=None if argv == sys.argv[1:] else argv)
    return 0


def _raserec_cause(exc: BaseException) -> RaserecError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, RaserecError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Our own loggers only: Lightning configures its own, and a root handler would double them.
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    pkg_log = logging.getLogger("raserec")
    if not pkg_log.handlers:
        pkg_log.addHandler(handler)
        pkg_log.setLevel(logging.INFO)
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print(_HELP)
        except BrokenPipeError:  # e.g. `raserec --help | head`
            pass
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "prepare":
            from raserec.data.prepare import prepare_main

            return prepare_main(rest)
        if command == "stats":
            from raserec.data.prepare import stats_main

            return stats_main(rest)
        if command == "analyze":
            from raserec.analysis.cli import main as analyze_main

            return analyze_main(rest)
        if command == "experiment":
            from raserec.experiments.runner import main as experiment_main

            return experiment_main(rest)
        if command in ("fit", "validate", "test", "predict"):
            return _lightning_main(argv)
    except RaserecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # jsonargparse wraps errors raised while instantiating classes; surface ours cleanly.
        cause = _raserec_cause(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    print(f"error: unknown command {command!r}; run `raserec --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
