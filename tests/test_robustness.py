"""The bad-input probe (tests/robustness.py) over the real CLI: every case ends in one clean
`error:` line, exit code 2, no traceback, no file left behind and no hostile payload run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import BEAUTY, require
from tests.robustness import cases, run_all, summary


def test_every_bad_input_fails_cleanly(tmp_path: Path) -> None:
    require(BEAUTY)
    outcomes = run_all(tmp_path)
    assert len(outcomes) == len(cases()) >= 55
    failures = [f"{o.name}: code {o.code}, errors {o.error_lines}, left {o.left_behind}, ran {o.code_ran}\n{o.detail}"
                for o in outcomes if not o.clean]
    assert not failures, "\n".join(failures)
    figures = summary(outcomes)
    assert figures["tracebacks"] == 0 and figures["left_files_behind"] == 0
    assert figures["malicious_checkpoint_routes_blocked"] == "4 of 4"


@pytest.mark.parametrize("name", ["pickle payload as ckpt_path", "encoder record naming os.system"])
def test_the_probe_notices_a_payload_that_runs(tmp_path: Path, name: str, monkeypatch) -> None:
    """The probe itself can fail: a marker created during a case marks it as not clean."""
    from tests import robustness

    case = next(c for c in cases() if c.name == name)
    original = case.argv

    def argv_and_plant(work: Path) -> list[str]:
        args = original(work)
        robustness._marker(work).touch()  # as if the payload had run
        return args

    case.argv = argv_and_plant
    outcome = robustness.run_case(case, tmp_path)
    assert outcome.code_ran and not outcome.clean
