"""The retrieval-augmentation component (MemoryRetriever) and the typed configs, without Lightning."""

from __future__ import annotations

import lightning as L
import polars as pl
import pytest
import torch

from raserec.checkpoint import save_encoder
from raserec.cli import main
from raserec.errors import ConfigError
from raserec.evaluation.module import RecommenderModule
from raserec.finetune.frozen import FrozenEncoderMixin, load_frozen_encoder
from raserec.memory.callback import MemoryBankCallback
from raserec.memory.retriever import BankConfig, MemoryRetriever
from raserec.models.losses import next_item_loss
from raserec.models.ram import RAMConfig
from tests.test_memory_bank import check_no_leakage, synthetic_dm, tiny_encoder


def test_bank_config_validates_and_round_trips_as_a_dict() -> None:
    config = BankConfig(k=7, index="flat", nprobe=2)
    assert BankConfig.of(config.as_dict()) == config and BankConfig.of(None) == BankConfig()
    assert RAMConfig.of({"alpha": 0.3}).alpha == 0.3
    with pytest.raises(ConfigError, match="bank.k .* must be >= 0"):
        BankConfig(k=-1)
    with pytest.raises(ConfigError, match="nprobe must be >= 1"):
        BankConfig(nprobe=0)
    with pytest.raises(ConfigError, match=r"unknown BankConfig field\(s\) \['kk'\]"):
        BankConfig.of({"kk": 3})
    with pytest.raises(ConfigError, match="alpha and beta"):
        RAMConfig(beta=1.5)


def test_retriever_keeps_builds_and_loads_banks_by_reference_version(tmp_path) -> None:
    dm = synthetic_dm()
    dm.setup("fit")
    encoder = tiny_encoder(dm.num_items)
    config = BankConfig(k=5, nlist=4, save_dir=str(tmp_path))
    retriever = MemoryRetriever(encoder, config, encoder.item_embedding)
    bank, what = retriever.ensure(dm, "fit")
    assert what == "built" and len(bank) == len(dm.pairs("train")) and retriever.num_builds == 1
    assert retriever.ensure(dm, "fit") == (bank, "kept")
    test_bank, what = retriever.ensure(dm, "test")
    assert what == "built" and len(test_bank) == len(dm.pairs("train")) + len(dm.pairs("val"))
    # a second retriever with the same encoder finds the saved bank; new data means a new build
    other = MemoryRetriever(encoder, config, encoder.item_embedding)
    assert other.ensure(dm, "fit")[1] == "loaded" and other.num_builds == 0
    dm.append_interactions(pl.DataFrame({"user": ["0", "1"], "item": ["3", "4"], "order": [10**6] * 2}))
    assert other.ensure(dm, "fit")[1] == "built"


def test_memories_follow_the_leakage_rule_and_use_the_given_item_table() -> None:
    dm = synthetic_dm()
    dm.setup("fit")
    encoder = tiny_encoder(dm.num_items)
    table = torch.nn.Embedding(dm.num_items + 1, 16)
    retriever = MemoryRetriever(encoder, BankConfig(k=6, index="flat"), table)
    bank, _ = retriever.ensure(dm, "fit")
    batch = dm.dataset("train").__getitems__(list(range(64)))
    h = retriever.encode(batch["input_ids"])
    rows, mask = retriever.neighbours(h, batch["user"], batch["end"])
    check_no_leakage(bank, rows, mask, batch["user"].numpy(), batch["end"].numpy(), 6)
    h_k, v_k, m = retriever.memories(h, batch["user"], batch["end"])
    assert h_k.shape == v_k.shape == (64, 6, 16) and torch.equal(m, mask)
    targets = torch.from_numpy(bank.targets[rows.clamp(min=0).numpy()])
    assert torch.equal(v_k[m], table(targets)[m])
    # training queries are bank entries: precomputed neighbours are the searched ones
    bank_rows = retriever.bank_rows(batch)
    assert bank_rows is not None
    torch.testing.assert_close(retriever.stored_h(bank_rows, "cpu"), h, atol=1e-5, rtol=1e-5)
    pre_rows, pre_mask = retriever.neighbours(h, batch["user"], batch["end"], bank_rows)
    assert torch.equal(pre_mask, mask)
    # Same neighbours rank by rank; two entries may only swap places where their scores tie
    # (stored and recomputed h differ by float rounding, which can flip an exact tie).
    same = (pre_rows == rows) | ~mask
    assert same.float().mean() > 0.99

    def scores(r: torch.Tensor) -> torch.Tensor:
        return (h.unsqueeze(1) * retriever.stored_h(r.clamp(min=0).numpy().reshape(-1), "cpu").view(*r.shape, -1)).sum(-1)

    torch.testing.assert_close(scores(pre_rows)[mask], scores(rows)[mask], atol=1e-4, rtol=1e-4)


def test_typed_config_docstrings_are_the_cli_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "raserec.finetune.module.RAFTModule"])
    out = capsys.readouterr().out
    assert "--model.bank.k K" in out and "Memories retrieved per query (K)" in out
    assert "--model.ram.alpha ALPHA" in out and "Weight of h in h~" in out


class MeanMemory(FrozenEncoderMixin, RecommenderModule):
    """A new augmentation method composed from the component: h~ = h + g * mean(v_k), g learned."""

    def __init__(self, encoder_checkpoint: str, k: int = 4) -> None:
        super().__init__(metric_ks=(5, 10))
        self.encoder, self.encoder_data = load_frozen_encoder(encoder_checkpoint, None)
        self.retriever = MemoryRetriever(self.encoder, BankConfig(k=k, index="flat"), self.encoder.item_embedding)
        self.gate = torch.nn.Parameter(torch.tensor(0.0))

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.encoder]

    def configure_callbacks(self) -> list:
        return [MemoryBankCallback(self.retriever, progress=False)]

    def user_representation(self, batch):
        h = self.retriever.encode(batch["input_ids"])
        _, v_k, mask = self.retriever.memories(h, batch["user"], batch["end"])
        mean = (v_k * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return h + self.gate * mean

    def item_weights(self):
        return self.encoder.item_weights()

    def training_step(self, batch, batch_idx):
        return next_item_loss(self.user_representation(batch), self.item_weights(), batch["target"])

    def configure_optimizers(self):
        return torch.optim.Adam([self.gate], lr=0.05)


def test_a_new_augmentation_method_is_a_few_lines_on_the_component(tmp_path) -> None:
    dm = synthetic_dm(batch_size=128, eval_batch_size=256)
    dm.setup("fit")
    ckpt = save_encoder(tiny_encoder(dm.num_items), tmp_path / "enc.pt",
                        {"num_items": dm.num_items, "content_hash": dm.data.content_hash()})
    module = MeanMemory(str(ckpt))
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    assert module.gate.item() != 0.0 and not module.encoder.training
    assert len(module.retriever.bank) == len(dm.pairs("train"))
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    # the test bank adds the validation pairs (the dynamic bank), exactly as for RAFT
    assert len(module.retriever.bank) == len(dm.pairs("train")) + len(dm.pairs("val"))
    assert 0.0 <= metrics["test/NDCG@10"] <= metrics["test/HR@10"] <= 1.0
    assert [stage for stage, _, what in module.retriever.history] == ["fit", "test"]
