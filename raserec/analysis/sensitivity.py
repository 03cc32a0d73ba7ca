"""Sensitivity (RQ4): HR/NDCG as alpha, beta or K vary.

``retrain`` (the paper's protocol) fine-tunes a fresh RAM for every value on the same frozen
encoder and memory bank; ``eval`` reuses the trained RAM and only changes the value at test time
(alpha and K only: a RAM trained with beta = 1 has no second channel to weigh).

``split="val"`` measures on the validation queries (with the training-time bank, as during
fine-tuning): that is where values may be chosen; the test split only reports them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import polars as pl

from raserec.analysis.common import METRICS, Evaluator, figure, metrics_from_ranks
from raserec.errors import RaserecError

Param = Literal["alpha", "beta", "k"]
Split = Literal["val", "test"]

#: The paper's grids (appendix F): alpha and beta 0.0..1.0 step 0.1, K 5..55 step 5.
GRIDS: dict[str, list[float]] = {
    "alpha": [round(0.1 * i, 1) for i in range(11)],
    "beta": [round(0.1 * i, 1) for i in range(11)],
    "k": [float(k) for k in range(5, 60, 5)],
}


def _value(param: Param, value: float) -> float | int:
    return int(value) if param == "k" else float(value)


def _split_ranks(ev: Evaluator, split: Split):
    """The ranks of ``split``'s queries with augmentation, each split with the bank it is
    evaluated with during training (validation: training pairs; test: + validation pairs)."""
    bank = ev.fit_bank() if split == "val" else ev.test_bank()
    return ev.ranks(ev.dm.dataset(split), augmented=True, bank=bank)


def _eval_value(ev: Evaluator, param: Param, value: float, split: Split = "test") -> dict[str, float]:
    module = ev.module
    saved = (module.retriever.k, module.ram.alpha, module.ram.beta)
    try:
        if param == "k":
            module.retriever.k = int(value)
        elif param == "alpha":
            if not 0.0 <= value <= 1.0:
                raise RaserecError(f"alpha must lie in [0, 1], got {value}")
            module.ram.alpha = float(value)
        else:
            if module.ram.channel1 is None or module.ram.channel2 is None:
                raise RaserecError("beta cannot vary at test time: this RAM was trained with beta = "
                                   f"{module.ram.beta:g} and has only one channel; use --mode retrain")
            module.ram.beta = float(value)
        return metrics_from_ranks(_split_ranks(ev, split), (5, 10))
    finally:
        module.retriever.k, module.ram.alpha, module.ram.beta = saved


def _retrain_value(ev: Evaluator, checkpoint: str, param: Param, value: float, epochs: int,
                   limit_train_batches: float | int, seed: int, split: Split = "test") -> dict[str, float]:
    from raserec.finetune.module import RAFTModule

    hp = {k: v for k, v in ev.module.hparams.items() if not k.startswith("_")}
    section = "bank" if param == "k" else "ram"  # K is a bank setting, alpha and beta RAM settings
    hp.update({"encoder_checkpoint": str(checkpoint), section: {**hp[section], param: _value(param, value)}})
    L.seed_everything(seed, verbose=False)
    module = RAFTModule(**hp)
    module.retriever.bank = ev.fit_bank()  # same frozen encoder and reference set: the callback keeps it
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, limit_train_batches=limit_train_batches,
                        enable_progress_bar=ev.progress, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=ev.dm)
    module.eval()
    trained = Evaluator(module, ev.dm, progress=ev.progress, test_memory=ev.test_bank())
    trained._fit_bank = ev.fit_bank()
    return metrics_from_ranks(_split_ranks(trained, split), (5, 10))


def sensitivity(ev: Evaluator, checkpoint: str, params: Sequence[Param] = ("alpha", "beta", "k"),
                values: dict[str, Sequence[float]] | None = None, mode: Literal["eval", "retrain"] = "retrain",
                epochs: int = 1, limit_train_batches: float | int = 1.0, seed: int = 2024,
                split: Split = "test") -> tuple[pl.DataFrame, object]:
    """HR/NDCG@5,10 on ``split`` for every value of each parameter in ``params`` (the paper's
    grids unless ``values`` gives others); returns the table and its figure."""
    rows = []
    for param in params:
        grid = (values or {}).get(param) or GRIDS[param]
        for value in grid:
            if mode == "eval":
                m = _eval_value(ev, param, value, split)
            else:
                m = _retrain_value(ev, checkpoint, param, value, epochs, limit_train_batches, seed, split)
            rows.append({"param": param, "value": float(value), "mode": mode, "split": split,
                         **{k: m[k] for k in METRICS}})
    table = pl.DataFrame(rows)
    fig, axes = figure(len(params), width=4.5)
    for ax, param in zip(axes, params, strict=True):
        sub = table.filter(pl.col("param") == param)
        for metric in ("HR@5", "NDCG@5"):
            ax.plot(sub["value"].to_numpy(), sub[metric].to_numpy(), "o-", label=metric)
        ax.set_xlabel("K" if param == "k" else param)
        ax.set_title(f"{'K' if param == 'k' else param} ({mode}, {split})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return table, fig


__all__ = ["sensitivity", "GRIDS"]
