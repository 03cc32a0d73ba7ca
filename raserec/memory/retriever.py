"""The retrieval-augmentation component: a frozen key encoder, typed bank settings, the bank, and
retrieval under the leakage rule. RAFT and Ada-Retrieval + RAM compose it; a new method that
retrieves memories composes it too, never copies it.

Pure code (no Lightning). :class:`raserec.memory.callback.MemoryBankCallback` receives a
:class:`MemoryRetriever` and calls :meth:`MemoryRetriever.ensure` when a stage needs the bank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from raserec.data.batch import PairDataset, SequenceBatch
from raserec.errors import CheckpointError, RaserecError, check
from raserec.memory.bank import IndexConfig, IndexKind, KeyFunction, MemoryBank, keys_fingerprint
from raserec.models.encoders.base import SequenceEncoder
from raserec.typed_config import coerce_config

log = logging.getLogger(__name__)

BankStage = Literal["fit", "test", "predict"]


@dataclass(frozen=True)
class BankConfig:
    """The memory bank: how many memories a query gets, and how the bank is indexed and built."""

    k: int = 20
    """Memories retrieved per query (K); 0 turns retrieval off."""
    index: IndexKind = "ivf_flat"
    """Faiss index: ivf_flat (the authors'), flat (exact search), ivf_pq (compressed, for large banks) or
    auto (kind, nlist and nprobe chosen by the bank's size from results/bank_scale.json)."""
    nlist: int = 128
    """IVF inverted lists (shrunk automatically when the bank is too small to train them)."""
    nprobe: int = 1
    """IVF lists probed per query (1 in the paper; more = better recall, slower)."""
    overfetch: int | None = None
    """Candidates fetched before the leakage filter: null = K plus the query's own filtered entries
    (the same neighbours as any larger over-fetch, fastest); an int m = the authors' fixed m * K."""
    pq_m: int = 8
    """ivf_pq sub-quantizers (must divide the hidden size)."""
    batch_size: int = 2048
    """Encoding batch size when building the bank."""
    save_dir: str | None = None
    """Save built banks under this directory and reuse matching ones (null: keep in memory only)."""
    reuse_h: bool = True
    """While training, take a query's h from the bank's payload when the query is a bank entry (the
    key encoder is frozen, so it is the same vector) instead of encoding it again."""
    precompute: bool = True
    """With reuse_h, search the memories of every training query once per bank build instead of
    once per batch: the same rows, several times faster."""

    def __post_init__(self) -> None:
        check(self.k >= 0, f"bank.k (memories per query) must be >= 0, got {self.k}")
        check(self.batch_size >= 1, f"bank.batch_size must be >= 1, got {self.batch_size}")
        self.index_config()  # validates the index settings

    def index_config(self) -> IndexConfig:
        """The faiss settings of :class:`~raserec.memory.bank.MemoryBank`."""
        return IndexConfig(kind=self.index, nlist=self.nlist, nprobe=self.nprobe, overfetch=self.overfetch,
                           pq_m=self.pq_m)

    @classmethod
    def of(cls, value: BankConfig | Mapping[str, Any] | None) -> BankConfig:
        """``value`` as a config: an instance, a mapping (a checkpoint's hyper-parameters) or
        ``None`` (defaults); unknown keys are a :class:`ConfigError`."""
        return coerce_config(cls, value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReferenceSource(Protocol):
    """What the bank needs from the data (a :class:`~raserec.data.datamodule.SequenceDataModule`)."""

    def reference_dataset(self, stage: BankStage) -> PairDataset: ...

    def reference_version(self, stage: BankStage) -> str: ...


class MemoryRetriever:
    """Builds and refreshes a memory bank keyed by a frozen encoder, and retrieves memories.

    The bank holds the reference pairs of a stage (:meth:`ensure`); it is rebuilt exactly when the
    reference set or the key encoder's weights change. :meth:`memories` returns, for each query,
    the stored h_k of its K allowed neighbours, the embeddings v_k of their target items and the
    mask of real memories; the leakage rule (no own pair, no own future) is the bank's.

    Args:
        key_encoder: the frozen encoder whose representations key the bank (never trained here).
        config: bank settings; ``config.k`` is the initial :attr:`k` (analyses may change it).
        item_embedding: maps target ids to the value embeddings v_k (RAFT: the frozen item table;
            Ada-Retrieval: the fine-tuned backbone's).
        key_fn: search keys from (h, item ids) instead of h itself (e.g. collaborative and
            semantic similarity mixed, :class:`raserec.semantic.keys.SemanticKeys`); may be set
            later (:attr:`key_fn`), before the bank is built. The memories' payload stays h.
    """

    def __init__(self, key_encoder: SequenceEncoder, config: BankConfig,
                 item_embedding: Callable[[Tensor], Tensor], key_fn: KeyFunction | None = None) -> None:
        self.key_encoder = key_encoder
        self.key_fn = key_fn
        self.config = config
        self.k = config.k
        self.item_embedding = item_embedding
        self.bank: MemoryBank | None = None
        self.save_dir = Path(config.save_dir) if config.save_dir is not None else None
        self.num_builds = 0
        self.num_loads = 0
        self.history: list[tuple[str, str, str]] = []  # (stage, reference_version, "built" | "loaded")
        self.last_build_seconds = 0.0
        self.retrieval_seconds = 0.0  # time of the last search + filter + gather (for benchmarks)
        self._warned_small_bank = False

    # ---------------------------------------------------------------- the bank
    def require_bank(self) -> MemoryBank:
        if self.bank is None:
            raise RaserecError("no memory bank: run the module through a Trainer (its MemoryBankCallback builds "
                               "one) or call retriever.ensure(datamodule, stage)")
        return self.bank

    def build(self, dataset: PairDataset, reference_version: str | None = None, *,
              device: torch.device | str | None = None, progress: bool = False) -> MemoryBank:
        """Encode ``dataset`` with the key encoder, index it, and make it the current bank."""
        start = time.perf_counter()
        self.bank = MemoryBank.build(self.key_encoder, dataset, self.config.index_config(),
                                     batch_size=self.config.batch_size, device=device, progress=progress,
                                     reference_version=reference_version, key_fn=self.key_fn)
        self.last_build_seconds = time.perf_counter() - start
        self.num_builds += 1
        return self.bank

    def ensure(self, source: ReferenceSource, stage: BankStage, *, device: torch.device | str | None = None,
               progress: bool = False, writer: bool = True) -> tuple[MemoryBank, str]:
        """The bank for ``stage``: the current one if it is up to date, else a saved matching one
        (``config.save_dir``), else a new build (saved there when ``writer``, the global rank
        zero under DDP). Returns the bank and what happened: ``kept``, ``loaded`` or ``built``."""
        version = source.reference_version(stage)
        fingerprint = self.fingerprint()
        bank = self.bank
        if bank is not None and bank.reference_version == version and bank.encoder_fingerprint == fingerprint:
            return bank, "kept"
        loaded = self._load_saved(version, fingerprint)
        if loaded is not None:
            self.bank = loaded
            self.num_loads += 1
            self.history.append((stage, version, "loaded"))
            return loaded, "loaded"
        bank = self.build(source.reference_dataset(stage), version, device=device, progress=progress)
        self.history.append((stage, version, "built"))
        log.info("memory bank (%s): built %d entries, index %s (nlist %d, nprobe %d) in %.1f s",
                 stage, len(bank), bank.kind, bank.nlist, bank.nprobe, self.last_build_seconds)
        if self.save_dir is not None and writer:
            bank.save(self.save_dir / version)
        return bank, "built"

    def _load_saved(self, version: str, fingerprint: str) -> MemoryBank | None:
        if self.save_dir is None or not (self.save_dir / version / "manifest.json").is_file():
            return None
        directory = self.save_dir / version
        try:
            bank = MemoryBank.load(directory, expected_encoder=fingerprint, expected_reference_version=version)
        except CheckpointError as exc:
            log.warning("%s; rebuilding it", exc)
            return None
        log.info("memory bank: loaded %d entries from %s", len(bank), directory)
        return bank

    def fingerprint(self) -> str:
        """What the bank's keys are a function of: the key encoder's weights (and the key function)."""
        return keys_fingerprint(self.key_encoder, self.key_fn)

    # ---------------------------------------------------------------- retrieval
    def encode(self, input_ids: Tensor) -> Tensor:
        """h of the sequences from the frozen key encoder, in float32 even under mixed precision:
        the bank's keys are float32, and a frozen encoder gains nothing from bf16 but keys that
        differ from the stored ones."""
        with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
            return self.key_encoder(input_ids)

    def bank_rows(self, batch: SequenceBatch) -> np.ndarray | None:
        """The bank rows of the batch's pairs if the bank holds exactly these pairs at these rows
        (the fit bank stores the training pairs in their dataset order), else ``None``."""
        if self.bank is None:
            return None
        rows = batch["index"].cpu().numpy()
        if len(rows) == 0 or rows.max() >= len(self.bank):
            return None
        if not (np.array_equal(self.bank.users[rows], batch["user"].cpu().numpy())
                and np.array_equal(self.bank.ends[rows], batch["end"].cpu().numpy())):
            return None
        return rows

    def queries(self, batch: SequenceBatch, training: bool, device: torch.device | str) -> tuple[Tensor, np.ndarray | None]:
        """Each query's h and, while training with ``reuse_h``, its bank rows. The key encoder is
        frozen and the fit bank holds the training pairs, so a training query's h is its stored
        payload and its memories were found once per bank build (:meth:`neighbours` with
        ``bank_rows``): no encoder pass and no search per step. Otherwise ``(encode(...), None)``."""
        rows = self.bank_rows(batch) if training and self.config.reuse_h else None
        h = self.stored_h(rows, device) if rows is not None else self.encode(batch["input_ids"])
        return h, rows

    def stored_h(self, rows: np.ndarray, device: torch.device | str) -> Tensor:
        """The h the bank stores for its entries ``rows`` (what the key encoder gives them)."""
        return torch.from_numpy(self.require_bank().h[rows]).to(device)

    def query_keys(self, h: Tensor, input_ids: Tensor | None) -> Tensor:
        """The search keys of queries with representations ``h`` and items ``input_ids``: h itself,
        or ``key_fn(h, input_ids)``."""
        if self.key_fn is None:
            return h
        if input_ids is None:
            raise RaserecError("this retriever searches by a key function of (h, item ids): pass input_ids")
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            return self.key_fn(h, input_ids.to(h.device))

    def neighbours(self, h: Tensor, user: Tensor, end: Tensor, bank_rows: np.ndarray | None = None,
                   progress: bool = False, input_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Bank rows ``[B, k]`` and mask of each query's k allowed memories. With ``bank_rows``
        (the queries are these bank entries) and ``config.precompute``, the memories of all
        entries are searched once per bank build and looked up. With a key function the queries'
        ``input_ids`` are needed (their keys are ``key_fn(h, input_ids)``)."""
        start = time.perf_counter()
        bank = self.require_bank()
        if self.k > len(bank) and not self._warned_small_bank:
            self._warned_small_bank = True
            log.warning("k = %d memories per query, but the memory bank holds only %d entries: queries get at most "
                        "%d (the rest are masked)", self.k, len(bank), len(bank))
        if bank_rows is not None and self.config.precompute:
            all_rows, all_mask = bank.self_neighbours(self.k, progress=progress)
            rows, mask = torch.from_numpy(all_rows[bank_rows]), torch.from_numpy(all_mask[bank_rows])
        else:
            rows, mask = bank.search(self.query_keys(h, input_ids), user, end, self.k)
        self.retrieval_seconds = time.perf_counter() - start
        return rows, mask

    def gather(self, rows: Tensor, mask: Tensor, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
        """The memories at bank ``rows`` (``mask`` True = a real one): stored h_k ``[B, k, d]``,
        target embeddings v_k ``[B, k, d]`` and the mask, on ``device``."""
        h_k, targets = self.require_bank().gather(rows, mask)
        return h_k.to(device), self.item_embedding(targets.to(device)), mask.to(device)

    def memories(self, h: Tensor, user: Tensor, end: Tensor, bank_rows: np.ndarray | None = None,
                 progress: bool = False, input_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`neighbours` then :meth:`gather`: h_k, v_k and mask of each query, on h's device."""
        rows, mask = self.neighbours(h, user, end, bank_rows, progress, input_ids)
        return self.gather(rows, mask, h.device)


__all__ = ["BankConfig", "BankStage", "MemoryRetriever", "ReferenceSource"]
