"""SequenceDataModule: leave-one-out splits, autoregressive pairs, positives and the reference set."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader

from raserec.data.batch import PairDataset, SequenceBatch, passthrough
from raserec.data.features import ItemFeatures, default_feature_path
from raserec.data.positives import LonelyPolicy, SameTargetPositives
from raserec.data.sequences import SequenceData
from raserec.data.split import PairSet, predict_queries, test_queries, training_pairs, validation_queries
from raserec.errors import ConfigError, DataError, check, check_sizes

log = logging.getLogger(__name__)

Stage = Literal["fit", "validate", "test", "predict"]


class SequenceDataModule(L.LightningDataModule):
    """Leave-one-out sequential-recommendation data.

    Args:
        data_path: a raw interaction file (line format ``.txt``, RecBole ``.inter``, Amazon
            ``reviews_*.json(.gz)``) or a directory written by ``raserec prepare``.
        max_len: inputs are truncated to the last ``max_len`` items.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        num_workers: DataLoader workers (collation is vectorised; 0 is usually fastest).
        cache_dir: where raw files are prepared and cached (keyed on content hash and
            parameters); ``null`` reads the raw file every time.
        data_format: ``auto`` (by suffix), ``lines``, ``inter`` or ``amazon``.
        k_core: iterative k-core filter applied to raw files (``null``: none, except 5 for Amazon).
        min_length: users with fewer interactions cannot be split and are dropped (and counted).
        lonely_positive: policy for same-target positives (attached to training batches when
            the module's ``uses_positives`` is true): ``self`` (a pair whose target no other pair shares is its own positive,
            as in the authors' code) or ``exclude`` (it is left out of L_ret).
        include_validation_in_reference: at test/predict time the memory bank's reference set
            also holds the validation pairs (the authors' dynamic memory bank).
        shuffle: shuffle training pairs each epoch.
        seed: seed of the per-epoch positive draws.
        item_features: item side information (JSON lines keyed by original item id, e.g.
            ``../shared/data/Beauty.items.jsonl``): ``null`` = none, ``auto`` = the
            ``<data file stem>.items.jsonl`` beside the data if it exists, or a path (which must
            exist). Loaded lazily by :attr:`item_features` and cached with the dataset.
    """

    def __init__(
        self,
        data_path: str | Path,
        max_len: int = 50,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        cache_dir: str | Path | None = ".cache/datasets",
        data_format: Literal["auto", "lines", "inter", "amazon"] = "auto",
        k_core: int | None = None,
        min_length: int = 3,
        lonely_positive: LonelyPolicy = "self",
        include_validation_in_reference: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        item_features: str | None = None,
    ) -> None:
        super().__init__()
        if max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        if min_length < 3:
            raise ConfigError(f"min_length must be >= 3 for leave-one-out splits, got {min_length}")
        check_sizes(batch_size=batch_size, eval_batch_size=eval_batch_size)
        check(num_workers >= 0, f"num_workers must be >= 0, got {num_workers}")
        # Plain strings in the hyper-parameters keep checkpoints loadable with weights_only=True.
        data_path = str(data_path)
        cache_dir = None if cache_dir is None else str(cache_dir)
        self.save_hyperparameters()
        self.data_path = Path(data_path)
        self.max_len = max_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.data_format = data_format
        self.k_core = k_core
        self.min_length = min_length
        self.lonely_positive = lonely_positive
        self.include_validation_in_reference = include_validation_in_reference
        self.shuffle = shuffle
        self.seed = seed
        self._data: SequenceData | None = None
        self._splits: dict[str, PairSet] = {}
        self.positives: SameTargetPositives | None = None
        self.previous_content_hashes: set[str] = set()  # of the data before append_interactions
        if item_features not in (None, "auto") and not Path(item_features).is_file():
            raise DataError(f"{item_features}: no such item feature file (data.item_features)")
        self.item_features_path = item_features
        self._features: ItemFeatures | None = None

    # ----------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        # Runs on one process: fills the on-disk cache so other ranks only read it.
        self._load()

    def _load(self) -> SequenceData:
        if self._data is None:
            from raserec.data.prepare import load_dataset

            if not self.data_path.exists():
                raise DataError(f"{self.data_path}: no such file or directory")
            self.set_data(
                load_dataset(
                    self.data_path,
                    cache_dir=self.cache_dir,
                    fmt=self.data_format,
                    k_core=self.k_core,
                    min_length=self.min_length,
                )
            )
        assert self._data is not None
        return self._data

    def set_data(self, data: SequenceData) -> None:
        """Use ``data`` (already loaded) and rebuild every split and the positives from it."""
        if np.any(data.lengths < 3):
            raise DataError("every user needs at least 3 interactions for a leave-one-out split")
        self._data = data
        self._features = None  # realigned with the new item ids on next access
        train = training_pairs(data)
        if len(train) == 0:
            raise DataError(f"{self.data_path}: no training pairs (every user has exactly 3 items?)")
        self._splits = {
            "train": train,
            "val": validation_queries(data),
            "test": test_queries(data),
            "predict": predict_queries(data),
        }
        self.positives = SameTargetPositives.build(train.target, data.num_items, self.lonely_positive)

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def append_interactions(self, interactions: pl.DataFrame) -> None:
        """Append new interactions (original ids) after each user's history and re-split.

        Changes the reference set, so ``reference_version`` changes and the memory bank
        callback rebuilds the bank, without retraining the encoder."""
        self.previous_content_hashes.add(self.data.content_hash())  # still the encoder's data, grown
        self.set_data(self.data.append(interactions))

    # ----------------------------------------------------------------- accessors
    @property
    def item_features(self) -> ItemFeatures | None:
        """The item side information aligned with this data's item ids (``None`` if not configured,
        or ``auto`` found no file)."""
        if self._features is None and self.item_features_path is not None:
            path = (default_feature_path(self.data_path) if self.item_features_path == "auto"
                    else Path(self.item_features_path))
            if self.item_features_path == "auto" and not path.is_file():
                return None
            self._features = ItemFeatures.load(path, self.data, cache_dir=self.cache_dir)
        return self._features

    @property
    def data(self) -> SequenceData:
        return self._load()

    @property
    def num_items(self) -> int:
        """Number of real items; the embedding table has ``num_items + 1`` rows (0 = padding)."""
        return self.data.num_items

    def pairs(self, split: Literal["train", "val", "test", "predict"]) -> PairSet:
        self._load()
        return self._splits[split]

    def dataset(self, split: Literal["train", "val", "test", "predict"]) -> PairDataset:
        return self.pair_dataset(self.pairs(split))

    def reference_pairs(self, stage: Stage = "fit") -> PairSet:
        """The <prefix, target> pairs a memory bank may hold at ``stage``.

        Always the training pairs; at test time also the validation pairs (if
        ``include_validation_in_reference``), and at predict time also the test pairs: every
        pair that lies strictly in the past of the queries of that stage."""
        parts = [self.pairs("train")]
        if self.include_validation_in_reference and stage in ("test", "predict"):
            parts.append(self.pairs("val"))
            if stage == "predict":
                parts.append(self.pairs("test"))
        return PairSet.concat(*parts) if len(parts) > 1 else parts[0]

    def reference_dataset(self, stage: Stage = "fit") -> PairDataset:
        """:meth:`reference_pairs` as a dataset of padded prefixes (what a memory bank encodes)."""
        return self.pair_dataset(self.reference_pairs(stage))

    def pair_dataset(self, pairs: PairSet) -> PairDataset:
        """Any pairs of this data (``[user, end)`` prefixes and targets) as padded sequences."""
        data = self.data
        return PairDataset(pairs, data.offsets, data.items, self.max_len)

    def reference_version(self, stage: Stage = "fit") -> str:
        """Changes whenever the reference set of ``stage`` changes (data or policy)."""
        ref = self.reference_pairs(stage)
        h = hashlib.sha256(self.data.content_hash().encode())
        h.update(f"{len(ref)}:{self.max_len}".encode())
        for arr in (ref.user, ref.end):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    # ----------------------------------------------------------------- loaders
    def _loader(self, split: Literal["train", "val", "test", "predict"], train: bool) -> DataLoader:
        dataset = self.dataset(split)
        sampler = None
        trainer = self.trainer
        if not train and trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler repeats samples to even out the last batch,
            # which would count those queries twice; this one never repeats.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and self.shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=passthrough,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", train=False)

    def add_positives(self, batch: SequenceBatch, epoch: int) -> SequenceBatch:
        """Attach one same-target positive per training pair, drawn for ``epoch``."""
        assert self.positives is not None
        rows = batch["index"].numpy()
        pos, has = self.positives.sample(rows, epoch=epoch, seed=self.seed)
        pos_t = torch.from_numpy(pos)
        batch["positive_ids"] = self.dataset_cache("train").prefixes(pos_t)  # type: ignore[typeddict-unknown-key]
        batch["has_positive"] = torch.from_numpy(np.asarray(has, dtype=bool))  # type: ignore[typeddict-unknown-key]
        return batch

    def dataset_cache(self, split: Literal["train", "val", "test", "predict"]) -> PairDataset:
        key = f"_ds_{split}"
        ds = getattr(self, key, None)
        if ds is None or ds.pairs is not self.pairs(split):
            ds = self.dataset(split)
            setattr(self, key, ds)
        return ds

    def on_before_batch_transfer(self, batch: SequenceBatch, dataloader_idx: int) -> SequenceBatch:
        trainer = self.trainer
        if trainer is not None and trainer.training and getattr(trainer.lightning_module, "uses_positives", False):
            batch = self.add_positives(batch, trainer.current_epoch)
        return batch
