"""GRASP (Dai et al., 2025): semantic context fused into any backbone's input by Holistic
Attention Enhancement (:mod:`raserec.models.hae`), trained with the backbone's own next-item loss
only (no alignment or distillation term). Method note: ``../shared/papers/GRASP.md``.

Choices where the note marks the method unknown (each a setting):

- The user's semantic vector ``s_u`` is built *per prefix* (the note's leakage mitigation): the
  normalised mean of the vectors of the sequence's last ``semantic.prefix_window`` items, computed
  in the forward pass, so a training query never sees text of its own target.
- Similar users: the ``similar_users`` nearest *users* by cosine between ``s_u`` and each user's
  training-part vector (the same mean over the last ``prefix_window`` of its first ``n - 2``
  items), the query's own user always
  excluded (its training part holds its training targets); ``s~_u`` pools them (``pooling``).
- Similar items: ``s~_i`` pools the vectors of item i's ``semantic.k`` semantic neighbours
  (``pooling``: ``mean``, the default, or ``similarity``, weights proportional to the cosine
  similarity, negative similarities weighing 0).
- Adapter sizes (``hae.adapter_hidden``) and the HAE branches (``hae``) are switches too.
- The loss is read at the last position only (the framework's pair training), which removes the
  note's within-sequence leakage of a whole-history user context.
- Scoring uses the ID embeddings E[v] (the backbone's own output layer) by default;
  ``item_scoring: id_plus_semantic`` scores with ``E[v] + f_I(s_v)`` (the HAE's item adapter on
  the item's own semantics, LLM-ESR's dual view summed), which costs an adapter pass over every
  item per training step.

Settings that differ from the paper's (LLM-ESR's) setup, kept so that GRASP is compared with the
same SASRec as every other row: full-softmax CE at the last position (LLM-ESR: BCE with one
negative at every position), max_len 50 (paper 100), 2 heads (1), batch 256 (128), early
stopping on val HR@10 with patience 10 (NDCG@10, 20), 5-core Beauty (LLM-ESR's 3-core Beauty has
52k users, 57k items and a longer tail, where GRASP's gains are largest), and the HAE layers keep
PyTorch's default initialisation (the backbone: N(0, 0.02)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from raserec.data.batch import PretrainBatch, SequenceBatch
from raserec.errors import ConfigError, check
from raserec.evaluation.module import RecommenderModule
from raserec.models.encoders.base import SequenceEncoder
from raserec.models.encoders.sasrec import SASRec
from raserec.models.hae import HAEConfig, HolisticAttention
from raserec.models.losses import next_item_loss
from raserec.pretrain.module import PretrainModule
from raserec.pretrain.objectives import NextItemCE
from raserec.semantic.embedders import EMBEDDERS
from raserec.semantic.space import SemanticConfig, mean_item_vectors, semantic_space, trainer_datamodule
from raserec.typed_config import coerce_config


def pool(members: Tensor, query: Tensor, valid: Tensor | None, how: str) -> Tensor:
    """Pool ``members`` ``[B, k, D]`` (``valid`` ``[B, k]`` marks real ones; ``None``: all) into
    ``[B, D]``: their mean, or with ``how == "similarity"`` their mean weighted by the cosine
    similarity to ``query`` ``[B, D]`` (negative weigh 0; rows whose weights are all 0 take the mean)."""
    weights = torch.ones(members.shape[:2], dtype=members.dtype, device=members.device)
    if valid is not None:
        weights = weights * valid
    # Element-wise products, not einsum: a bmm would run in bf16 under autocast.
    if how == "similarity":
        sim = (members * query[:, None, :]).sum(2).clamp_min(0) * weights
        weights = torch.where(sim.sum(1, keepdim=True) > 0, sim, weights)
    return (members * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-12)


class GRASPModule(PretrainModule):
    """A backbone with GRASP's semantic input enhancement, trained with next-item CE.

    Args:
        num_items: number of real items (linked from the datamodule by the CLI).
        encoder: the backbone, built as ``encoder(num_items)``; it must accept ``item_embeddings``.
        semantic: where item and user semantics come from; ``prefix_vectors`` must be
            ``mean_items`` (user vectors are computed in the forward pass).
        hae: the HAE switches (:class:`~raserec.models.hae.HAEConfig`).
        similar_users: N, the similar users pooled into ``s~_u`` (paper: 10).
        pooling: how ``s~_u`` and ``s~_i`` pool their neighbours: ``mean`` or ``similarity``
            (cosine-weighted mean; negative similarities weigh 0; all-zero weights fall back to
            the mean). The note does not say.
        item_scoring: the candidates' representation: ``id`` (the ID embeddings) or
            ``id_plus_semantic`` (``E[v] + f_I(s_v)``). The note does not say.
        lr: Adam learning rate (the optimiser, metrics and prediction settings are
            :class:`~raserec.evaluation.module.RecommenderModule`'s).
    """

    #: PretrainModule arguments GRASP sets itself (not saved; the CLI drops them from older checkpoints).
    FIXED_HYPERPARAMETERS = ("objectives", "positive_pair")

    def __init__(
        self,
        num_items: int,
        encoder: Callable[[int], SequenceEncoder] = SASRec,
        semantic: SemanticConfig = SemanticConfig(prefix_vectors="mean_items"),
        hae: HAEConfig = HAEConfig(),
        similar_users: int = 10,
        pooling: Literal["mean", "similarity"] = "mean",
        item_scoring: Literal["id", "id_plus_semantic"] = "id",
        lr: float = 1e-3, weight_decay: float = 0.0, metric_ks: Sequence[int] = (5, 10, 20, 50),
        mask_history: bool = False, predict_top_n: int = 10,
    ) -> None:
        semantic = coerce_config(SemanticConfig, semantic)
        hae = coerce_config(HAEConfig, hae)
        if semantic.prefix_vectors != "mean_items":
            raise ConfigError("GRASP computes user vectors in the forward pass: semantic.prefix_vectors must be "
                              "'mean_items'")
        check(similar_users >= 1, f"similar_users must be >= 1, got {similar_users}")
        if pooling not in ("mean", "similarity"):
            raise ConfigError(f"pooling must be 'mean' or 'similarity', got {pooling!r}")
        if item_scoring not in ("id", "id_plus_semantic"):
            raise ConfigError(f"item_scoring must be 'id' or 'id_plus_semantic', got {item_scoring!r}")
        super().__init__(num_items, encoder, positive_pair="none", objectives=[NextItemCE()], lr=lr,
                         weight_decay=weight_decay, metric_ks=metric_ks, mask_history=mask_history,
                         predict_top_n=predict_top_n)
        for fixed in self.FIXED_HYPERPARAMETERS:  # GRASP's own choice, not arguments it takes
            self.hparams.pop(fixed, None)
        self.hparams["semantic"] = asdict(semantic)  # plain data in the checkpoint
        self.hparams["hae"] = asdict(hae)
        self.semantic = semantic
        self.similar_users = similar_users
        self.pooling = pooling
        self.item_scoring = item_scoring
        dim = EMBEDDERS[semantic.embedder]().dim
        self.hae = HolisticAttention(dim, self.encoder.hidden_size, hae)
        # Filled from the data at setup (every stage), never saved: they are a deterministic,
        # cached function of the data and the semantic settings.
        self.register_buffer("item_semantic", torch.zeros(0, dim), persistent=False)
        self.register_buffer("similar_semantic", torch.zeros(0, dim), persistent=False)
        self.register_buffer("user_bank", torch.zeros(0, dim), persistent=False)
        # The similar users of every training pair: fixed (the user vector is a function of the
        # pair's prefix), so found once per setup instead of once per batch and epoch.
        self.register_buffer("train_similar", torch.zeros(0, similar_users, dtype=torch.int64), persistent=False)
        # The same for the validation and test queries (one of each per user; rows 0 and 1), and each
        # user's sequence length, which tells the two apart (their prefixes end at n - 2 and n - 1).
        self.register_buffer("eval_similar", torch.zeros(2, 0, similar_users, dtype=torch.int64), persistent=False)
        self.register_buffer("user_lengths", torch.zeros(0, dtype=torch.int64), persistent=False)

    def setup(self, stage: str) -> None:
        RecommenderModule.setup(self, stage)
        self.attach(trainer_datamodule(self, "GRASP's semantic tables"))

    def attach(self, dm) -> None:
        """Build the semantic tables of ``dm`` into the module's buffers."""
        # A query's vector reads the last prefix_window items of its input, which holds at most
        # max_len; the user bank reads the last prefix_window of the history: wider, they differ.
        check(self.semantic.prefix_window <= dm.max_len,
              f"semantic.prefix_window ({self.semantic.prefix_window}) must be <= data.max_len ({dm.max_len}): "
              "GRASP's query vectors read the last prefix_window items of an input of at most max_len")
        space = semantic_space(dm, self.semantic)
        vectors = space.item_vectors
        neighbours = space.item_neighbours
        item_vectors = torch.from_numpy(vectors)
        similar = pool(item_vectors[torch.from_numpy(neighbours)], item_vectors, torch.from_numpy(neighbours > 0),
                       self.pooling)
        device = self.encoder.item_embedding.weight.device
        self.item_semantic = item_vectors.to(device)
        self.similar_semantic = similar.to(device)
        self.user_bank = torch.from_numpy(space.user_vectors).to(device)
        self.train_similar = self._similar_of(dm, "train", device)
        val, test = self._similar_of(dm, "val", device), self._similar_of(dm, "test", device)
        users_val, users_test = torch.from_numpy(dm.pairs("val").user), torch.from_numpy(dm.pairs("test").user)
        self.eval_similar = torch.stack([val[users_val.argsort()], test[users_test.argsort()]])
        self.user_lengths = torch.from_numpy(dm.data.lengths.astype(np.int64)).to(device)

    def _similar_of(self, dm, split: str, device: torch.device) -> Tensor:
        """The similar users of every query of ``split``, in the split's row order."""
        dataset = dm.dataset(split)
        owners = torch.from_numpy(dm.pairs(split).user)
        return torch.cat([self._similar(self._user_vectors(dataset.prefixes(chunk).to(device)), owners[chunk].to(device))
                          for chunk in torch.arange(len(dataset)).split(8192)])

    def _user_vectors(self, ids: Tensor) -> Tensor:
        return mean_item_vectors(self.item_semantic, ids, self.semantic.prefix_window)

    def _similar(self, user: Tensor, user_ids: Tensor) -> Tensor:
        sims = user @ self.user_bank.T  # [B, U]
        sims[torch.arange(len(user), device=user.device), user_ids] = float("-inf")  # never itself
        return sims.topk(min(self.similar_users, self.user_bank.size(0) - 1), dim=1).indices

    def _contexts(self, batch: SequenceBatch, training: bool = False) -> tuple[Tensor, Tensor]:
        user = self._user_vectors(batch["input_ids"])
        users = batch["user"]
        offset = self.user_lengths[users] - batch["end"] if len(self.user_lengths) else None
        if training and len(self.train_similar):  # rows of the training pairs: precomputed
            top = self.train_similar[batch["index"]]
        elif not training and offset is not None and ((offset == 1) | (offset == 2)).all():
            top = self.eval_similar[2 - offset, users]  # validation (n - 2) and test (n - 1) queries: precomputed
        else:
            top = self._similar(user, users)
        return user, pool(self.user_bank[top], user, None, self.pooling)

    def user_representation(self, batch: SequenceBatch, training: bool = False) -> Tensor:
        if self.item_semantic.numel() == 0:
            raise RuntimeError("GRASPModule has no semantic tables: call attach(datamodule) or run it in a Trainer")
        ids = batch["input_ids"]
        user, similar_user = self._contexts(batch, training)
        # Left padding: columns that are padding in every row change nothing (HAE masks padding, the
        # encoder drops it and aligns positions by recency), so HAE runs only as wide as the longest row.
        width = max(int((ids > 0).sum(1).max()), 1)
        ids = ids[:, -width:]
        x = self.hae(self.encoder.item_embedding(ids), ids, self.item_semantic, self.similar_semantic, user,
                     similar_user)
        return self.encoder(ids, item_embeddings=x)

    def item_weights(self) -> Tensor:
        """Candidate items ``[N, d]``: the ID embeddings, plus with ``item_scoring:
        id_plus_semantic`` the item adapter's view of each item's semantics."""
        weights = self.encoder.item_weights()
        if self.item_scoring == "id_plus_semantic":
            if self.item_semantic.numel() == 0:
                raise RuntimeError("GRASPModule has no semantic tables: call attach(datamodule) or run it in a Trainer")
            weights = weights + self.hae.item_adapter(self.item_semantic[1:])
        return weights

    def training_step(self, batch: PretrainBatch, batch_idx: int) -> Tensor:
        loss = next_item_loss(self.user_representation(batch, training=True), self.item_weights(), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # No encoder record: the backbone alone is not this model (it needs the HAE and the tables).
        RecommenderModule.on_save_checkpoint(self, checkpoint)
