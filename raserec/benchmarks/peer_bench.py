"""The peer in the same run: RecBole 1.2.1's SASRec epoch and full-ranking test pass, timed right
before ours on the same machine, threads and batch size. Writes results/peer_bench.json.

`make bench-peer` installs RecBole into its own virtual environment (`.venv-peer`: torch==2.13.0
first, numpy 1.26.4 and pandas 2.1.4, which RecBole 1.2.1 needs) and runs this module with ours.
Not part of `make test`; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from raserec.benchmarks.common import peak_rss_gb, save
from raserec.benchmarks.train_bench import epoch_time, eval_time
from raserec.data.datamodule import SequenceDataModule
from raserec.errors import RaserecError
from raserec.runtime import tune_allocator

PEER_SCRIPT = Path(__file__).with_name("recbole_peer.py")


def write_atomic(data_path: Path, out_dir: Path, name: str) -> Path:
    """The line-format dataset as RecBole's atomic ``.inter`` file (position = timestamp)."""
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.inter"
    with data_path.open() as src, path.open("w") as dst:
        dst.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in src:
            user, *items = line.split()
            dst.writelines(f"{user}\t{item}\t{t}\n" for t, item in enumerate(items))
    return path


def run_peer(python: Path, data_dir: Path, name: str, threads: int, batch_size: int) -> dict:
    if not python.is_file():
        raise RaserecError(f"{python}: no peer interpreter; run `make bench-peer` (it creates .venv-peer)")
    # absolute(), not resolve(): a venv interpreter is a symlink, and following it leaves the venv
    proc = subprocess.run([str(python.absolute()), str(PEER_SCRIPT), str(data_dir), name, "--threads", str(threads),
                           "--batch-size", str(batch_size)], capture_output=True, text=True,
                          cwd=data_dir)  # RecBole writes log_tensorboard/ into its working directory
    if proc.returncode != 0:
        raise RaserecError(f"RecBole run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--dataset", default="Beauty")
    parser.add_argument("--peer-python", type=Path, default=Path(".venv-peer/bin/python"))
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    tune_allocator()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_atomic(args.data / f"{args.dataset}.txt", Path(tmp), args.dataset)
        peer = run_peer(args.peer_python, Path(tmp), args.dataset, threads, args.batch_size)
    print("recbole", peer)
    dm = SequenceDataModule(args.data / f"{args.dataset}.txt", batch_size=args.batch_size, eval_batch_size=1024,
                            cache_dir=None)
    dm.setup("fit")
    ours = epoch_time(dm, "none", 1.0)
    ours_eval = eval_time(dm)
    print("ours", ours, ours_eval)
    save("peer_bench.json", {
        "dataset": args.dataset,
        "model": "SASRec (d=64, 2 layers, 2 heads, dropout 0.5, max_len 50), CE over all items",
        "seeds": [2024],
        "wall_time_s": round(time.perf_counter() - start, 2),
        "batch_size": args.batch_size,
        "torch_threads": threads,
        "metrics": {
            "recbole/sasrec_epoch_s": peer["sasrec_epoch_s"],
            "recbole/test_pass_s": peer["test_pass_s"],
            "ours/sasrec_epoch_s": ours["epoch_s"],
            "ours/test_pass_s": ours_eval,
            "speedup_vs_recbole/sasrec_epoch": round(peer["sasrec_epoch_s"] / ours["epoch_s"], 2),
            "speedup_vs_recbole/test_pass": round(peer["test_pass_s"] / ours_eval, 2),
            "peak_rss_gb": peak_rss_gb(),
        },
        "peer": peer,
        "notes": ("one training epoch (no validation) and one full-ranking pass over the test users, each "
                  "system timed in the same run on the same machine and threads; RecBole 1.2.1 in .venv-peer "
                  "(torch 2.13.0, numpy 1.26.4, pandas 2.1.4), ours through Lightning. RecBole's epoch "
                  f"covers its {peer['train_pairs']} training pairs, ours {len(dm.pairs('train'))}."),
    })


if __name__ == "__main__":
    main()
