"""Where one training step goes (not a test): python bench/profile_step.py [--arch A] [--bs 32] [--size 224] [--out F]

One full training step of a timm model (forward, fp32 cross-entropy, backward, AdamW step) on a synthetic batch,
in the four combinations {fp32, bf16 autocast} x {NCHW, channels-last} that this CPU supports (bf16 only where
oneDNN has bf16 units). For each: images/s (min / median over repeats) and torch's profiler table by op for one
step after warm-up; plus the fp32 and bf16 GEMM peaks of the same run as the physical reference, and the step's
GFLOP/s from torch's FLOP counter. Appends a markdown section to `--out` (default bench/results-profile.md).

To see an AVX2-only fp32 CPU on an AVX-512/AMX machine, run it under
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` ("AVX2 emulated"; a proxy, not the same machine).
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
from bench import append_results, command_line, machine, matmul_peak, mm, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_model(arch: str):
    import timm
    return timm.create_model(arch, pretrained=False, num_classes=2)


def make_step(model, bs, size, bf16: bool, channels_last: bool):
    "One AdamW training step as a closure (bench.train_step)."
    return train_step(model, bs, size, bf16, channels_last, opt="adamw")


def rates(step, bs, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup): step()
    out = []
    for _ in range(reps):
        t = time.perf_counter(); step(); out.append(bs / (time.perf_counter() - t))
    return out


def table(step, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof: step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=42)


def train_gflop_per_image(arch, size) -> float:
    """Training GFLOP per image, taken as 3x the forward's (backward ~ 2x forward). torch's FLOP counter gets the
    forward right but counts depthwise convolutions' backward as if they were dense (32 GFLOP per image for
    Lite0's training step against 0.77 for its forward), so it is not used for the backward."""
    from torch.utils.flop_counter import FlopCounterMode
    m = make_model(arch).train()
    with FlopCounterMode(display=False) as fc, torch.no_grad(): m(torch.randn(2, 3, size, size))
    return 3 * fc.get_total_flops() / 2 / 1e9


def step_parser(doc: str, results: str) -> argparse.ArgumentParser:
    "The arguments every one-step benchmark takes; `results`: its default file in bench/."
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--arch", default="tf_efficientnet_lite0.in1k")
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=3)  # timed steps per combination (median reported)
    p.add_argument("--label", default="")  # e.g. "AVX2 emulated on the AMX machine"
    p.add_argument("--out", default=str(ROOT / "bench" / results))
    return p


def combinations() -> tuple[bool, list[tuple[bool, bool]]]:
    "(bf16 supported, the (bf16, channels-last) pairs this CPU can run)."
    bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bf16_ok, [(b, c) for b in ([False, True] if bf16_ok else [False]) for c in (False, True)]


def main(argv=None):
    p = step_parser(__doc__, "results-profile.md")
    p.add_argument("--rows", type=int, default=15)  # profiler rows per table
    a = p.parse_args(argv)
    torch.manual_seed(0)
    bf16_ok, combos = combinations()
    gflop = train_gflop_per_image(a.arch, a.size)
    p32 = matmul_peak(torch.float32, reps=3)
    p16 = matmul_peak(torch.bfloat16, reps=3) if bf16_ok else None
    lines = [f"\n## {a.arch}, one training step, batch {a.bs}, {a.size} px, AdamW {a.label and '— ' + a.label}",
             "", f"Machine: {machine()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}.",
             command_line("bench/profile_step.py", argv, a.label),
             "", f"Load average at the start: {os.getloadavg()[0]:.1f} (a shared machine depresses every figure). "
             f"GEMM peaks (2048², GFLOP/s, min / median): fp32 {mm(p32)}"
             + (f", bf16 {mm(p16)}" if p16 else ", bf16 not supported (fp32 only)")
             + f". Training FLOP per image (3x the forward's, torch FLOP counter): {gflop:.2f} GFLOP.", "",
             "| dtype | memory format | img/s (min / median) | GFLOP/s (median) | % of the same-dtype GEMM peak |",
             "|---|---|---|---|---|"]
    tables = []
    for bf16, cl in combos:
        step = make_step(make_model(a.arch), a.bs, a.size, bf16, cl)
        r = rates(step, a.bs, a.reps)
        gfs = statistics.median(r) * gflop
        peak = statistics.median(p16 if bf16 else p32)
        name = ("bf16" if bf16 else "fp32", "channels-last" if cl else "NCHW")
        lines.append(f"| {name[0]} | {name[1]} | {mm(r)} | {gfs:.0f} | {100 * gfs / peak:.0f}% |")
        print(lines[-1], flush=True)
        tables.append(f"\n### {name[0]}, {name[1]}: profiler, one step, by op (self CPU time)\n\n```\n"
                      f"{table(step, a.rows)}```")
    append_results(a.out, lines + tables)


if __name__ == "__main__":
    main()
