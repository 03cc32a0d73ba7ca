"""``raserec predict`` output: each user's top-N items with the original ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from raserec.outputs import check_output_file, replacing


class TopNWriter(BasePredictionWriter):
    """Writes one row per user: ``user``, ``rank_1`` .. ``rank_N`` (original ids, best first).

    The format follows the suffix: ``.csv`` or ``.parquet``. Under DDP every rank writes its own
    part, ``NAME.rankR.SUFFIX``; concatenated they hold every user exactly once.

    Args:
        output: destination file.
    """

    def __init__(self, output: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output = check_output_file(output, "prediction output", (".csv", ".parquet"))

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any] | None) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        users = torch.cat([b["user"] for b in batches]).cpu().numpy()
        items = torch.cat([b["items"] for b in batches]).cpu().numpy()
        data = trainer.datamodule.data
        columns: dict[str, Any] = {"user": data.user_ids[users].astype(str)}
        item_names = data.item_ids.astype(str)
        for r in range(items.shape[1]):
            columns[f"rank_{r + 1}"] = item_names[items[:, r]]
        order = np.argsort(users, kind="stable")
        frame = pl.DataFrame(columns)[order]
        path = self.output
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        with replacing(path) as tmp:
            if path.suffix == ".csv":
                frame.write_csv(tmp)
            else:
                frame.write_parquet(tmp)
