"""``raserec compare``: per-query ranks from both kinds of rank files, same-query checks, the
paired tests, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raserec.cli import main
from raserec.evaluation.metrics import QueryRanks
from raserec.experiments.compare import Side, compare
from raserec.experiments.summary import paired_tests

QUERIES = 2000


def _queries(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"user": np.arange(QUERIES), "end": rng.integers(1, 40, QUERIES), "target": rng.integers(1, 500, QUERIES)}


def _two_stage(root: Path, seed: int, encoder: np.ndarray, finetune: np.ndarray) -> None:
    d = root / f"seed_{seed}"
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "ranks_test.npz", encoder=encoder, finetune=finetune, **_queries(seed))


def _one_stage(root: Path, seed: int, ranks: np.ndarray, queries: dict[str, np.ndarray] | None = None) -> None:
    d = root / f"seed_{seed}"
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "pretrain.ranks_test.npz", row=np.arange(QUERIES), rank=ranks, queries_total=np.int64(QUERIES),
             **(queries or _queries(seed)))


@pytest.fixture
def experiments(tmp_path: Path) -> tuple[Path, Path, dict[int, np.ndarray]]:
    """A one-stage baseline and a two-stage method on seeds 1-3 whose fine-tuned ranks are
    better on half the queries."""
    rng = np.random.default_rng(0)
    base, method = tmp_path / "sasrec", tmp_path / "raserec"
    base_ranks = {}
    for seed in (1, 2, 3):
        ranks = rng.integers(0, 60, QUERIES)
        base_ranks[seed] = ranks
        _one_stage(base, seed, ranks)
        better = np.where(np.arange(QUERIES) % 2 == 0, ranks // 3, ranks)
        _two_stage(method, seed, encoder=ranks, finetune=better)
    return base, method, base_ranks


def test_query_ranks_metric_orders_rows_and_drops_padding_duplicates() -> None:
    metric = QueryRanks()
    metric.update(torch.tensor([5, 3, 4]), torch.tensor([50, 30, 40]))
    metric.update(torch.tensor([0, 1, 2, 5]), torch.tensor([0, 10, 20, 99]))  # row 5 again: a padded batch
    rows, ranks = metric.compute()
    assert rows.tolist() == [0, 1, 2, 3, 4, 5]
    assert ranks.tolist() == [0, 10, 20, 30, 40, 50]  # the first occurrence of row 5 is kept
    metric.reset()
    assert not metric.update_called


def test_compare_reads_both_file_kinds_and_finds_a_real_gain(experiments) -> None:
    base, method, base_ranks = experiments
    record = compare(Side(base, None), Side(method, None))
    assert record["seeds"] == [1, 2, 3]
    for seed in (1, 2, 3):
        entry = record["paired_test_per_seed"][str(seed)]
        assert entry["queries"] == QUERIES
        tuned = np.where(np.arange(QUERIES) % 2 == 0, base_ranks[seed] // 3, base_ranks[seed])
        assert entry["paired_test"] == paired_tests(base_ranks[seed], tuned)
        assert entry["paired_test"]["NDCG@10"]["mean_diff"] > 0
        assert entry["paired_test"]["NDCG@10"]["p_wilcoxon"] < 1e-6
        assert entry["paired_test"]["NDCG@10"]["queries_worse"] == 0
    assert record["metrics"]["test/NDCG@10"] > record["base_metrics"]["test/NDCG@10"]
    assert record["relative_change_pct"]["test/NDCG@10"] > 0
    assert set(record["paired_test_across_seeds"]) == {"HR@10", "NDCG@10", "NDCG@5"}


def test_compare_column_selection(experiments) -> None:
    base, method, _ = experiments
    # the two-stage experiment's own encoder column holds the baseline's ranks: no difference at all
    record = compare(Side(base, None), Side(method, "pretrain"))
    for entry in record["paired_test_per_seed"].values():
        assert entry["paired_test"]["NDCG@10"] == {"mean_diff": 0.0, "t": None, "p_ttest": 1.0, "p_wilcoxon": 1.0,
                                                   "queries_better": 0, "queries_worse": 0}
    assert record["paired_test_across_seeds"]["NDCG@10"]["p_ttest"] == 1.0


def test_compare_uses_only_seeds_both_sides_have(experiments) -> None:
    base, method, _ = experiments
    _two_stage(method, 4, np.zeros(QUERIES, int), np.zeros(QUERIES, int))  # the baseline has no seed 4
    assert compare(Side(base, None), Side(method, None))["seeds"] == [1, 2, 3]
    assert compare(Side(base, None), Side(method, None), seeds=[2])["seeds"] == [2]
    assert compare(Side(base, None), Side(method, None), seeds=[2])["paired_test_across_seeds"] == {}


def test_cli_writes_a_results_file(experiments, capsys) -> None:
    base, method, _ = experiments
    assert main(["compare", str(base), f"{method}:finetune"]) == 0
    out = method / "vs_sasrec_finetune.json"
    record = json.loads(out.read_text())
    for key in ("command", "hardware", "dataset", "model", "seeds", "wall_time_s", "metrics", "notes"):
        assert key in record
    assert record["command"].startswith("raserec compare ")
    assert "seed 3: HR@10" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing dir", "bad column", "other queries", "no common seed", "seed missing",
                                  "bad out", "out is a dir", "damaged file", "foreign file", "partial"])
def test_bad_input_is_one_error_line(experiments, tmp_path, capsys, case) -> None:
    base, method, _ = experiments
    args = [str(base), str(method)]
    expected = {"missing dir": "no such experiment directory", "bad column": "unknown column 'best'",
                "other queries": "did not rank the same test queries", "no common seed": "no seed with per-query",
                "seed missing": "seed 7 has no per-query test ranks", "bad out": "must end in .json",
                "out is a dir": "is a directory", "damaged file": "unreadable ranks file",
                "foreign file": "not a per-query ranks file", "partial": "covers only 100 test queries"}[case]
    if case == "missing dir":
        args[0] = str(tmp_path / "nope")
    elif case == "bad column":
        args[1] = f"{method}:best"
    elif case == "other queries":
        other = tmp_path / "other_data"
        _one_stage(other, 1, np.zeros(QUERIES, int), _queries(99))
        args = [str(other), str(method), "--seeds", "1"]
    elif case == "no common seed":
        lonely = tmp_path / "lonely"
        _one_stage(lonely, 9, np.zeros(QUERIES, int))
        args[0] = str(lonely)
    elif case == "seed missing":
        args += ["--seeds", "1", "7"]
    elif case == "bad out":
        args += ["--out", str(tmp_path / "x.txt")]
    elif case == "out is a dir":
        (tmp_path / "x.json").mkdir()
        args += ["--out", str(tmp_path / "x.json")]
    elif case == "damaged file":
        (method / "seed_1" / "ranks_test.npz").write_bytes(b"PK\x03\x04 cut short")
    elif case == "foreign file":
        np.savez(base / "seed_1" / "pretrain.ranks_test.npz", weights=np.zeros(3))
    else:  # a limited test pass: 100 of the queries
        q = {k: v[:100] for k, v in _queries(1).items()}
        np.savez(base / "seed_1" / "pretrain.ranks_test.npz", row=np.arange(100), rank=np.zeros(100, int),
                 queries_total=np.int64(QUERIES), **q)
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not list(method.glob("vs_*.json"))  # nothing written


def test_a_complete_column_wins_over_a_limited_stage_file_and_names_parse(experiments, tmp_path) -> None:
    from raserec.experiments.compare import available_ranks, default_output

    _, method, base_ranks = experiments
    seed_dir = method / "seed_1"
    q = {k: v[:100] for k, v in _queries(1).items()}
    np.savez(seed_dir / "finetune.ranks_test.npz", row=np.arange(100), rank=np.zeros(100, int),
             queries_total=np.int64(QUERIES), **q)
    found = available_ranks(seed_dir)
    assert found["finetune"].source.endswith("ranks_test.npz[finetune]") and found["finetune"].complete
    # a trailing slash, a column, and a directory whose own name has a colon
    assert Side.parse(f"{method}/").directory == method
    assert Side.parse(f"{method}/:pretrain").column == "pretrain"
    odd = tmp_path / "exp:v2"
    odd.mkdir()
    side = Side.parse(str(odd))
    assert side.directory == odd and side.column is None and side.label == "exp:v2"
    assert default_output(Side(method, "pretrain"), Side(method, None)).name == "vs_raserec_pretrain.json"
    assert compare(Side(method, "pretrain"), Side(method, None), seeds=[2, 2])["seeds"] == [2]


def test_the_readme_table_lists_each_comparison_with_its_p_values(experiments) -> None:
    from raserec.results_table import paired_table

    base, method, _ = experiments
    assert main(["compare", str(base), str(method)]) == 0
    record = json.loads((method / "vs_sasrec.json").read_text())
    (method / "vs_notes.json").write_text(json.dumps({"notes": "not a comparison"}))  # ignored
    rows = paired_table(base.parent).splitlines()[2:]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[0] == "raserec vs sasrec" and cells[2] == "1, 2, 3"
    p_ndcg = [f"{record['paired_test_per_seed'][s]['paired_test']['NDCG@10']['p_ttest']:.2g}" for s in ("1", "2", "3")]
    assert cells[4] == ", ".join(p_ndcg)
    gain = record["relative_change_pct"]["test/NDCG@10"]
    assert cells[3].endswith(f"(+{gain:.1f}%)") and gain > 0
    assert cells[7] == f"{record['paired_test_across_seeds']['NDCG@10']['p_ttest']:.2g}"




def test_undefined_p_values_print_as_na_after_a_complete_record(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A p-value the tests leave undefined (null in the record) prints as n/a; the printout used
    to crash on it after the file had been written."""
    from raserec.experiments import compare as compare_module

    real = compare_module.paired_tests

    def undefined(base, other):
        return {k: {**v, "p_ttest": None, "p_wilcoxon": None} for k, v in real(base, other).items()}

    monkeypatch.setattr(compare_module, "paired_tests", undefined)
    rng = np.random.default_rng(2)
    for name in ("a", "b"):
        _one_stage(tmp_path / name, 1, rng.integers(0, 60, QUERIES))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.count("p_t n/a") == 3 and out.count("p_w n/a") == 3 and "wrote" in out
    record = json.loads((tmp_path / "b" / "vs_a.json").read_text())
    assert record["paired_test_per_seed"]["1"]["paired_test"]["NDCG@10"]["p_ttest"] is None


def test_rank_files_without_queries_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("a", "b"):
        d = tmp_path / name / "seed_1"
        d.mkdir(parents=True)
        np.savez(d / "pretrain.ranks_test.npz", row=np.zeros(0, int), user=np.zeros(0, int), end=np.zeros(0, int),
                 target=np.zeros(0, int), rank=np.zeros(0, int), queries_total=np.int64(0))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "no test queries in it" in capsys.readouterr().err
    assert not (tmp_path / "b" / "vs_a.json").exists()
