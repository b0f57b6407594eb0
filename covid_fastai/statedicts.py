"""State-dict mechanics for pretrained weights: read a file safely, rename to timm's keys, check the fit, load.

`read_state_dict` uses timm's `load_state_dict` (safetensors, or torch.load with weights_only; unwraps
`state_dict`/`model` and strips DDP/compile prefixes). `load_fitting` is ours: timm's own loader, `load_pretrained`
(the one `create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...))` calls), loads non-strictly whenever
the model's num_classes differs from the checkpoint's, which it always does for our headless bodies; it would
accept weights with body tensors missing, or with body tensors this model lacks (resnet34's into resnet18). We
refuse both, and report which head tensors stayed random and which source tensors went unused.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsUnavailable

__all__ = ["HEAD_MODULES", "read_state_dict", "timm_filter", "load_fitting"]

# Top-level modules that hold a timm model's classifier; their keys may be absent on either side
# (num_classes=0, a replaced pre_logits, a source without a head). Anything else is "body".
HEAD_MODULES = frozenset({"head", "pre_logits", "fc", "classifier", "last_linear"})

_FIX_FILE = "pass a torchvision/timm .pth or .safetensors state dict for this architecture with --weights FILE"


def read_state_dict(path: Path) -> dict:
    "Tensors of a .safetensors or weights-only .pth/.bin, unwrapped from common checkpoint dicts."
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(str(path), use_ema=False, device="cpu")
    except AttributeError:  # timm read it but found no mapping to clean: a bare tensor, a list...
        raise WeightsUnavailable(f"weights file {path} holds no state dict", _FIX_FILE, path=path) from None
    except Exception as e:  # noqa: BLE001 - any reader failure means "not a usable weights file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsUnavailable(f"cannot read weights file {path} as a state dict ({first[:160]})", _FIX_FILE,
                                 path=path) from None
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def timm_filter(model: nn.Module, sd: dict) -> dict:
    """Apply the model module's own checkpoint filter (torchvision -> timm key names).

    e.g. timm.models.vgg._filter_fn maps torchvision ``classifier.{0,3,6}`` to ``pre_logits.fc1/fc2``
    and ``head.fc``. The filters are idempotent on timm-format dicts; ResNet needs none.
    """
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None) or getattr(module, "_filter_fn", None)
    if fn is None:
        return sd
    try:
        return fn(sd, model) if len(inspect.signature(fn).parameters) >= 2 else fn(sd)
    except Exception as e:  # noqa: BLE001 - a foreign file the filter can't handle is a user error
        raise WeightsUnavailable(f"timm's {module.__name__}.{fn.__name__} could not convert the weights "
                                 f"({type(e).__name__}: {str(e)[:120]})", _FIX_FILE) from None


def _names(value) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value or ())


def load_fitting(model: nn.Module, sd: dict, cfg: dict, origin: str) -> tuple[list, list, list]:
    """Load every model key the source provides; return (missing, unused, notes).

    Head keys may be missing on either side or differ in shape (another num_classes): skipped and
    reported. A missing body key, a body shape mismatch, or body tensors the model lacks (resnet34's weights
    offered to resnet18 fit every resnet18 key) mean the weights are for another model.
    """
    from timm.models import adapt_input_conv

    classifiers, first_conv = _names(cfg.get("classifier")), _names(cfg.get("first_conv"))

    def is_head(key):
        return key.split(".", 1)[0] in HEAD_MODULES or any(key.startswith(c + ".") for c in classifiers)

    target = model.state_dict()
    load, missing, head_reshaped, body_missing, mismatched, notes = {}, [], [], [], [], []
    for k, v in target.items():
        if k not in sd:
            if k.endswith("num_batches_tracked"):
                continue  # a counter, not a weight; BatchNorm tolerates its absence
            (missing if is_head(k) else body_missing).append(k)
            continue
        src = sd[k]
        if src.shape != v.shape:
            if is_head(k):
                head_reshaped.append(k)
                continue
            if (k in {c + ".weight" for c in first_conv} and src.ndim == 4 and src.shape[0] == v.shape[0]
                    and src.shape[2:] == v.shape[2:]):
                src = adapt_input_conv(v.shape[1], src)  # timm's own 3 -> N channel adaptation
                notes.append(f"{k} adapted from {sd[k].shape[1]} to {v.shape[1]} input channels")
            else:
                mismatched.append(f"{k} {tuple(src.shape)} vs model {tuple(v.shape)}")
                continue
        load[k] = src
    extra = [k for k in sd if k not in target and not is_head(k) and not k.endswith("num_batches_tracked")]
    if body_missing or mismatched or extra:
        what = []
        if body_missing:
            what.append(f"{len(body_missing)} body tensors missing (first: {body_missing[0]})")
        if mismatched:
            what.append(f"{len(mismatched)} shape mismatches (first: {mismatched[0]})")
        if extra:
            what.append(f"{len(extra)} body tensors this model does not have (first: {extra[0]})")
        raise WeightsUnavailable(f"weights from {origin} do not fit {cfg.get('architecture', 'this model')}: "
                                 f"{', '.join(what)}", "pass weights for this architecture with --weights FILE, "
                                 "or use --pretrained false")
    result = model.load_state_dict(load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # only model keys were selected
    if head_reshaped:
        notes.append(f"head tensors of another shape left random: {', '.join(head_reshaped)}")
    unused = [k for k in sd if k not in target] + head_reshaped
    return sorted(missing + head_reshaped), unused, notes
