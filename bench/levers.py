"""Issue 19's step levers, one change at a time (not a test): python bench/levers.py [--arch A] [--compile]

One full training step of a timm model (forward, fp32 cross-entropy, backward, AdamW step) on a synthetic batch,
in the dtype and memory format the library picks for this CPU (bf16 autocast + channels-last where oneDNN has
bf16, fp32 + channels-last otherwise), measured in one run against the library's default (batch 32, all threads):

- batch size 16 / 32 / 64 (cache locality against per-step overhead);
- torch threads 1 against all of them (does the second core pay inside a step?);
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
from bench import append_results, machine, mm  # noqa: E402
from profile_step import make_model, make_step, rates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(arch, bs, size, bf16, reps, threads=None, compile=False) -> tuple[list[float], float | None]:
    "Images/s of the step and, when compiled, the seconds its first call took beyond an eager step."
    n0 = torch.get_num_threads()
    if threads: torch.set_num_threads(threads)
    try:
        model = make_model(arch)
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
    if a.compile: rows.append(("torch.compile (batch 32)", measure(a.arch, 32, a.size, bf16, a.reps, compile=True)))
    base = statistics.median(rows[0][1][0])
    lines = [f"\n## {a.arch}, training step levers, {a.size} px, {kind} {a.label and '— ' + a.label}", "",
             f"Machine: {machine()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}.",
             f"Command: `{' '.join(['python', 'bench/levers.py', *(argv or sys.argv[1:])])}`"
             + (" (under `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`)" if "AVX2" in a.label else ""), "",
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
