"""Epoch checkpoints: what `resume` needs to continue a run exactly, saved after every finished epoch.

`checkpoint.pt` holds the model, optimiser, RNG states (python, numpy, torch, CUDA: fastai's
`get_random_states`, plus the loaders' shuffling RNGs), the recorder's smoothed loss and the epoch timings; plain
tensors and numbers, loaded with `weights_only=True`. It also records digests of the images and their targets, so
a resume refuses data that changed since the run started. Loader workers: 0, the default on small machines;
persistent worker processes keep RNG state a checkpoint cannot see.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fastai.torch_core import default_device, get_random_states, set_random_states, to_device

from .callbacks import FitOnlyCallback
from .errors import RunFolderError, recipe_command
from .files import atomic_path

__all__ = ["EpochCheckpoint", "rng_states", "set_rng_states", "data_digest", "load_checkpoint", "restore_fit_state"]


def _plain(o):
    "Numpy scalars/arrays and fastai `L`s -> Python numbers/lists/tensors: loadable with `weights_only=True`."
    from fastcore.foundation import L
    if isinstance(o, torch.Tensor): return o.detach().cpu().as_subclass(torch.Tensor)  # no fastai subclasses
    if isinstance(o, dict): return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, L)): return [_plain(v) for v in o]
    if isinstance(o, np.ndarray): return torch.from_numpy(o.copy())
    if isinstance(o, np.generic): return o.item()
    return o


def _tuples(o):
    "random.setstate wants the nested tuples getstate gave (a saved state comes back with lists)."
    return tuple(_tuples(v) for v in o) if isinstance(o, (list, tuple)) else o


# checkpoints written before fastai's names were used
_OLD_NAMES = {"python": "random_state", "numpy": "numpy_state", "torch": "torch_state", "cuda": "torch_cuda_state"}


def rng_states(learn) -> dict:
    "fastai's `get_random_states` (python, numpy, torch, CUDA) and the loaders' own shuffling RNGs, as plain values."
    st = get_random_states()
    kind, keys, *rest = st["numpy_state"]
    st["numpy_state"] = [kind, torch.from_numpy(keys.astype(np.int64)), *rest]  # torch has no uint32 to save
    # fastai's DataLoader shuffles with its own random.Random, reseeded from itself every epoch
    return {**st, "dl_train": _loader(learn.dls.train).rng.getstate(), "dl_valid": _loader(learn.dls.valid).rng.getstate()}


def set_rng_states(learn, st: dict):
    "Restore what `rng_states` saved."
    st = {_OLD_NAMES.get(k, k): v for k, v in st.items()}
    kind, keys, *rest = st["numpy_state"]
    set_random_states(
        random_state=_tuples(st["random_state"]), numpy_state=(kind, keys.numpy().astype(np.uint32), *rest),
        torch_state=st["torch_state"],
        torch_cuda_state=st["torch_cuda_state"] if torch.cuda.is_available() else [],  # saved on a GPU, resumed on CPU
        torch_deterministic=st.get("torch_deterministic", torch.backends.cudnn.deterministic),
        torch_benchmark=st.get("torch_benchmark", torch.backends.cudnn.benchmark))
    _loader(learn.dls.train).rng.setstate(_tuples(st["dl_train"]))
    _loader(learn.dls.valid).rng.setstate(_tuples(st["dl_valid"]))


def _loader(dl):
    "The loader that shuffles: in a data-parallel fit fastai's DistributedDL wraps it (rank 0's order is shared)."
    return dl.dl if any(c.__name__ == "DistributedDL" for c in type(dl).__mro__) else dl


def _unwrapped(model):
    "The model itself, not its DistributedDataParallel wrapper (whose state_dict keys start with 'module.')."
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def data_digest(learn) -> str:
    "sha256 over the bytes of the train and valid images: a resume must see the same images."
    from .features import _files_digest
    items = [i for i in list(learn.dls.train.items) + list(learn.dls.valid.items) if isinstance(i, (str, Path))]
    return _files_digest(items)


def _targets_digest(learn) -> str:
    from .features import targets_digest
    return targets_digest(learn.dls)


class EpochCheckpoint(FitOnlyCallback):
    """After every finished epoch, write `fname` atomically: what `resume` needs to continue exactly.

    Also restores such a state at the start of epoch `start_epoch` (`state`: a loaded checkpoint), so the
    resumed epochs draw the same shuffles, augmentations and dropout masks as an uninterrupted run.
    """
    order = 90  # after Recorder (50) and HistoryCSV (61) have recorded the epoch

    def __init__(self, fname, data_digest: str, state: dict | None = None, targets_digest: str | None = None):
        # fname None: restore only, write nothing (the other processes of a data-parallel run)
        self.fname = Path(fname) if fname is not None else None
        self.digest, self.targets, self.state = data_digest, targets_digest, state
        self.start_epoch = state["epoch"] + 1 if state else 0

    @classmethod
    def of(cls, learn, fname, state: dict | None = None):
        """The checkpoint callback for `learn`'s data. Resuming, `state` was loaded by `load_checkpoint`, which
        checked its digests against the data: they are reused rather than every image hashed again."""
        data = state["data_digest"] if state else data_digest(learn)
        targets = state.get("targets_digest") if state else None
        return cls(fname, data, state, targets if targets is not None else _targets_digest(learn))

    def before_epoch(self):
        if self.state is not None and self.epoch == self.start_epoch: self._restore()

    def after_fit(self):
        # interrupted after the last epoch's checkpoint (during evaluation): no epoch runs on resume, so restore
        # here, before the TTA and plots that follow the fit
        if self.state is not None and self.start_epoch >= self.n_epoch: self._restore()

    def _restore(self):
        set_rng_states(self.learn, self.state["rng"])
        sl = self.recorder.smooth_loss  # fastai's train_loss is smoothed across epochs
        sl.count, sl.val = self.state["smooth_loss"]["count"], self.state["smooth_loss"]["val"]
        tp = getattr(self.learn, "train_throughput", None)
        if tp is not None:
            tp.epoch_times, tp.epoch_images = list(self.state["throughput"][0]), list(self.state["throughput"][1])

    def after_epoch(self):
        if self.epoch < self.start_epoch or self.fname is None: return  # skipped by fastai's SkipToEpoch on resume
        tp = getattr(self.learn, "train_throughput", None)
        sl = self.recorder.smooth_loss
        ckpt = {"epoch": self.epoch, "n_epoch": self.n_epoch, "data_digest": self.digest,
                "targets_digest": self.targets,
                "model": _unwrapped(self.learn.model).state_dict(), "opt": self.learn.opt.state_dict(),
                "rng": rng_states(self.learn), "smooth_loss": {"count": sl.count, "val": sl.val},
                "throughput": [list(tp.epoch_times), list(tp.epoch_images)] if tp else [[], []]}
        ema = getattr(self.learn, "weights_ema", None)  # covid_fastai.ema: the average goes on with the run
        if ema is not None and ema.ema is not None: ckpt["ema"] = ema.state_dict()
        with atomic_path(self.fname) as tmp:  # a kill mid-write leaves the previous epoch's checkpoint intact
            torch.save(_plain(ckpt), tmp)


def load_checkpoint(run_dir, learn, recipe_name: str, data_root) -> dict:
    """The checkpoint of `run_dir`, checked against `learn`'s images and targets; RunFolderError when it cannot be
    read or the data changed since the run started (resuming would not continue the same run)."""
    from .rundir import CHECKPOINT, one_line
    run_dir = Path(run_dir)
    f = run_dir / CHECKPOINT
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torn by a crash mid-write before atomic saves, or not ours
        raise RunFolderError(f"{f} cannot be read ({one_line(e, 200)})",
                             "this run cannot be resumed; start it again with {command}", path=f,
                             command=recipe_command(recipe_name)) from None
    new_one = "resuming would not continue the same run; start a new one instead"
    if state["data_digest"] != data_digest(learn):
        raise RunFolderError(f"the images under {data_root} changed since {run_dir} started (files added, removed "
                             f"or modified)", new_one, path=run_dir)
    saved = state.get("targets_digest")  # None in checkpoints from before labels were checked
    if saved is not None and saved != _targets_digest(learn):
        raise RunFolderError(f"the labels of the images under {data_root} changed since {run_dir} started "
                             f"(labels.csv or the class folders)", new_one, path=run_dir)
    return state


def restore_fit_state(trainer, state: dict):
    "Load a checkpoint's model and optimiser state into the Learner that fits (the optimiser on the model's device)."
    from fastcore.foundation import L
    trainer.model.load_state_dict(state["model"])
    if "ema" in state and getattr(trainer, "weights_ema", None) is not None:
        trainer.weights_ema.load_state_dict(state["ema"])
    if trainer.opt is None: trainer.create_opt()
    device = getattr(trainer.dls, "device", default_device())  # where TrainEvalCallback puts the model
    opt_state = state["opt"]["state"] if device is None else to_device(state["opt"]["state"], device)
    trainer.opt.load_state_dict({"state": opt_state, "hypers": L(state["opt"]["hypers"])})
