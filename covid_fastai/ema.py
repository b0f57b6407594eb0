"""EMA of weights: timm's `ModelEmaV3` as a fastai callback; the average is what validation scores and what a run
keeps after the fit (`Recipe.ema`).

The decay warms up as timm's `use_warmup` does (1 - (1 + step)^-3/4, capped at the recipe's `ema`), so a short
fine-tune of a few hundred steps averages its recent weights instead of staying near the initial ones (a fixed
0.999 over 250 steps would keep 78% of the start).
"""
from __future__ import annotations

from fastai.callback.schedule import LRFinder
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from .callbacks import FitOnlyCallback

__all__ = ["WeightsEMA", "ema_callbacks"]


def _unwrapped(model: nn.Module) -> nn.Module:
    "The model inside a (Distributed)DataParallel wrapper (fastai's DistributedTrainer adds one in before_fit)."
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class WeightsEMA(FitOnlyCallback):
    """Keep `ModelEmaV3(model, decay)` updated after every optimiser step; validate with the averaged weights, and
    load them into the model when the fit ends. Its state goes into a run's checkpoint (`state_dict`), so a resumed
    run continues the same average. Inactive under lr_find (its trial weights are thrown away)."""
    order = 20  # before_fit after ChannelsLast (9): the copy keeps the model's memory format

    def __init__(self, decay: float = 0.999,
                 warmup_power: float = 3 / 4):  # timm's advice for runs of under ~10k steps
        self.decay, self.warmup_power, self.ema, self.step, self._resume = decay, warmup_power, None, 0, None

    def before_fit(self):
        self.active = not any(isinstance(c, LRFinder) for c in self.learn.cbs)
        if not self.active: return
        self.ema = ModelEmaV3(_unwrapped(self.learn.model), decay=self.decay, use_warmup=True,
                              warmup_power=self.warmup_power)
        self.step = 0
        if self._resume is not None:
            self.ema.module.load_state_dict(self._resume["module"])
            self.step, self._resume = int(self._resume["step"]), None

    def after_step(self):
        if not self.active: return
        self.step += 1
        self.ema.update(_unwrapped(self.learn.model), step=self.step)

    def before_validate(self):  # swap the average in: what the epoch's valid loss and metrics score
        if not self.active: return
        self.trained = self.learn.model
        self.learn.model = self.ema.module.eval()

    def after_validate(self):
        if self.active and getattr(self, "trained", None) is not None:
            self.learn.model, self.trained = self.trained, None

    def after_fit(self):
        if self.active: _unwrapped(self.learn.model).load_state_dict(self.ema.module.state_dict())

    def state_dict(self) -> dict:
        "What a checkpoint keeps: the averaged weights and the step count (the decay's warmup)."
        return {"module": self.ema.module.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict):
        "Continue the average in `state` (from `state_dict`) at the next fit."
        self._resume = state


def ema_callbacks(decay: float | None) -> list:
    "[WeightsEMA(decay)], or [] when `decay` is None (a recipe's `ema` off)."
    return [] if decay is None else [WeightsEMA(decay)]
