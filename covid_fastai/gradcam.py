"""Grad-CAM heatmaps for the fastai model `nn.Sequential(TimmBody(timm_model), head)` built in models.py.

The feature map is the family's `ArchCfg.cam_layer` (covid_fastai.archs), by default the body's output, its last
feature map: ResNet `layer4`, EfficientNet `conv_head`+`bn2`; for VGG the last ReLU before the final max-pool
(twice the resolution of the pooled map). Grad-CAM weights each channel by the spatial mean of the class score's gradient and keeps the
positive part (Selvaraju et al. 2017). It runs in fp32 (no autocast), in eval mode, and needs no trainable
body: the input carries the gradient.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .archs import arch_cfg

__all__ = ["cam_layer", "grad_cam", "overlay"]


def cam_layer(model: nn.Module) -> nn.Module:
    "The module whose output Grad-CAM explains: the family's `cam_layer` of the timm body, else the body itself."
    body = model[0].model if hasattr(model[0], "model") else model[0]
    layer = arch_cfg(body).cam_layer
    return layer(body) if layer else model[0]


@torch.no_grad()
def _upsample(cam, size):
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def grad_cam(model: nn.Module, x: torch.Tensor, target=None) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps (n, H, W) in [0, 1] at the input's size, probabilities (n, classes)).

    x: a normalised input batch; target: class index (int) or one per image (default: the predicted class).
    """
    layer, store = cam_layer(model), {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            xi = x.detach().float().requires_grad_(True)
            logits = model(xi).float()
            tgt = logits.argmax(1) if target is None else torch.as_tensor(target, device=x.device).expand(len(x))
            act = store["act"]
            score = logits.gather(1, tgt.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        model.train(was_training)
    act, grad = act.detach().float(), grad.float()
    cam = F.relu((grad.mean((2, 3), keepdim=True) * act).sum(1))
    cam = _upsample(cam, x.shape[-2:])
    lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    # A flat map (e.g. a 1x1 feature map at tiny input sizes) stays all zero instead of amplified rounding noise.
    flat = (hi - lo) <= 1e-4 * hi.abs() + 1e-12
    cam = torch.where(flat, torch.zeros_like(cam), (cam - lo) / (hi - lo).clamp_min(1e-12))
    return cam.cpu().numpy(), logits.detach().softmax(1).cpu().numpy()


def overlay(img: np.ndarray, cam: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """RGB uint8 image: grayscale `img` (H, W[, C], 0-255 or 0-1) under the 'jet' colouring of `cam` (H, W),
    opaque in proportion to the heat (cold regions show the plain image)."""
    from matplotlib import colormaps
    g = img.astype(np.float32)
    if g.ndim == 3: g = g.mean(-1)
    g = g / 255.0 if g.max() > 1.5 else g
    heat = colormaps["jet"](cam)[..., :3]
    a = alpha * cam[..., None]
    return (255 * np.clip((1 - a) * g[..., None] + a * heat, 0, 1)).astype(np.uint8)
