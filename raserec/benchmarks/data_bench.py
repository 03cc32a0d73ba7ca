"""Data-layer benchmark: read + split + index Beauty and Sports, from the raw line file and from
the prepared cache. Writes results/data_bench.json. Targets (2 cores): Beauty from cache < 2 s,
from the raw file < 5 s."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from raserec.benchmarks.common import save, timed
from raserec.data.datamodule import SequenceDataModule
from raserec.data.prepare import prepare_dataset

DATASETS = {"Beauty": "Beauty.txt", "Sports": "Sports_and_Outdoors.txt"}


def setup_time(path: Path, cache_dir: Path | None) -> None:
    dm = SequenceDataModule(path, cache_dir=cache_dir)
    dm.setup("fit")  # read (or load), leave-one-out split, training pairs, positive index
    dm.train_dataloader()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, file in DATASETS.items():
            raw = args.data / file
            prepared = prepare_dataset(raw, Path(tmp) / name)
            results[name] = {
                "raw_file": timed(lambda raw=raw: setup_time(raw, None), args.repeats),
                "prepared_cache": timed(lambda p=prepared: setup_time(p, None), args.repeats),
            }
            print(name, results[name])
    beauty = results["Beauty"]
    save("data_bench.json", {
        "dataset": "Beauty, Sports",
        "model": "data layer (read + leave-one-out split + training pairs + same-target positive index)",
        "seeds": [],
        "wall_time_s": round(sum(r[k]["median_s"] * r[k]["repeats"] for r in results.values() for k in r), 2),
        "metrics": {
            "Beauty/raw_s": beauty["raw_file"]["median_s"],
            "Beauty/cache_s": beauty["prepared_cache"]["median_s"],
            "Sports/raw_s": results["Sports"]["raw_file"]["median_s"],
            "Sports/cache_s": results["Sports"]["prepared_cache"]["median_s"],
        },
        "targets": {"Beauty/cache_s": 2.0, "Beauty/raw_s": 5.0},
        "details": results,
    })


if __name__ == "__main__":
    main()
