"""Test helper, run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

    ddp_worker.py OUT DATA

1. each rank's share of one shuffled epoch -> OUT/shards.json;
2. a 1-epoch run -> OUT/runs/;
3. a 3-epoch run -> OUT/killed/, whose rank 0 SIGKILLs itself once epoch 0's checkpoint is written (one torchrun
   for all three: each start costs seconds).
"""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fastai.callback.core import Callback

from covid_fastai import distributed
from covid_fastai.learner import recipe_learner
from covid_fastai.recipes import load_recipe, with_overrides
from covid_fastai.train import run

# Equality with one process needs no per-process randomness in the fit: the body (all BatchNorm) is frozen and in
# eval mode (bn_freeze), the head has no dropout, no augmentation, no bf16. cache_features 'on' is refused under
# data-parallel (the frozen body runs in every batch, as with 'off' in one process).
SETTINGS = dict(pretrained=False, size=32, bs=8, lr=0.05, epochs=1, bn_freeze=True, dropout=0.0, aug="none",
                bf16=False, channels_last=False, cache_features="on", lr_scaling="linear")


class KillAfterFirstCheckpoint(Callback):
    "Rank 0 dies hard (SIGKILL: nothing is cleaned up) right after epoch 0 was checkpointed."
    order = 95  # after EpochCheckpoint (90)

    def after_epoch(self):
        if self.epoch == 0 and distributed.is_main(): os.kill(os.getpid(), signal.SIGKILL)


def main(out, data):
    torch.set_num_threads(1)
    out, recipe = Path(out), with_overrides(load_recipe("resnet18_head"), data=data, **SETTINGS)
    distributed.setup()
    learn, _ = recipe_learner(recipe)
    mine = list(distributed.broadcast_dl()(learn.dls.train).get_idxs())
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, mine)
    if distributed.is_main():
        (out / "shards.json").write_text(json.dumps({"n": len(learn.dls.train_ds), "shards": shards}))
    run(recipe, out=out / "runs")  # leaves the process group at its end
    run(with_overrides(recipe, epochs=3), out=out / "killed", cbs=[KillAfterFirstCheckpoint()])  # joins it again


if __name__ == "__main__":
    main(*sys.argv[1:])
