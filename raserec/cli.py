"""The ``raserec`` command: LightningCLI subcommands plus data preparation.

    raserec prepare SOURCE OUT_DIR      convert a raw dataset into a cached, versioned directory
    raserec stats PATH [--json]         dataset statistics (paper Table 5)
    raserec fit|validate|test|predict   train / evaluate / recommend, configured by YAML
"""

from __future__ import annotations

import logging
import os
import select
import sys
from pathlib import Path

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

semantic methods (SRA-CL, GRASP):
  embed      item text -> (LLM step) -> embeddings and semantic neighbours, written to a directory

experiments:
  experiment pre-train -> fine-tune -> test over several seeds, with per-seed results, mean +- std,
             a paired significance test and a comparison with the paper (resumable)
  compare    paired significance tests between two experiments on the same test queries, seed
             by seed (e.g. a method against SASRec, or two RaSeRec variants)
  plan       the reproduction queue: what each planned experiment has finished, and --run,
             --status or --carry over them (raserec/experiments/plan.py)

  analyze    the paper's analyses of a trained model, each writing CSV + PNG: long_tail,
             user_activity, partitions, noise, sensitivity, and drift (beyond the paper)

Run `raserec <command> --help` for the options of one command.
Examples:
  raserec stats ../shared/data/Beauty.txt
  raserec fit --config configs/beauty_pretrain.yaml
  raserec fit --config configs/beauty_pretrain.yaml --config configs/debug.yaml
  raserec fit --config configs/stage/pretrain.yaml --config configs/data/sports.yaml \
      --config configs/model/gru4rec.yaml --name sports_gru4rec_pretrain   (config groups)
"""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be swapped, e.g. by pytest)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _config_files(argv: list[str]) -> list[str]:
    """The values of every ``--config FILE`` / ``--config=FILE`` / ``-c FILE`` in ``argv``."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


#: Module prefixes a ``class_path`` may name on the command line or in a config; anything else is
#: refused by name, before jsonargparse imports it (importing a module runs its code). Extend
#: with the environment variable RASEREC_TRUSTED_MODULES="mypkg.,otherpkg.models.".
TRUSTED_CLASS_PREFIXES = ("raserec.", "lightning.", "pytorch_lightning.", "torch.", "torchmetrics.")


def check_class_path(value: object, where: str) -> None:
    """Refuse a dotted ``class_path`` outside the trusted prefixes (bare names are resolved by
    jsonargparse among the known subclasses, which imports nothing new)."""
    import os

    from raserec.errors import ConfigError

    if not isinstance(value, str) or "." not in value:
        return
    extra = tuple(p.strip() for p in os.environ.get("RASEREC_TRUSTED_MODULES", "").split(",") if p.strip())
    if not value.startswith(TRUSTED_CLASS_PREFIXES + extra):
        raise ConfigError(f"{where}: class_path {value!r} is outside the trusted modules "
                          f"({', '.join(TRUSTED_CLASS_PREFIXES + extra)}); refusing to import it "
                          "(trust your own package with RASEREC_TRUSTED_MODULES)")


def _class_paths(tree: object, prefix: str = ""):
    """Every ``class_path`` value in a parsed YAML tree, with its dotted key."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key == "class_path":
                yield name, value
            else:
                yield from _class_paths(value, name)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _class_paths(value, f"{prefix}[{i}]")


def _check_argv_class_paths(argv: list[str]) -> None:
    import yaml

    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if not key.startswith("--") or key in ("--config", "-c"):
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if key.endswith(".class_path"):
            check_class_path(value, key)
        elif value.lstrip().startswith("{"):  # an inline mapping such as --trainer.logger '{class_path: ...}'
            try:
                tree = yaml.safe_load(value)
            except yaml.YAMLError:
                continue
            for name, path in _class_paths(tree, key.lstrip("-")):
                check_class_path(path, name)
        elif key in ("--trainer.logger", "--model", "--trainer.strategy", "--optimizer", "--lr_scheduler") \
                or key.startswith("--trainer.callbacks") or key.startswith("--trainer.plugins"):
            check_class_path(value, key)


def check_config_file(path: str) -> None:
    """A config must be a readable YAML mapping; say which file and what is wrong (jsonargparse
    would report ``Unexpected config`` or a YAML error about ``<unicode string>``)."""
    import yaml

    from raserec.errors import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        content = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file ({exc.reason})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from exc
    if content is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config must be a mapping of options (key: value), got a {type(content).__name__}")
    for key, value in _class_paths(content):
        check_class_path(value, f"{path}: {key}")


#: What ``--name NAME`` sets (the run name given once): the logger's run name, the checkpoint
#: directory and the results file.
NAME_TARGETS = (("--trainer.logger.init_args.name", "{}"), ("--checkpoint.dirpath", "runs/{}/checkpoints"),
                ("--results.path", "results/{}.json"))


def check_run_name(name: str) -> None:
    """A run or experiment name becomes a directory under ``runs/`` and ``results/``: one path
    component, so it can neither escape them nor be mistaken for an option."""
    from raserec.errors import ConfigError

    if not name or "/" in name or "\\" in name or name.startswith((".", "-")) or any(c.isspace() for c in name):
        raise ConfigError(f"--name {name!r}: a run name is one path component (no '/', no spaces)")


def expand_name(argv: list[str]) -> list[str]:
    """Replace ``--name NAME`` (or ``--name=NAME``) by the options it stands for, placed where it
    was, so a later explicit option still overrides one of them."""
    from raserec.errors import ConfigError

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--name" or arg.startswith("--name="):
            if arg == "--name":
                if i + 1 >= len(argv):
                    raise ConfigError("--name needs a value (the run name)")
                name, i = argv[i + 1], i + 2
            else:
                name, i = arg.split("=", 1)[1], i + 1
            check_run_name(name)
            for option, pattern in NAME_TARGETS:
                out += [option, pattern.format(name)]
            continue
        out.append(arg)
        i += 1
    return out


def _lightning_main(argv: list[str]) -> int:
    from raserec.lightning_cli import RaserecCLI

    if any(a == "--name" or a.startswith("--name=") for a in argv):
        argv = [argv[0], *expand_name(argv[1:])]
    for path in _config_files(argv):
        check_config_file(path)
    _check_argv_class_paths(argv)

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


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (the kernel flags its write end with an error)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no real descriptor (e.g. captured by a test)
        return False


def _stdout_to_devnull() -> None:
    """After a closed pipe: what is still buffered goes nowhere at exit, instead of a second error."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


#: The hand-written subcommands: each ``(module, function)``, imported only when that command runs
#: (``raserec plan --help`` stays free of torch).
_COMMANDS = {
    "prepare": ("raserec.data.prepare", "prepare_main"),
    "stats": ("raserec.data.prepare", "stats_main"),
    "analyze": ("raserec.analysis.cli", "main"),
    "embed": ("raserec.semantic.cli", "main"),
    "experiment": ("raserec.experiments.runner", "main"),
    "compare": ("raserec.experiments.compare", "main"),
    "plan": ("raserec.experiments.plan", "main"),
}


def _dispatch(command: str, argv: list[str], rest: list[str]) -> int | None:
    """Run one command; ``None`` for an unknown one."""
    if command in _COMMANDS:
        import importlib

        module, function = _COMMANDS[command]
        return getattr(importlib.import_module(module), function)(rest)
    if command in ("fit", "validate", "test", "predict"):
        return _lightning_main(argv)
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
            print(_HELP, flush=True)
        except BrokenPipeError:  # e.g. `raserec --help | head`
            _stdout_to_devnull()
        return 0
    command, rest = argv[0], argv[1:]
    from raserec.runtime import tune_allocator

    tune_allocator()
    try:
        code = _dispatch(command, argv, rest)
        if code is not None:
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
            return code
    except RaserecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe (a worker's, a logger's) broke: a real failure
            raise
        _stdout_to_devnull()  # the reader of our output went away (`raserec plan | head`): end quietly
        return 0
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
