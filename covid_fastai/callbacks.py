"""fastai callbacks: speed on CPUs with bf16 units (AVX512-BF16/AMX), throughput, and a one-class warning."""
from __future__ import annotations

import time

import torch
from fastai.callback.core import Callback, GatherPredsCallback
from fastai.torch_core import to_float

__all__ = ["BF16Autocast", "ChannelsLast", "TrainThroughput", "bf16_supported", "FitOnlyCallback", "OneClassWarning",
           "one_class_message"]


def bf16_supported(device_type: str = "cpu") -> bool:
    "Whether bf16 autocast is worth using: native bf16 matrix units on the CPU, or a CUDA device with bf16."
    if device_type == "cuda": return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try: return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError): return False


class BF16Autocast(Callback):
    "Run the forward pass under bf16 autocast (no grad scaler needed for bf16); loss computed in fp32."
    order = 10

    def before_fit(self):
        self.device_type = "cuda" if next(self.model.parameters()).is_cuda else "cpu"

    def before_batch(self):
        self.autocast = torch.autocast(self.device_type, dtype=torch.bfloat16)
        self.autocast.__enter__()

    def after_pred(self):
        self.autocast.__exit__(None, None, None)
        self.learn.pred = to_float(self.pred)

    def after_cancel_batch(self):  # leave no autocast context open when a batch is skipped or interrupted
        if getattr(self, "autocast", None) is not None and torch.is_autocast_enabled(self.device_type):
            self.autocast.__exit__(None, None, None)


class ChannelsLast(Callback):
    "Keep the model and each input batch in channels-last memory format (what oneDNN's conv kernels want)."
    order = 9

    def before_fit(self): self.learn.model.to(memory_format=torch.channels_last)

    def before_batch(self):
        xb = self.learn.xb
        if xb and xb[0].ndim == 4:
            self.learn.xb = (xb[0].contiguous(memory_format=torch.channels_last),) + tuple(xb[1:])


class FitOnlyCallback(Callback):
    """A callback that acts during `fit` only.

    fastai's `get_preds` fires before_fit/after_epoch too (with `GatherPredsCallback` added); logging and
    timing callbacks must not reset or record there.
    """
    def __call__(self, event_name):
        if any(isinstance(c, GatherPredsCallback) for c in self.learn.cbs): return
        return super().__call__(event_name)


class TrainThroughput(FitOnlyCallback):
    "Seconds and images of the training phase of each epoch (validation excluded), for images/s."
    order = 100

    def before_fit(self): self.epoch_times, self.epoch_images = [], []

    def before_train(self): self.t0, self.n = time.perf_counter(), 0

    def after_batch(self):
        if self.training: self.n += len(self.learn.yb[0])

    def after_train(self):
        self.epoch_times.append(time.perf_counter() - self.t0)
        self.epoch_images.append(self.n)

    @property
    def seconds(self) -> float: return sum(self.epoch_times)

    @property
    def images_per_s(self) -> float: return sum(self.epoch_images) / max(self.seconds, 1e-9)


def one_class_message(epoch: int, predicted, true, vocab) -> str | None:
    """The warning for an epoch whose validation predictions (argmax class counts `predicted`) all fell in one class
    although the targets (`true`, counts) hold more than one; None when nothing is wrong."""
    if sum(1 for n in predicted if n) != 1 or sum(1 for n in true if n) < 2: return None
    c = next(i for i, n in enumerate(predicted) if n)
    return (f"epoch {epoch}: every validation image was predicted '{vocab[c]}'. The fit may have diverged (a rate "
            f"too high for the layers that train: try a lower --lr, or --lr_mult 100) or may not have started")


class OneClassWarning(FitOnlyCallback):
    """Say so when a validation pass predicts one class for every image: a diverged fit (e.g. VGG-16 with one
    AdamW rate of 1e-3 for 8 convs, docs/experiments.md) otherwise shows only as a flat accuracy in the log.
    `vocab`: the class names (a head-only Learner on cached features has no vocab of its own). `warn(message)`
    receives each warning (the run records it in config.json); by default it is printed beside the epoch lines."""
    order = 95

    def __init__(self, vocab, warn=None): self.vocab, self.warn = list(vocab), warn

    def before_validate(self):  # argmax and target counts per class over the validation pass
        self.predicted, self.true = (torch.zeros(len(self.vocab), dtype=torch.long) for _ in range(2))

    def after_batch(self):
        if self.training: return
        n = len(self.vocab)
        self.predicted += torch.bincount(self.pred.argmax(1).cpu(), minlength=n)
        self.true += torch.bincount(self.learn.yb[0].view(-1).long().cpu(), minlength=n)

    def after_validate(self):
        msg = one_class_message(self.epoch, self.predicted.tolist(), self.true.tolist(), self.vocab)
        if msg is None: return
        if self.warn is None: print(f"warning: {msg}", flush=True)
        else: self.warn(msg)
