"""Fine-tune plans: which parameters of a Learner train.

A plan is a small value a recipe names:

- `head()`            body frozen, only the new head trains (the seed's "FC layers only");
- `layers(*patterns)` the body modules matching the patterns (module names such as `features.10`,
                      `layer1`, or globs like `layer3.*`) plus the head;
- `full()`            everything trains;
- `freeze_to(n)`      fastai's `freeze_to` over the layer groups (one per body stage, then the head).

`freeze_epochs=k` (any plan but `full()`) holds the plan for the first k epochs of the fit only; from epoch k on
everything trains (fastai's `unfreeze`, through the `Thaw` callback), inside the same one-cycle schedule. fastai's
`fine_tune` does the same for `head()` in two fits; here it serves the frozen stem: the early epochs skip the
backward of the high-resolution layers, the last ones fit them too (docs/experiments.md, issue 19).

BatchNorm is explicit: with `train_bn=True` (fastai's default) the affine parameters of normalisation layers
in frozen parts still train; the seed froze them (`train_bn=False`). Running statistics update in
training mode either way, as in the seed.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, fields

from .errors import RecipeError

__all__ = ["Plan", "head", "layers", "full", "freeze_to", "apply_plan", "trainable_names", "body_module_names"]


@dataclass(frozen=True)
class Plan:
    kind: str                  # 'head' | 'layers' | 'full' | 'freeze_to'
    patterns: tuple = ()       # for 'layers': body module-name patterns
    n: int | None = None       # for 'freeze_to': number of frozen layer groups
    freeze_epochs: int | None = None  # the plan holds for these first epochs, then everything trains; None: always

    def __post_init__(self):
        if self.freeze_epochs is None: return
        if self.kind == "full": raise RecipeError("full() has nothing to freeze, so no freeze_epochs",
                                                  "drop freeze_epochs, or freeze part of the model first")
        if int(self.freeze_epochs) < 1: raise RecipeError(f"freeze_epochs={self.freeze_epochs} is below 1",
                                                         "give 1 or more epochs, or None to keep the plan")

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        "The Plan that `dataclasses.asdict` wrote to JSON: its tuple comes back as a list; other keys are dropped."
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        return cls(**{**kw, "patterns": tuple(kw.get("patterns") or ())})

    def describe(self) -> str:
        if self.kind == "head": what = "head only"
        elif self.kind == "full": what = "entire network"
        elif self.kind == "layers": what = " + ".join(self.patterns) + " + head"
        else: what = f"layer groups {self.n}.. + head"
        return what if self.freeze_epochs is None else f"{what} for {self.freeze_epochs} epoch(s), then entire network"


def head(freeze_epochs: int | None = None) -> Plan: return Plan("head", freeze_epochs=freeze_epochs)
def full() -> Plan: return Plan("full")
def layers(*patterns: str, freeze_epochs: int | None = None) -> Plan:
    return Plan("layers", tuple(patterns), freeze_epochs=freeze_epochs)
def freeze_to(n: int, freeze_epochs: int | None = None) -> Plan:
    return Plan("freeze_to", n=int(n), freeze_epochs=freeze_epochs)


def body_module_names(body) -> list[str]:
    "Names of the body's modules that hold parameters (what a `layers` pattern may name)."
    return [n for n, m in body.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


def _containers(names):
    "Every prefix of a module name, so `layer1` names the whole stage."
    out = []
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            p = ".".join(parts[:i])
            if p not in out: out.append(p)
    return out


def _match(pattern: str, param_name: str) -> bool:
    mod = param_name.rsplit(".", 1)[0]
    parts = mod.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def apply_plan(learn, plan: Plan) -> list[str]:
    """Set `requires_grad` for `plan` (through fastai's optimizer freeze logic), and add its `Thaw` callback when it
    has `freeze_epochs`; returns the names trainable now."""
    if learn.opt is None: learn.create_opt()
    from .callbacks import Thaw  # here, not at the top: a recipe file imports plans without fastai
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, Thaw)])  # a plan applied again replaces the last
    if plan.freeze_epochs is not None: learn.add_cb(Thaw(plan.freeze_epochs))
    if plan.kind == "full": learn.unfreeze()
    elif plan.kind == "head": learn.freeze()
    elif plan.kind == "freeze_to":
        n_groups = len(learn.opt.param_lists)
        if not 0 <= plan.n < n_groups:
            raise RecipeError(f"freeze_to({plan.n}) is out of range: this model has {n_groups} layer groups "
                              f"({', '.join(learn.group_names)})", f"use 0..{n_groups - 1}")
        learn.freeze_to(plan.n)
    elif plan.kind == "layers":
        learn.freeze()
        body = learn.model[0].model
        named = dict(body.named_parameters())
        valid = _containers(body_module_names(body))
        for pat in plan.patterns:
            hits = [n for n in named if _match(pat, n)]
            if not hits:
                raise RecipeError(f"layer pattern {pat!r} matches no module of {learn.arch}",
                                  f"valid names are {', '.join(v for v in valid if v.count('.') <= 1)} (deeper "
                                  f"names and globs like 'layer3.*' work too)")
            for n in hits: named[n].requires_grad_(True)
    else:
        raise RecipeError(f"unknown plan kind {plan.kind!r}", "use head(), layers(...), full() or freeze_to(n)")
    return trainable_names(learn)


def trainable_names(learn) -> list[str]:
    "Trainable parameter names, body ones as `body.<timm name>`, head ones as `head.<index>`."
    body = [f"body.{n}" for n, p in learn.model[0].model.named_parameters() if p.requires_grad]
    return body + [f"head.{n}" for n, p in learn.model[1].named_parameters() if p.requires_grad]
