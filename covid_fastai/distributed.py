"""Data-parallel training: one run across N processes started by torchrun or `accelerate launch`.

The fit goes through fastai's own `Learner.distrib_ctx` (Accelerate's `Accelerator` wraps the model in
DistributedDataParallel, fastai's `DistributedDL` gives each process its shard of every epoch). Around it, this
module fixes what fastai assumes about CUDA (docs/distributed.md):

- `setup` joins the process group the launcher described: nccl on CUDA, gloo on CPU (fastai's `setup_distrib`
  hard-codes nccl and `cuda.set_device`);
- `broadcast_dl()` broadcasts each epoch's shuffled indices as a CPU tensor under gloo (fastai's
  `DistributedDL._broadcast` calls `.cuda()`);
- `sync_bn` only on CUDA (`nn.SyncBatchNorm` raises in CPU training), and `Accelerator(cpu=True)` on CPU
  (without it Accelerate finds no GPU, sets up no distributed state and `prepare` wraps nothing: one
  unsynchronised model per process; accelerate/state.py `_prepare_backend`).

Only rank 0 owns the run folder (train.run); the others fit and leave. The global batch is `bs x world size`;
`Recipe.lr_scaling='linear'` multiplies the rate by the world size (off by default).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os

import torch
import torch.distributed as dist

from .errors import MissingExtra, RunFolderError, UserError

__all__ = ["world_size", "rank", "is_main", "setup", "teardown", "alone", "broadcast_dl", "data_parallel", "agree",
           "scaled_lr", "facts", "check_resume_world"]


def world_size() -> int:
    "Processes in this run: the process group's size once joined, else the launcher's WORLD_SIZE (1 alone)."
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    "This process's rank (0 alone)."
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_main() -> bool: return rank() == 0


def setup() -> str | None:
    """Join the process group the launcher described (env://): nccl with one GPU per process when CUDA is there,
    else gloo. Returns the backend, or None in a single process."""
    if world_size() <= 1: return None
    if dist.is_initialized(): return dist.get_backend()
    if "RANK" not in os.environ:  # accelerate's debug_launcher sets WORLD_SIZE but not RANK
        raise UserError("WORLD_SIZE is set but RANK is not, so every process would think it is rank 0",
                        "start the run with torchrun --nproc_per_node N -m covid_fastai recipe NAME "
                        "(docs/distributed.md)")
    cuda = torch.cuda.is_available()
    if cuda: torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    # kept for the process's life: runs one after another reuse it (joining the launcher's group twice fails)
    atexit.register(teardown)
    return dist.get_backend()


def teardown():
    "Leave the process group (at exit, see `setup`)."
    if dist.is_available() and dist.is_initialized(): dist.destroy_process_group()


@contextlib.contextmanager
def alone():
    """Rank 0 working by itself (lr_find before the fit, evaluation after it): WORLD_SIZE=1 meanwhile, since
    fastai's `to_detach` gathers from every process whenever WORLD_SIZE says there are several."""
    if world_size() <= 1:
        yield
        return
    was = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try: yield
    finally:
        if was is None: os.environ.pop("WORLD_SIZE", None)
        else: os.environ["WORLD_SIZE"] = was


def agree(value):
    "`value` as rank 0 has it, on every rank (a picklable object; unchanged in a single process)."
    if world_size() <= 1: return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@functools.cache
def broadcast_dl():
    """fastai's `DistributedDL` with a broadcast that works on CPU: the class, made on first use (importing this
    module imports neither fastai.distributed nor accelerate)."""
    from fastai.distributed import DistributedDL

    class BroadcastDL(DistributedDL):
        "fastai's `DistributedDL`, broadcasting the epoch's indices on the backend's own device (CPU under gloo)."
        def _broadcast(self, t, rank):
            if dist.get_backend() == "nccl": return super()._broadcast(t, rank)  # nccl needs CUDA tensors
            t = torch.tensor(t, dtype=torch.long)
            dist.broadcast(t, rank)
            return t.tolist()
    return BroadcastDL


@contextlib.contextmanager
def data_parallel(learn):
    """fastai's `distrib_ctx` around `learn`'s fit when this process is one of several, with the CPU fixes above;
    nothing in a single process. Needs the `dist` extra (accelerate)."""
    if world_size() <= 1:
        yield learn
        return
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise MissingExtra("accelerate", "dist", "data-parallel training") from None
    cuda, dl_cls = torch.cuda.is_available(), broadcast_dl()
    with learn.distrib_ctx(sync_bn=cuda, cpu=not cuda):
        # fastai's DistributedTrainer._wrap_dl, wrapping in the CPU-safe subclass
        learn.distributed_trainer._wrap_dl = lambda dl: dl if isinstance(dl, dl_cls.__base__) else dl_cls(dl)
        yield learn


def scaled_lr(lr, recipe):
    "The rate to fit with: `lr` x world size under `lr_scaling='linear'` (Goyal et al. 2017), else `lr`."
    return lr * world_size() if recipe.lr_scaling == "linear" else lr


def facts(recipe, lr: float) -> dict:
    "config.json's `distributed`: processes, backend, per-process and global batch, the rate rule and rate used."
    return {"world_size": world_size(), "backend": dist.get_backend(), "bs_per_process": recipe.bs,
            "global_bs": recipe.bs * world_size(), "lr_scaling": recipe.lr_scaling, "lr": lr,
            "evaluation": "rank 0, full valid and test splits (each image once)",
            "train_images_per_s": "all processes together"}


def check_resume_world(config: dict, path):
    "A run resumes on as many processes as it started with: otherwise its global batch (and run) would change."
    was = config.get("distributed", {}).get("world_size", 1)
    if was == world_size(): return
    launch = "python -m covid_fastai" if was == 1 else f"torchrun --nproc_per_node {was} -m covid_fastai"
    raise RunFolderError(f"{path} trained on {was} process(es), this resume has {world_size()}",
                         f"resume it on {was} ({launch} resume {path}) so the global batch stays "
                         f"{config['recipe']['bs'] * was}", path=path)
