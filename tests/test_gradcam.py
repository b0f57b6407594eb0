"Grad-CAM on tiny random-init bodies of each family: right shape, informative, class-dependent."
import numpy as np
import pytest
import torch
from fastai.vision.all import TimmBody, add_head

from covid_fastai.archs import arch_cfg
from covid_fastai.gradcam import cam_layer, grad_cam, overlay
from covid_fastai.models import create_body, seed_head


@pytest.mark.parametrize("arch, layer", [("vgg16.tv_in1k", "ReLU"), ("resnet18.tv_in1k", "TimmBody"),
                                         ("tf_efficientnet_lite0.in1k", "TimmBody")])
def test_grad_cam_shape_and_class_dependence(arch, layer):
    torch.manual_seed(0)
    body = create_body(arch)
    nf = body.num_features
    model = add_head(TimmBody(body), nf, 2, head=seed_head(nf, 2, pool=arch_cfg(arch).seed_pool))
    for p in model[0].parameters(): p.requires_grad_(False)  # a frozen body, as in head-only plans
    model.train()
    x = torch.randn(3, 3, 96, 64)
    c0, probs = grad_cam(model, x, target=0)
    c1, _ = grad_cam(model, x, target=1)
    assert type(cam_layer(model)).__name__ == layer
    assert c0.shape == (3, 96, 64) and probs.shape == (3, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert c0.min() >= 0 and c0.max() <= 1 and (c0.reshape(3, -1).std(1) > 0.05).sum() >= 2  # not constant
    # (a random-init body can have no positive evidence for a class on one image: an all-zero map)
    assert np.abs(c0 - c1).mean() > 0.02  # explaining the other class gives another map
    assert model.training  # mode restored
    ov = overlay(np.full((96, 64), 128, np.uint8), c0[0])
    assert ov.shape == (96, 64, 3) and ov.dtype == np.uint8 and ov.std() > 0
