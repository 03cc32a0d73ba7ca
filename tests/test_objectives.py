"""Pre-training objectives as injected objects."""

from __future__ import annotations

import pytest
import torch

from raserec.errors import ConfigError
from raserec.pretrain.module import PretrainModule
from raserec.pretrain.objectives import (
    Cloze,
    NextItemCE,
    Objective,
    SameTargetInfoNCE,
    SampledBCE,
    objective_from_record,
)
from tests.test_memory_bank import synthetic_dm


def test_flat_settings_describe_the_default_objectives() -> None:
    def objs(**kw):
        return PretrainModule(50, **kw).objectives

    assert objs() == [NextItemCE(), SameTargetInfoNCE(0.1, dropout_view=True)]
    assert objs(positive_pair="same_target", lambda_ret=0.3) == [NextItemCE(), SameTargetInfoNCE(0.3, dropout_view=False)]
    assert objs(positive_pair="none") == [NextItemCE()] and objs(lambda_ret=0.0) == [NextItemCE()]
    assert not PretrainModule(50, positive_pair="none").uses_positives and PretrainModule(50).uses_positives


def test_records_round_trip_and_only_our_classes_load() -> None:
    obj = SameTargetInfoNCE(0.2, temperature=0.5, similarity="cos", dropout_view=False)
    assert objective_from_record(obj.record()) == obj
    assert PretrainModule(50, objectives=[obj.record(), NextItemCE().record()]).objectives == [obj, NextItemCE()]
    with pytest.raises(ConfigError, match="is not in one of .*raserec.pretrain.objectives"):
        objective_from_record({"class_path": "os.system", "init_args": {}})
    with pytest.raises(ConfigError, match="is not an objective class"):
        objective_from_record({"class_path": "raserec.semantic.sracl.substitute", "init_args": {}})
    with pytest.raises(ConfigError, match="share a log name"):
        PretrainModule(50, objectives=[NextItemCE(), Cloze()])
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        SameTargetInfoNCE(temperature=0)


class EmbeddingNorm(Objective):
    """A new objective is a class: keep the user representations small."""

    name = "loss_norm"

    def views(self, batch):
        return {"sequence": batch["input_ids"]}

    def loss(self, encoder, batch, reprs):
        return reprs["sequence"].pow(2).sum(1).mean()


def test_an_injected_objective_shares_the_view_pass_and_is_weighted() -> None:
    dm = synthetic_dm(batch_size=32)
    dm.setup("fit")
    batch = dm.dataset("train").__getitems__(list(range(32)))
    torch.manual_seed(0)
    module = PretrainModule(dm.num_items, objectives=[NextItemCE(), EmbeddingNorm(weight=0.5)]).eval()
    module.log_dict = lambda *a, **k: None
    calls = []
    module.encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    loss = module.training_step(batch, 0)
    assert calls == [32]  # both objectives read "sequence": one pass of 32 rows, not 64
    h = module.encoder(batch["input_ids"])
    expected = NextItemCE().loss(module.encoder, batch, {"sequence": h}) + 0.5 * h.pow(2).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not module.uses_positives


def test_us_x_views_of_one_batch_get_independent_dropout_in_the_training_step(monkeypatch) -> None:
    """PITFALLS 13 at module level: the us_x anchor (a second dropout pass of the sequence) must
    differ from the sequence view that L_rec reads, although both come from the same input ids,
    and the batch's ids must come out of the step untouched."""
    import raserec.pretrain.objectives as objectives

    dm = synthetic_dm(batch_size=32)
    dm.setup("fit")
    batch = dm.dataset("train").__getitems__(list(range(32)))
    dm.add_positives(batch, 0)
    ids = batch["input_ids"].clone()
    torch.manual_seed(0)
    module = PretrainModule(dm.num_items, positive_pair="dropout_and_same_target", lambda_ret=0.1).train()
    module.log_dict = lambda *a, **k: None
    seen = {}
    monkeypatch.setattr(objectives, "next_item_loss",
                        lambda h, w, t: seen.setdefault("sequence", h.detach()).sum() * 0)
    monkeypatch.setattr(objectives, "info_nce",
                        lambda a, p, *args: seen.setdefault("anchor", a.detach()).sum() * 0)
    module.training_step(batch, 0)
    keep = batch["has_positive"]
    assert keep.sum() > 0 and torch.equal(batch["input_ids"], ids)
    gap = (seen["sequence"][keep] - seen["anchor"]).abs().amax(1)
    assert (gap > 1e-3).all()  # every row: two dropout masks, two different representations
    module.eval()
    seen.clear()
    module.training_step(batch, 0)
    assert torch.allclose(seen["sequence"][keep], seen["anchor"], atol=1e-6)  # same math without dropout


def test_sampled_bce_scores_the_target_against_negatives_outside_the_sequence(monkeypatch) -> None:
    """The Ada-Retrieval authors' base objective: BCE over the target (label 1) and n uniform
    negatives that are never an item of the input sequence nor the target (label 0)."""
    import raserec.pretrain.objectives as objectives

    dm = synthetic_dm(batch_size=64)
    dm.setup("fit")
    batch = dm.dataset("train").__getitems__(list(range(64)))
    torch.manual_seed(0)
    module = PretrainModule(dm.num_items, objectives=[SampledBCE(num_negatives=7)]).eval()
    module.log_dict = lambda *a, **k: None
    drawn = {}
    real = objectives.sample_negatives
    monkeypatch.setattr(objectives, "sample_negatives", lambda *a: drawn.setdefault("neg", real(*a)))
    loss = module.training_step(batch, 0)
    neg, ids, target = drawn["neg"], batch["input_ids"], batch["target"]
    assert neg.shape == (64, 7) and neg.min() >= 1 and neg.max() <= dm.num_items
    assert not (neg.unsqueeze(2) == ids.unsqueeze(1)).any() and not (neg == target[:, None]).any()
    # by hand: -mean(log sigma(s_target)) over 1 column and -mean(log(1 - sigma(s_neg))) over 7
    h, table = module.encoder(ids), module.encoder.item_embedding.weight
    pos, negs = (h * table[target]).sum(1), torch.einsum("bd,bnd->bn", h, table[neg])
    by_hand = -(torch.nn.functional.logsigmoid(pos).sum() + torch.nn.functional.logsigmoid(-negs).sum()) / (64 * 8)
    assert torch.allclose(loss, by_hand, atol=1e-5)
    assert objective_from_record(SampledBCE(0.5, 100).record()) == SampledBCE(0.5, 100)
    with pytest.raises(ConfigError, match="num_negatives must be >= 1"):
        SampledBCE(num_negatives=0)
