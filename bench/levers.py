"""Issue 19's step levers, one change at a time (not a test): python bench/levers.py [--arch A] [--compile]

One full training step of a timm model (forward, fp32 cross-entropy, backward, AdamW step) on a synthetic batch,
in the dtype and memory format the library picks for this CPU (bf16 autocast + channels-last where oneDNN has
bf16, fp32 + channels-last otherwise), measured in one run against the library's default (batch 32, all threads):

- batch size 16 / 32 / 64 (cache locality against per-step overhead);
- torch threads 1 against all of them (does the second core pay inside a step?);
- the first layer groups frozen (`--freeze 3,4`: fastai's `freeze_to(n)` over the library's layer groups, e.g. for
  Lite0 3 = stem + blocks 0-1): autograd then skips their backward, the costliest part of the step at full resolution;
- where bf16 autocast is on, its depthwise convolutions run in fp32 instead (oneDNN's bf16 depthwise backward was
  twice as slow as fp32's in bench/results-profile.md, its forward twice as fast; a step-only figure: in `best`'s
  own fit it was slower, docs/experiments.md, "Issue 19, session 14");
- with `--compile`: `torch.compile` of the model (Inductor), its compile time, and the training images after which
  the compiled step has paid for its compilation (compare a recipe's images: `best` trains 6 x ~2,050).

Images/s are min / median over `--reps` timed steps after warm-up. Appends to `--out` (bench/results-levers.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import append_results, command_line, machine, mm  # noqa: E402
from profile_step import make_model, make_step, rates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def freeze_groups(model, arch: str, n: int) -> list[str]:
    """Freeze the first `n` of the library's layer groups of `model` (covid_fastai.models.layer_groups, the groups
    fastai's `freeze_to(n)` and the `freeze_to` plan count); returns their labels."""
    from covid_fastai.models import layer_groups
    groups = layer_groups(model, arch)
    params = dict(model.named_parameters())
    for _, names in groups[:n]:
        for name in names: params[name].requires_grad_(False)
    return [label for label, _ in groups[:n]]


def depthwise_in_fp32(model) -> int:
    "Run every depthwise convolution of `model` outside autocast, in fp32; returns how many were changed."
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            def forward(x, _orig=m.forward):
                with torch.autocast("cpu", enabled=False): return _orig(x.float())
            m.forward = forward
            n += 1
    return n


def measure(arch, bs, size, bf16, reps, threads=None, compile=False, freeze=0,
            dw_fp32=False) -> tuple[list[float], float | None]:
    "Images/s of the step and, when compiled, the seconds its first call took beyond an eager step."
    n0 = torch.get_num_threads()
    if threads: torch.set_num_threads(threads)
    try:
        model = make_model(arch)
        if freeze: freeze_groups(model, arch, freeze)
        if dw_fp32: depthwise_in_fp32(model)
        if compile: model = torch.compile(model)
        step = make_step(model, bs, size, bf16, channels_last=True)
        first = None
        if compile:
            t = time.perf_counter(); step(); first = time.perf_counter() - t
        r = rates(step, bs, reps)
        return r, (first - bs / statistics.median(r)) if compile else None
    finally:
        torch.set_num_threads(n0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tf_efficientnet_lite0.in1k")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--compile", action="store_true")  # add torch.compile (minutes of compilation)
    p.add_argument("--freeze", default="")  # e.g. "3,4": rows with the first 3, then 4, layer groups frozen
    p.add_argument("--label", default="")  # e.g. "AVX2 emulated on the AMX machine"
    p.add_argument("--out", default=str(ROOT / "bench" / "results-levers.md"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    kind = f"{'bf16 autocast' if bf16 else 'fp32'}, channels-last"
    load0 = os.getloadavg()[0]
    rows = [("default: batch 32, all threads", measure(a.arch, 32, a.size, bf16, a.reps))]
    for bs in (16, 64): rows.append((f"batch {bs}", measure(a.arch, bs, a.size, bf16, a.reps)))
    rows.append(("1 thread (batch 32)", measure(a.arch, 32, a.size, bf16, a.reps, threads=1)))
    for n in [int(v) for v in a.freeze.split(",") if v.strip()]:
        labels = freeze_groups(make_model(a.arch), a.arch, n)
        rows.append((f"first {n} layer groups frozen ({'; '.join(labels)}; batch 32)",
                     measure(a.arch, 32, a.size, bf16, a.reps, freeze=n)))
    if bf16:
        n = depthwise_in_fp32(make_model(a.arch))
        rows.append((f"its {n} depthwise convolutions in fp32 (batch 32)", measure(a.arch, 32, a.size, bf16, a.reps,
                                                                                   dw_fp32=True)))
    if a.compile: rows.append(("torch.compile (batch 32)", measure(a.arch, 32, a.size, bf16, a.reps, compile=True)))
    base = statistics.median(rows[0][1][0])
    lines = [f"\n## {a.arch}, training step levers, {a.size} px, {kind} {a.label and '— ' + a.label}", "",
             f"Machine: {machine()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}.",
             command_line("bench/levers.py", argv, a.label), "",
             f"Load average at the start {load0:.1f}, at the end {os.getloadavg()[0]:.1f}.", "",
             "| lever | img/s (min / median) | over the default | compile s | paid back after (training images) |",
             "|---|---|---|---|---|"]
    for name, (r, comp) in rows:
        med = statistics.median(r)
        gain = 1 / base - 1 / med  # seconds saved per image
        payback = "never (slower)" if comp is not None and gain <= 0 else f"{comp / gain:,.0f}" if comp else ""
        lines.append(f"| {name} | {mm(r)} | {med / base:.2f}x | {f'{comp:.0f}' if comp else ''} | {payback} |")
        print(lines[-1], flush=True)
    append_results(a.out, lines)


if __name__ == "__main__":
    main()
