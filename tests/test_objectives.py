"""Pre-training objectives as injected objects."""

from __future__ import annotations

import pytest
import torch

from raserec.errors import ConfigError
from raserec.pretrain.module import PretrainModule
from raserec.pretrain.objectives import Cloze, NextItemCE, Objective, SameTargetInfoNCE, objective_from_record
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
