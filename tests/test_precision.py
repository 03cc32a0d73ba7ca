"""Mixed precision (``trainer.precision: bf16-mixed``): training may run bf16 products, ranking
never does."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from raserec.cli import main
from raserec.pretrain.module import PretrainModule
from tests.test_memory_bank import synthetic_dm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _trainer(precision: str) -> L.Trainer:
    return L.Trainer(precision=precision, max_epochs=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def test_bf16_training_evaluates_in_float32() -> None:
    dm = synthetic_dm(batch_size=64)
    dm.setup("fit")
    L.seed_everything(0)
    module = PretrainModule(dm.num_items, lambda_ret=0.1)
    _trainer("bf16-mixed").fit(module, datamodule=dm)
    bf16 = _trainer("bf16-mixed").validate(module, datamodule=dm, verbose=False)[0]
    fp32 = _trainer("32-true").validate(module, datamodule=dm, verbose=False)[0]
    assert bf16 == fp32 and fp32["val/NDCG@10"] > 0
    # autocast really lowers the scoring product when nothing opts out: the decorator matters
    batch = dm.dataset("val").__getitems__(list(range(32)))
    module.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert module.scores(batch).dtype == torch.bfloat16
    with torch.no_grad():
        assert module.scores(batch).dtype == torch.float32


def test_bf16_training_loss_is_close_to_float32() -> None:
    dm = synthetic_dm(batch_size=64)
    dm.setup("fit")
    torch.manual_seed(0)
    module = PretrainModule(dm.num_items, lambda_ret=0.1).train()
    module.log_dict = lambda *a, **k: None  # no trainer attached
    batch = dm.add_positives(dm.dataset("train").__getitems__(list(range(64))), 0)
    torch.manual_seed(1)
    fp32 = float(module.training_step(batch, 0))
    torch.manual_seed(1)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = float(module.training_step(batch, 0))
    assert bf16 == pytest.approx(fp32, rel=2e-2) and bf16 != fp32


def test_bf16_overlay_sets_the_trainer_precision(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "beauty_pretrain.yaml"), "--config", str(CONFIGS / "bf16.yaml"),
              "--print_config"])
    assert exit_info.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["precision"] == "bf16-mixed" and "bf16" in cfg["results"]["notes"]
    assert cfg["model"]["init_args"]["lambda_ret"] == 0.1  # the stage's own settings are kept
