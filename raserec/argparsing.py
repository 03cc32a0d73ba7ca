"""argparse for the hand-written subcommands (``prepare``, ``stats``, ``embed``, ``experiment``,
``compare``, ``analyze``): a usage error is one :class:`ConfigError` line (the CLI prints
``error: ...`` and exits 2), not argparse's usage text followed by a message."""

from __future__ import annotations

import argparse
from typing import NoReturn

from raserec.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` whose usage errors raise :class:`ConfigError`."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (run `{self.prog} --help` for the options)")
