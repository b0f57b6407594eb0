"""How far a training step is from this machine's limits (not a test): python bench/roofline.py [--arch A] [--bs 32]

For one full training step of a timm model (forward, fp32 cross-entropy, backward, AdamW step) on a synthetic
batch, in each {fp32, bf16 autocast} x {NCHW, channels-last} combination this CPU supports, it sets the measured
step time beside two floors measured in the same run:

- arithmetic: the step's FLOP (3x the forward's, bench/profile_step.py) over the same-dtype GEMM peak;
- memory: the bytes every aten op of the step reads and writes, counted op by op with a TorchDispatchMode (views
  move nothing and are skipped; an in-place op reads and writes its tensor), over the copy bandwidth of this run
  (STREAM's convention: a copy moves 2x its size).

The memory floor is what eager execution must move if each op streams its operands from DRAM. Caches can beat it
for small tensors (the late, 7x7 stages fit in L2), and fusion (torch.compile) can lower it by not writing the
intermediates of elementwise chains; neither changes the big early stages. The step's time over the larger floor
says how much a better kernel could still win; the images/s at the floor is the ceiling for this machine in eager
mode. Appends a markdown section to `--out` (default bench/results-roofline.md).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import append_results, command_line, machine, matmul_peak, mm  # noqa: E402
from profile_step import combinations, make_model, make_step, rates, step_parser, train_gflop_per_image  # noqa: E402

aten = torch.ops.aten
# Ops that allocate or inspect without moving tensor data.
NO_TRAFFIC = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
              aten.detach.default, aten._local_scalar_dense.default, aten.lift_fresh.default,
              aten.is_same_size.default, aten.set_.source_Storage_storage_offset}


def nbytes(t: torch.Tensor) -> int:
    "Bytes an op touches for t: its elements, but no more than its storage (expanded tensors repeat elements)."
    n = t.numel() * t.element_size()
    if t.is_mkldnn or t.layout != torch.strided: return n
    return min(n, t.untyped_storage().nbytes())


class ByteCounter(TorchDispatchMode):
    "Bytes read (unique inputs) plus bytes written (outputs) by every aten op run under it, per op name."
    def __init__(self):
        super().__init__()
        self.by_op = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in NO_TRAFFIC: return out
        ins = {id(t): t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.by_op[func.overloadpacket.__name__] += sum(map(nbytes, ins.values())) + sum(map(nbytes, outs))
        return out

    @property
    def total(self) -> int: return sum(self.by_op.values())


def step_bytes(step) -> ByteCounter:
    with ByteCounter() as bc: step()
    return bc


def copy_bandwidth(mb: int = 512, reps: int = 5) -> list[float]:
    "GB/s of a large fp32 tensor copy (read + write counted, STREAM's convention), one figure per repeat."
    a = torch.randn(mb * 2 ** 20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    out = []
    for _ in range(reps):
        t = time.perf_counter(); b.copy_(a); out.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    return out


def main(argv=None):
    p = step_parser(__doc__, "results-roofline.md")
    p.add_argument("--top", type=int, default=8)  # ops listed by bytes
    a = p.parse_args(argv)
    torch.manual_seed(0)
    bf16_ok, combos = combinations()
    load0 = os.getloadavg()[0]
    gflop = train_gflop_per_image(a.arch, a.size) * a.bs
    bw = copy_bandwidth()
    peaks = {False: matmul_peak(torch.float32, reps=3), True: matmul_peak(torch.bfloat16, reps=3) if bf16_ok else None}
    lines = [f"\n## {a.arch}, one training step, batch {a.bs}, {a.size} px, AdamW {a.label and '— ' + a.label}", "",
             f"Machine: {machine()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}.",
             command_line("bench/roofline.py", argv, a.label), "",
             f"Load average at the start {load0:.1f}, at the end LOAD_END (a shared machine depresses every figure). "
             f"Copy bandwidth (512 MiB, GB/s, min / median): {mm(bw)}. GEMM peaks (2048², GFLOP/s, min / median): "
             f"fp32 {mm(peaks[False])}" + (f", bf16 {mm(peaks[True])}" if bf16_ok else ", bf16 not supported")
             + f". Step FLOP: {gflop:.1f} GFLOP ({gflop / a.bs:.2f} per image).", "",
             "| dtype | memory format | step s (min / median) | img/s (median) | GB moved (op by op) | arithmetic floor s "
             "| memory floor s | step / larger floor | img/s at the memory floor |", "|---|---|---|---|---|---|---|---|---|"]
    tops = []
    for bf16, cl in combos:
        step = make_step(make_model(a.arch), a.bs, a.size, bf16, cl)
        r = rates(step, a.bs, a.reps)
        secs = [a.bs / x for x in r]
        bc = step_bytes(step)
        t_mem = bc.total / 1e9 / statistics.median(bw)
        t_flop = gflop / statistics.median(peaks[bf16])
        s = statistics.median(secs)
        name = ("bf16" if bf16 else "fp32", "channels-last" if cl else "NCHW")
        lines.append(f"| {name[0]} | {name[1]} | {min(secs):.2f} / {s:.2f} | {a.bs / s:.1f} | {bc.total / 1e9:.1f} "
                     f"| {t_flop:.2f} | {t_mem:.2f} | {s / max(t_mem, t_flop):.1f}x | {a.bs / t_mem:.0f} |")
        print(lines[-1], flush=True)
        tops.append(f"- {name[0]}, {name[1]}: " + ", ".join(
            f"{op} {b / 1e9:.2f}" for op, b in bc.by_op.most_common(a.top)) + " (GB)")
    lines = [l.replace("LOAD_END", f"{os.getloadavg()[0]:.1f}") for l in lines]
    append_results(a.out, lines + ["", "Bytes by op (the largest):", ""] + tops)


if __name__ == "__main__":
    main()
