"""notebooks/reproduce_raserec.ipynb executes headless on a results directory made by real short
runs: ``raserec experiment`` (two seeds, debug schedule) on a slice of Beauty and the cheap
``raserec analyze`` commands on the trained RaSeRec checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from raserec.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "reproduce_raserec.ipynb"

#: Analyses cheap enough for a test (no retraining); drift retrains both stages twice and is left out.
ANALYSES: dict[str, list[str]] = {
    "long_tail": [],
    "user_activity": [],
    "partitions": [],
    "noise": ["--ratios", "0.1,0.3"],
    "sensitivity": ["--mode", "eval", "--params", "alpha", "k", "--alpha", "0.0,0.5,1.0", "--k", "5,20"],
    "memory_use": [],
}


def _use_this_python_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the kernel named ``python3`` (the notebook's kernelspec) run this very interpreter, so it
    sees the same environment (raserec, polars, matplotlib) whatever other ``python3`` kernelspecs
    the machine has: directories in JUPYTER_PATH are searched first."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (raserec tests)",
        "language": "python",
    }))
    previous = os.environ.get("JUPYTER_PATH")
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(tmp_path / "jupyter"), previous])))


def _texts(nb) -> str:
    """Every text an executed notebook shows (streams, plain text, HTML, markdown)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts += [str(data.get(kind, "")) for kind in ("text/plain", "text/html", "text/markdown")]
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.slow
def test_notebook_runs_on_real_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_experiment,
                                       beauty_slice) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    start = time.perf_counter()
    # The shared short run (conftest: `raserec experiment`, 2 seeds, debug schedule, Beauty slice);
    # copied, because the analyses below write into the results directory.
    source_results, runs, _ = short_experiment
    results = tmp_path / "results"
    shutil.copytree(source_results, results)
    data = beauty_slice
    monkeypatch.chdir(ROOT)
    summary = json.loads((results / "beauty_raserec" / "summary.json").read_text())
    assert summary["seeds"] == [1, 2] and len(summary["per_seed"]) == 2
    assert summary["dataset"] == "Beauty" and summary["paper"]

    analyses = list(ANALYSES)
    checkpoint = runs / "beauty_raserec" / "seed_1" / "finetune" / "checkpoints" / "best.ckpt"
    out = results / "analysis" / "beauty"
    for name in analyses:
        assert main(["analyze", name, "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                     "--no-progress", "--cache-dir", "none", *ANALYSES[name]]) == 0, name
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.json").is_file()

    _use_this_python_kernel(tmp_path, monkeypatch)
    monkeypatch.setenv("RASEREC_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebook selects the inline backend itself
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "committed with outputs"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    text = _texts(nb)
    assert "beauty_raserec" in text
    assert f"results directory: {results}" in text
    # One figure for the experiments, one per analysis that was written.
    assert _images(nb) >= 1 + len(analyses)
    for name in analyses:
        assert f"skipped '{name}'" not in text
    assert "skipped 'drift'" in text  # not written here: skipped with a printed line, not an error
    print(f"notebook test: {time.perf_counter() - start:.0f} s, analyses: {analyses}")
