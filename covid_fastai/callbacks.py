"""fastai callbacks: speed on CPUs with bf16 units (AVX512-BF16/AMX), throughput, the epoch log, a one-class warning."""
from __future__ import annotations

import os
import time

import torch
from fastai.callback.core import Callback, GatherPredsCallback
from fastai.callback.progress import CSVLogger
from fastai.torch_core import to_float

__all__ = ["BF16Autocast", "ChannelsLast", "ProgressiveResize", "parse_progressive", "cpu_kind", "fp32_cpu",
           "TrainThroughput", "bf16_supported", "FitOnlyCallback", "Thaw", "OneClassWarning",
           "one_class_message", "HistoryCSV", "plain_epoch_log"]


def bf16_supported(device_type: str = "cpu") -> bool:
    "Whether bf16 autocast is worth using: native bf16 matrix units on the CPU, or a CUDA device with bf16."
    if device_type == "cuda": return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try: return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError): return False


def fp32_cpu() -> bool:
    "Whether training here runs on a CPU without bf16 units (no CUDA device; AVX2-only, or AVX-512 without bf16)."
    return not torch.cuda.is_available() and not bf16_supported("cpu")


def cpu_kind() -> str:
    """The CPU as torch and oneDNN see it (environment limits such as ONEDNN_MAX_CPU_ISA included): 'amx-bf16',
    'avx512-bf16', 'avx512', 'avx2' or torch's capability name in lower case. Speed defaults depend on it."""
    cap = torch.backends.cpu.get_cpu_capability().lower()  # 'avx2', 'avx512', 'default', ...
    if not bf16_supported("cpu"): return cap
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "amx-bf16" if amx else "avx512-bf16"


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


def parse_progressive(spec: str) -> list[tuple[int, int]]:
    "'128:2,160:2' -> [(128, 2), (160, 2)]: the first 2 epochs at 128 px, the next 2 at 160, then the recipe's size."
    from .errors import RecipeError
    out = []
    for part in filter(None, (p.strip() for p in str(spec or "").split(","))):
        try: size, n = (int(v) for v in part.split(":"))
        except ValueError: size = n = 0
        if size < 8 or n < 1:
            raise RecipeError(f"bad progressive resizing step {part!r} in {spec!r}",
                              "give SIZE:EPOCHS pairs, e.g. --progressive 128:2,160:2 (or '' for none)")
        out.append((size, n))
    return out


class ProgressiveResize(Callback):
    """fastai's progressive resizing: training batches of the first epochs are downscaled (bilinear, antialiased)
    to smaller sizes, e.g. [(128, 2), (160, 2)]; later epochs and every validation/prediction pass run at full size.
    Resizing the batch (not the loader) keeps the data pipeline, its augmentation draws and its cache unchanged."""
    order = 8  # before ChannelsLast, which then lays out the resized batch

    def __init__(self, steps: list[tuple[int, int]]): self.steps = list(steps)

    def size_at(self, epoch: int) -> int | None:
        "The training size at `epoch`, None for full size."
        for size, n in self.steps:
            if epoch < n: return size
            epoch -= n
        return None

    def before_batch(self):
        if not self.training or not self.learn.xb or self.learn.xb[0].ndim != 4: return
        size, x = self.size_at(self.epoch), self.learn.xb[0]
        if size is None or size >= min(x.shape[-2:]): return
        h, w = x.shape[-2:]
        shape = (size, round(w * size / h)) if h <= w else (round(h * size / w), size)  # short side -> size
        x = torch.nn.functional.interpolate(x, size=shape, mode="bilinear", antialias=True, align_corners=False)
        self.learn.xb = (x,) + tuple(self.learn.xb[1:])


class FitOnlyCallback(Callback):
    """A callback that acts during `fit` only.

    fastai's `get_preds` fires before_fit/after_epoch too (with `GatherPredsCallback` added); logging and
    timing callbacks must not reset or record there.
    """
    def __call__(self, event_name):
        if any(isinstance(c, GatherPredsCallback) for c in self.learn.cbs): return
        return super().__call__(event_name)


class Thaw(FitOnlyCallback):
    """fastai's `unfreeze` before epoch `epoch` of a fit (a plan's `freeze_epochs`, covid_fastai.plans): every
    parameter trains from then on, at the rate the fit's schedule has reached. A fit resumed at a later epoch
    unfreezes at its first. BatchNorm layers leave `BnFreeze`'s eval mode with their parameters (its before_train
    follows this before_epoch). A fit of no more than `epoch` epochs never unfreezes (a recipe's run refuses that:
    learner.check_plan_epochs)."""
    order = 5

    def __init__(self, epoch: int): self.thaw_epoch = int(epoch)

    def before_epoch(self):
        if self.epoch >= self.thaw_epoch: self.learn.unfreeze()


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


class HistoryCSV(FitOnlyCallback, CSVLogger):
    """fastai's `CSVLogger` for history.csv, one row per epoch as it finishes: losses and metrics (train and valid)
    without fastai's formatted `time`, then `train_seconds` (the training phase, from `TrainThroughput`) and
    `epoch_seconds` (the whole epoch). `start_epoch` > 0: resuming, the earlier epochs' rows are kept."""
    order = 61  # after ProgressCallback (60), so each restores the logger it replaced in the right order

    def __init__(self, fname, start_epoch: int = 0):
        super().__init__(fname)
        self.start_epoch = start_epoch

    def before_fit(self):
        f = self.path / self.fname
        kept = f.read_text().splitlines(keepends=True)[1:self.start_epoch + 1] if self.start_epoch else []
        self.cols = [n for n in self.recorder.metric_names if n != "time"]
        self.file = f.open("w")
        self.file.write(",".join(self.cols + ["train_seconds", "epoch_seconds"]) + "\n" + "".join(kept))
        self.file.flush()
        self.old_logger, self.learn.logger = self.logger, self._write_line
        self.t0 = time.perf_counter()

    def _write_line(self, log):
        if self.epoch >= self.start_epoch:  # not an epoch fastai's SkipToEpoch skipped on resume
            vals = dict(zip(self.recorder.metric_names, log))
            tp = getattr(self.learn, "train_throughput", None)
            train_s = tp.epoch_times[-1] if tp and tp.epoch_times else float("nan")
            now = time.perf_counter()
            row = [vals.get(c, "") for c in self.cols] + [f"{train_s:.3f}", f"{now - self.t0:.3f}"]
            self.t0 = now
            self.file.write(",".join(str(v) for v in row) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())
        self.old_logger(log)  # the recorder's own line for the next logger (progress bar or plain epoch line)

    def after_fit(self):
        self.file.close()
        if self.learn.logger == self._write_line: self.learn.logger = self.old_logger


def plain_epoch_log(learn, start_epoch: int = 0):
    "A logger printing one plain line per epoch (for logs and pipes, where fastprogress's redrawn bars are noise)."
    def log(vals):
        if vals and isinstance(vals[0], int) and vals[0] < start_epoch: return  # skipped on resume
        pairs = zip(learn.recorder.metric_names, vals)
        print("  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in pairs), flush=True)
    return log
