"""Process-level allocator settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from raserec.runtime import tune_allocator as t; print(t(), t())"


def _run(env: dict[str, str]) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RASEREC_TUNE"))} | env
    return subprocess.run([sys.executable, "-c", CODE], env=full, capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_allocator_is_idempotent_and_respects_opt_outs() -> None:
    assert _run({}) == ["True", "True"]
    assert _run({"RASEREC_TUNE_ALLOCATOR": "0"}) == ["False", "False"]
    # a user's own glibc settings win over ours
    assert _run({"MALLOC_MMAP_THRESHOLD_": "65536"}) == ["False", "False"]
