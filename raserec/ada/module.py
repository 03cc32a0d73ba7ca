"""Ada-Retrieval's second phase as a LightningModule: fine-tune the pre-trained backbone and
freshly initialised adapters jointly, and evaluate the concatenated multi-round list."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from raserec.checkpoint import RECORD_KEY, encoder_record, load_weights_only
from raserec.data.batch import SequenceBatch
from raserec.errors import CheckpointError, ConfigError
from raserec.evaluation.metrics import RankingMetrics
from raserec.evaluation.module import RecommenderModule, full_precision
from raserec.evaluation.ranking import target_ranks
from raserec.finetune.frozen import FrozenEncoderMixin, freeze, load_frozen_encoder
from raserec.memory.callback import MemoryBankCallback
from raserec.memory.retriever import BankConfig, MemoryRetriever
from raserec.models.ada import AdaOutput, AdaRetrieval, list_ranks
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.losses import next_item_loss, sample_negatives, target_first_bce
from raserec.models.ram import RAMConfig, RetrievalAugmentedModule, holds_residual_block

log = logging.getLogger(__name__)


class AdaRetrievalModule(FrozenEncoderMixin, RecommenderModule):
    """Ada-Retrieval phase 2: backbone (from a pre-training checkpoint) + IRA + URA, trained
    jointly with sum_t lambda^(t-1) L_t and evaluated on the concatenated T x k list.

    Validation/test log ``val/*`` and ``test/*`` (HR/NDCG@K of the concatenated list) and, with
    ``evaluate_base``, ``base/val/*`` and ``base/test/*``: the pre-trained backbone (a frozen
    copy) as a single round on the same protocol, i.e. its plain top-K ranking.

    Args:
        num_items: number of real items (linked from the datamodule by the CLI); must equal the
            checkpoint's.
        encoder_checkpoint: pre-training ``.ckpt`` (or a ``save_encoder`` file) of the backbone;
            it is fine-tuned here, the adapters start fresh.
        rounds: number of retrieval rounds T.
        total_k: length K of the final list; each round retrieves k = K // T items.
        round_decay: lambda, the weight of round t's loss is lambda^(t-1).
        loss: ``ce`` (full-softmax cross-entropy, as the rest of raserec) or ``bce`` (the
            authors': binary cross-entropy over the target and ``num_negatives`` sampled items).
        num_negatives: negatives per query for ``bce`` (uniform, never from the input
            sequence nor the target; shared by all rounds).
        dropout: dropout of the adapters (the authors use 0.1777 everywhere).
        filter_per_round: one IRA filter layer per earlier round's block instead of one shared.
        item_bias: score ``u . v_i + b_i`` with a learned per-item bias (N(0, 0.1) init), as the
            authors' code does; it starts fresh in phase 2 (our pre-trained encoders have none)
            and the base row stays the bias-free backbone.
        lr: Adam learning rate (backbone and adapters).
        weight_decay: Adam weight decay.
        allow_other_data: use the encoder even with data other than it was pre-trained on (same
            item count, different content hash); refused by default, since item ids would
            silently mean other items.
        evaluate_base: also evaluate the frozen pre-trained backbone (``base/...`` metrics).
        metric_ks: cut-offs of HR@K and NDCG@K (at most T * k).
        mask_history: exclude the input sequence's items from every round's retrieval (in
            training too, so the model trains on the retrieval it is evaluated with; the target
            is never excluded at evaluation). Off in our main protocol.
        predict_top_n: items per user written by ``raserec predict`` (the list's first n, at most
            T * k).
        bank: RaSeRec + Ada-Retrieval (no published system has it): ``bank.k`` > 0 retrieves
            that many memories per query from a memory bank of the training pairs, keyed by a
            frozen copy of the pre-trained backbone (as RaSeRec's), and a RAM mixes them into
            every round's user representation u_t before it retrieves. ``k`` 0 (the default) =
            plain Ada-Retrieval. See :class:`BankConfig`.
        ram: that RAM (alpha = weight of u_t itself); see :class:`RAMConfig`.
        ram_checkpoint: initialise the RAM from a trained RAFT checkpoint (its ``ram.*`` weights;
            ``null``: fresh).
    """

    def __init__(
        self,
        num_items: int | None = None,
        *,
        encoder_checkpoint: str,
        rounds: int = 5,
        total_k: int = 100,
        round_decay: float = 0.3,
        loss: Literal["bce", "ce"] = "ce",
        num_negatives: int = 100,
        dropout: float = 0.2,
        filter_per_round: bool = False,
        item_bias: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        allow_other_data: bool = False,
        evaluate_base: bool = True,
        metric_ks: Sequence[int] = (20, 50),
        mask_history: bool = False,
        predict_top_n: int = 50,
        bank: BankConfig = BankConfig(k=0),
        ram: RAMConfig = RAMConfig(),
        ram_checkpoint: str | None = None,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, metric_ks=metric_ks, mask_history=mask_history,
                         predict_top_n=predict_top_n)
        if loss not in ("bce", "ce"):
            raise ConfigError(f"loss must be 'bce' or 'ce', got {loss!r}")
        if num_negatives < 1:
            raise ConfigError(f"num_negatives must be >= 1, got {num_negatives}")
        bank, ram = BankConfig.of(bank), RAMConfig.of(ram)
        self.save_hyperparameters()
        self.hparams["bank"], self.hparams["ram"] = bank.as_dict(), ram.as_dict()
        encoder, data_fingerprint = load_frozen_encoder(encoder_checkpoint, num_items)
        encoder.requires_grad_(True).train()  # the backbone is fine-tuned here
        self.num_items = encoder.item_embedding.num_embeddings - 1
        self.encoder_data = data_fingerprint
        # The frozen pre-trained copy is the "Base" row of the paper's table 2.
        self.base_encoder = freeze(copy.deepcopy(encoder)) if evaluate_base else None
        self.model = AdaRetrieval(encoder, rounds=rounds, total_k=total_k, dropout=dropout,
                                  filter_per_round=filter_per_round, item_bias=item_bias)
        if max(metric_ks) > self.model.list_length:
            raise ConfigError(f"metric cut-off {max(metric_ks)} exceeds the list length {self.model.list_length}")
        self.loss_kind = loss
        self.num_negatives = num_negatives
        self.register_buffer("round_weights", round_decay ** torch.arange(rounds, dtype=torch.float32),
                             persistent=False)
        self.base_val_metrics = RankingMetrics(metric_ks)
        self.base_test_metrics = RankingMetrics(metric_ks)
        self.memory_encoder: SequenceEncoder | None = None
        self.ram: RetrievalAugmentedModule | None = None
        self.retriever: MemoryRetriever | None = None
        self._bank_callback: MemoryBankCallback | None = None
        if bank.k > 0:
            self.memory_encoder = freeze(copy.deepcopy(encoder))
            self.ram = RetrievalAugmentedModule.from_config(encoder.hidden_size, ram)
            if ram_checkpoint is not None:
                self._load_ram(ram_checkpoint)
            # Values v_k come from the backbone being fine-tuned, keys from the frozen copy.
            self.retriever = MemoryRetriever(self.memory_encoder, bank, lambda ids: self.encoder.item_embedding(ids))

    @property
    def encoder(self) -> SequenceEncoder:
        """The backbone being fine-tuned."""
        return self.model.encoder

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.base_encoder, self.memory_encoder) if m is not None]

    def _load_ram(self, path: str) -> None:
        blob = load_weights_only(path)
        state = {k.removeprefix("ram."): v for k, v in blob.get("state_dict", {}).items() if k.startswith("ram.")}
        if not state:
            raise CheckpointError(f"{path}: no RAM weights (ram.*); pass a RAFT checkpoint")
        if holds_residual_block(state) != self.ram.residual:
            raise CheckpointError(f"{path}: its RAM block (residual={holds_residual_block(state)}) does not match "
                                  f"ram.residual={self.ram.residual}")
        try:
            self.ram.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: its RAM does not fit this one (alpha/beta/size): {exc}") from exc

    def configure_callbacks(self) -> list:
        if self.retriever is None:
            return []
        if self._bank_callback is None:  # one instance for the module's lifetime
            self._bank_callback = MemoryBankCallback(self.retriever)
        return [self._bank_callback]

    def _augmenter(self, batch: SequenceBatch):
        """RAM with this batch's K memories (retrieved once, shared by all rounds), or ``None``.
        Training queries reuse the bank's stored h and precomputed memories (as RAFT's)."""
        if self.retriever is None:
            return None
        h, rows = self.retriever.queries(batch, self.training, self.device)
        h_k, v_k, mask = self.retriever.memories(h, batch["user"], batch["end"], bank_rows=rows,
                                                 input_ids=batch["input_ids"])
        return lambda u: self.ram(u, h_k, v_k, mask)

    # ---------------------------------------------------------------- forward
    def _exclude(self, batch: SequenceBatch, exempt_target: bool) -> Tensor | None:
        """Item ids no round may retrieve: the history with ``mask_history``, else none."""
        if not self.mask_history:
            return None
        ids = batch["input_ids"]
        if exempt_target:  # as target_ranks: the target itself is never excluded
            ids = ids.masked_fill(ids == batch["target"].unsqueeze(1), 0)
        return ids

    def rounds_output(self, batch: SequenceBatch, return_scores: bool = False) -> AdaOutput:
        """The multi-round pass on a batch (history exclusion per ``mask_history``)."""
        return self.model(batch["input_ids"], self._exclude(batch, exempt_target=not self.training), return_scores,
                          augment=self._augmenter(batch))

    def user_representation(self, batch: SequenceBatch) -> Tensor:
        """Round 1's representation (the fine-tuned backbone's); the list needs all rounds."""
        return self.encoder(batch["input_ids"])

    def item_weights(self) -> Tensor:
        return self.encoder.item_weights()

    # ---------------------------------------------------------------- training
    def round_losses(self, batch: SequenceBatch) -> Tensor:
        """L_t of every round ``[T]`` (unweighted)."""
        target = batch["target"]
        if self.loss_kind == "ce":
            # Raw scores: an item an earlier round already retrieved (possibly the target) still
            # counts, as in the authors' loss; the exclusion only shapes retrieval.
            if self.model.item_bias is not None:  # the row-block CE has no bias term
                out = self.rounds_output(batch, return_scores=True)
                return torch.stack([F.cross_entropy(s, target - 1) for s in out.scores])
            # Retrieval scores without autograd, and each round's CE a block of rows at a time
            # (ChunkedSoftmaxCE): no [B, N] score matrix is kept for backward in any round.
            out = self.rounds_output(batch)
            weights = self.encoder.item_weights()
            return torch.stack([next_item_loss(out.user_reprs[:, t], weights, target)
                                for t in range(out.user_reprs.size(1))])
        out = self.rounds_output(batch)
        negatives = sample_negatives(batch["input_ids"], target, self.num_items, self.num_negatives)
        candidates = torch.cat([target.unsqueeze(1), negatives], dim=1)  # [B, 1 + n]
        return target_first_bce(self.model.score_items(out.user_reprs, candidates)).mean(dim=(0, 2))

    def weighted_loss(self, losses: Tensor) -> Tensor:
        """sum_t lambda^(t-1) L_t."""
        return (self.round_weights.to(losses.dtype) * losses).sum()

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> Tensor:
        losses = self.round_losses(batch)
        loss = self.weighted_loss(losses)
        b = batch["target"].size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log_dict({f"train/loss_round{t + 1}": v for t, v in enumerate(losses.detach())}, batch_size=b)
        return loss

    def optimized_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.ram is not None:
            params += list(self.ram.parameters())
        return params

    # ---------------------------------------------------------------- evaluation
    def _eval(self, batch: SequenceBatch, metrics: RankingMetrics, base_metrics: RankingMetrics) -> None:
        target = batch["target"]
        out = self.rounds_output(batch)
        metrics.update(list_ranks(out.final_list(), target))
        if self.base_encoder is not None:
            # A single round of K items is the plain top-K ranking: the target's rank among all items.
            scores = self.base_encoder.score(self.base_encoder(batch["input_ids"]))
            base_metrics.update(target_ranks(scores, target, self._history(batch)))

    @full_precision
    def validation_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self._eval(batch, self.val_metrics, self.base_val_metrics)

    @full_precision
    def test_step(self, batch: SequenceBatch, batch_idx: int) -> None:
        self._eval(batch, self.test_metrics, self.base_test_metrics)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.base_encoder is not None:
            self._log_metrics(self.base_val_metrics, "base/val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.base_encoder is not None:
            self._log_metrics(self.base_test_metrics, "base/test")

    @full_precision
    def predict_step(self, batch: SequenceBatch, batch_idx: int) -> dict[str, Tensor]:
        out = self.rounds_output(batch)
        return {"user": batch["user"], "items": out.final_list()[:, : self.predict_top_n]}

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The fine-tuned backbone travels as an encoder record too, so load_encoder() reads an
        # Ada checkpoint (e.g. to study the backbone alone).
        checkpoint[RECORD_KEY] = encoder_record(self.encoder, self.encoder_data)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # A checkpoint loads whether or not it was written with the same ``evaluate_base``: the
        # saved reference copy is kept when both have one, else dropped or taken from
        # encoder_checkpoint.
        state = checkpoint.get("state_dict", {})
        saved = [k for k in state if k.startswith("base_encoder.")]
        if self.base_encoder is None:
            for key in saved:
                del state[key]
        elif not saved:
            state.update({f"base_encoder.{k}": v for k, v in self.base_encoder.state_dict().items()})


__all__ = ["AdaRetrievalModule"]
