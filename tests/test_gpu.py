"""The CUDA paths nothing else exercises: cached body features on the GPU, bf16 autocast on CUDA.

Marked `gpu` and skipped without CUDA; `bench/gpu_check.sh` runs them (`pytest -m gpu`) on a GPU machine.
"""
import pytest
import torch

import covid_fastai.features as F
from covid_fastai.callbacks import BF16Autocast, bf16_supported
from covid_fastai.learner import recipe_learner
from covid_fastai.recipes import load_recipe, with_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = dict(pretrained=False, size=32, bs=8)


def test_cached_features_are_computed_and_trained_on_the_gpu(tiny_data):
    "The frozen body runs where the batches go (the GPU) and the head trains there on the cached features."
    rec = with_overrides(load_recipe("resnet18_head"), data=str(tiny_data), epochs=1, **TINY)
    learn, _ = recipe_learner(rec)
    assert learn.dls.device.type == "cuda"  # fastai's default device on a GPU machine
    seen = []
    h = learn.model[0].register_forward_hook(lambda m, i, o: seen.append(o.device.type))
    hl = F.head_learner(learn, rec)
    h.remove()
    assert seen and set(seen) == {"cuda"}  # the body ran on the GPU, not on the CPU beside it
    assert hl.dls.device.type == "cuda" and hl.dls.train.device.type == "cuda"
    with hl.no_bar(), hl.no_logging(): hl.fit(1, 1e-2)
    assert all(p.is_cuda for p in hl.model.parameters())
    xb, yb = hl.dls.train.one_batch()
    assert xb.is_cuda and torch.isfinite(hl.loss_func(hl.model(xb), yb)).item()


@pytest.mark.skipif(not bf16_supported("cuda"), reason="needs a CUDA GPU with bf16")
def test_bf16_autocast_on_cuda(tiny_data):
    "BF16Autocast on CUDA: convolutions run in bf16, the loss sees fp32 predictions, and a fit lowers nothing to NaN."
    rec = with_overrides(load_recipe("resnet18_full"), data=str(tiny_data), epochs=1, **TINY)
    learn, _ = recipe_learner(rec)
    assert learn.bf16_used and any(isinstance(cb, BF16Autocast) for cb in learn.cbs)
    conv_dtypes, preds = [], []
    h = learn.model[0][0].register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))

    from fastai.callback.core import Callback

    class Spy(Callback):
        order = 11  # after BF16Autocast's after_pred

        def after_pred(self): preds.append(self.pred.dtype)

    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=Spy())
    h.remove()
    assert next(learn.model.parameters()).is_cuda
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}
    assert preds and set(preds) == {torch.float32}
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert not torch.is_autocast_enabled("cuda")  # no autocast context left open after the fit
