"""RecBole 1.2.1's SASRec, timed: run by `make bench-peer` with the peer's own interpreter.

Standalone on purpose (imports nothing from raserec): it runs in `.venv-peer`, where RecBole
and its pinned numpy/pandas live. Drives RecBole's Config, create_dataset, data_preparation and
Trainer directly (its quick_start imports ray). Prints one JSON object on the last line.

    .venv-peer/bin/python raserec/benchmarks/recbole_peer.py DATA_DIR DATASET --threads 2
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("data_dir", help="folder holding DATASET/DATASET.inter (RecBole atomic format)")
    p.add_argument("dataset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    # The RaSeRec authors' SASRec settings; CE over all items; leave-one-out, full ranking.
    config = Config(model="SASRec", dataset=args.dataset, config_dict={
        "data_path": args.data_dir, "device": "cpu", "use_gpu": False, "show_progress": False,
        "seed": 2024, "reproducibility": True, "checkpoint_dir": f"{args.data_dir}/saved",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "MAX_ITEM_LIST_LENGTH": 50, "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "loss_type": "CE", "train_neg_sample_args": None,
        "train_batch_size": args.batch_size, "eval_batch_size": 4096, "learning_rate": 0.001,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
    })
    init_seed(config["seed"], config["reproducibility"])
    start = time.perf_counter()
    dataset = create_dataset(config)
    train_data, _valid_data, test_data = data_preparation(config, dataset)
    prepare_s = time.perf_counter() - start
    model = SASRec(config, train_data.dataset)
    trainer = Trainer(config, model)
    start = time.perf_counter()
    loss = trainer._train_epoch(train_data, epoch_idx=0, show_progress=False)
    epoch_s = time.perf_counter() - start
    trainer.evaluate(test_data, load_best_model=False, show_progress=False)  # warm-up
    start = time.perf_counter()
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    test_s = time.perf_counter() - start
    print(json.dumps({"recbole_version": __import__("recbole").__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "train_pairs": len(train_data.dataset),
                      "prepare_s": round(prepare_s, 2), "sasrec_epoch_s": round(epoch_s, 2),
                      "test_pass_s": round(test_s, 3), "epoch_loss": float(loss),
                      "test_metrics": {k: float(v) for k, v in dict(result).items()}}))


if __name__ == "__main__":
    main()
