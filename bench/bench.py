"""Speed benchmarks (not tests): python bench/bench.py [--quick] [--only 1,2,3,4,5,6]

Measures, side by side in one run, the library's defaults (bf16 autocast + channels-last, cached features for
frozen bodies) against fastai's defaults (fp32, NCHW, no cache), and writes bench/results.md with the machine's
description. Every figure is min / median over repeats; compare ratios, not absolute timings (the machine is
shared and noisy).

1. train-step images/s, default vs fastai defaults, same model and batch (synthetic batches)
2. end-to-end epoch images/s (data loading included, real data) over pure train-step images/s
3. wall time of a head-only recipe (10 epochs) with cached features vs without, and test accuracy of both
4. achieved training GFLOP/s (torch's FLOP counter, 2 FLOPs per multiply-add) over the bf16 matmul peak
5. wall time of the VGG-16 seed grid at the seed's settings, default vs fastai defaults: per-image times
   measured on a subset of the shared data, extrapolated to the full split x 10 epochs
6. the data path: loading images/s with the decode-once cache (first vs later passes) for 0/1/2 workers, and
   per-item augmentation on PIL uint8 vs torchvision tensor kernels

A full run takes about 25 minutes on 2 cores; `--only 1,4` runs some parts (written to results-only-1-4.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COVID_FASTAI_REAL_DATA", ROOT.parent / "shared/data/cxr"))
OUT = ROOT / "bench" / "results.md"


def mm(xs): return f"{min(xs):.1f} / {statistics.median(xs):.1f}"


def cpu_flags() -> set[str]:
    "The ISA flags the kernel reports for this CPU (/proc/cpuinfo), whatever torch or oneDNN are limited to."
    line = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "flags:")
    return set(line.split(":", 1)[1].split())


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = cpu_flags()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{platform.platform()}; CPU {cpu}; {os.cpu_count()} cores visible; ISA {', '.join(isa) or 'no avx512'}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"bf16 via oneDNN: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")


CPU_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # the variables that emulate another CPU kind


def command_line(script: str, argv=None, label: str = "") -> str:
    """How a bench script was started, quoted so it reproduces as written, with the CPU limits it ran under (an AVX2
    label without them set names the emulation's variables)."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in CPU_LIMITS if os.environ.get(k)]
    cmd = " ".join(env + [shlex.join(["python", script, *(argv if argv is not None else sys.argv[1:])])])
    return (f"Command: `{cmd}`"
            + (" (under `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`)" if "AVX2" in label and not env else ""))


def append_results(path, lines: list[str]) -> None:
    "Append a markdown section to a results file and print it."
    text = "\n".join(lines) + "\n"
    with open(path, "a") as f: f.write(text)
    print(text)


def matmul_peak(dtype, n=2048, reps=5) -> list[float]:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    out = []
    for _ in range(reps):
        t = time.perf_counter(); a @ b; out.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return out


def make_model(arch):
    from covid_fastai.models import create_body, seed_head, family
    from fastai.vision.all import TimmBody, add_head
    body = create_body(arch)
    return add_head(TimmBody(body), body.num_features, 2,
                    head=seed_head(body.num_features, 2, pool=7 if family(arch) == "vgg" else 1))


def train_step(model, bs, size, bf16: bool, channels_last: bool, opt: str = "sgd"):
    """A closure running one full training step (forward, fp32 loss, backward, optimiser step) on a synthetic batch;
    the model is put in training mode and the memory format first."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.train().to(memory_format=fmt)
    optim = (torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if opt == "sgd"
             else torch.optim.AdamW(model.parameters(), lr=1e-4))
    x = torch.randn(bs, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (bs,))
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def step():
        optim.zero_grad(set_to_none=True)
        with amp(): out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        optim.step()
    return step


def step_rate(model, bs, size, fast: bool, steps=4, warmup=2, reps=3) -> list[float]:
    "Images/s of full training steps (SGD) on a synthetic batch; fast = bf16 + channels-last."
    step = train_step(model, bs, size, bf16=fast, channels_last=fast)
    for _ in range(warmup): step()
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps): step()
        rates.append(bs * steps / (time.perf_counter() - t))
    return rates


def profile_step(model, bs, size=224) -> str:
    "torch profiler table of one bf16 channels-last training step (after warm-up)."
    from torch.profiler import ProfilerActivity, profile
    model = model.train().to(memory_format=torch.channels_last)
    x = torch.randn(bs, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16): out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof: step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40)


def train_flops_per_image(model, size) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 3, size, size)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1])).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def run_recipe_py(name, **kw) -> dict:
    "Run a recipe in a fresh process (clean RNG and caches); returns its metrics and config."
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    args = [sys.executable, "-m", "covid_fastai", "recipe", name, "--out", str(out)]
    for k, v in kw.items(): args += [f"--{k}", str(v)]
    t = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if r.returncode: raise RuntimeError(r.stderr[-2000:])
    (d,) = (out / name).iterdir()
    return {"wall": wall, "metrics": json.loads((d / "metrics.json").read_text()),
            "config": json.loads((d / "config.json").read_text())}


def bench1(quick):
    rows = ["| model | batch | fastai defaults (fp32, NCHW) img/s | library default (bf16, channels-last) img/s | ratio (medians) | target |",
            "|---|---|---|---|---|---|"]
    for arch, bs, target in (("resnet18.tv_in1k", 32, 8), ("vgg16.tv_in1k", 16, 3)):
        m = make_model(arch)
        slow = step_rate(m, bs, 224, fast=False, steps=1 if "vgg" in arch else 2, reps=2 if quick else 3)
        fast = step_rate(m, bs, 224, fast=True, steps=2 if "vgg" in arch else 4, reps=2 if quick else 3)
        r = statistics.median(fast) / statistics.median(slow)
        rows.append(f"| {arch} full fine-tune | {bs} | {mm(slow)} | {mm(fast)} | {r:.1f}x | >= {target}x |")
        print(rows[-1], flush=True)
    p32, p16 = matmul_peak(torch.float32, reps=3), matmul_peak(torch.bfloat16, reps=3)
    rows.append(f"\nBound: the same-run matmul peaks (2048^2) are fp32 {mm(p32)} and bf16 {mm(p16)} GFLOP/s, a "
                f"{statistics.median(p16) / statistics.median(p32):.1f}x ratio: on a CPU without AMX tiles bf16 can "
                "speed a compute-bound step up by about that much, not more.")
    return "\n".join(rows)


def bench2(quick):
    from covid_fastai.recipes import load_recipe, with_overrides
    from covid_fastai.learner import recipe_learner
    from covid_fastai.callbacks import TrainThroughput
    rows = ["| model | batch | pure train step img/s | end-to-end epoch img/s (real data, loading included) | ratio | target |",
            "|---|---|---|---|---|---|"]
    bs = 32
    pure = step_rate(make_model("resnet18.tv_in1k"), bs, 224, fast=True, reps=2 if quick else 3)
    tp = TrainThroughput()
    rec = with_overrides(load_recipe("resnet18_full"), data=str(DATA), pretrained=False, bs=bs)
    learn, _ = recipe_learner(rec, cbs=[tp])
    n = 8 if quick else 16  # batches per measured "epoch"
    learn.dls.train.n = n * bs  # a subset epoch: the first n batches of a shuffled pass
    e2e = []
    with learn.no_bar(), learn.no_logging():
        learn.fit(1 if quick else 3, 1e-3)
    e2e = [i / t for i, t in zip(tp.epoch_images, tp.epoch_times)]
    r = statistics.median(e2e) / statistics.median(pure)
    rows.append(f"| resnet18 full fine-tune, seed augmentation, {learn.dls.train.fake_l.num_workers} loader workers | {bs} | "
                f"{mm(pure)} | {mm(e2e)} | {r:.2f} | >= 0.9 |")
    print(rows[-1], flush=True)
    return "\n".join(rows)


# Configurations of measurement 3: (label, recipe overrides). The head-only recipe under the seed policy (training-
# mode BatchNorm in the frozen body, the assignment's heavy augmentation), the same with fastai's BnFreeze, and
# under the modern policy (BnFreeze, mild X-ray augmentation, lr_find, one-cycle AdamW).
B3_CONFIGS = {"seed": ("seed policy, cache forced on", {"cache_features": "on"}), "bn_freeze": ("seed policy + bn_freeze, cache forced on", {"bn_freeze": "true", "cache_features": "on"}),
              "modern": ("modern policy", {"policy": "modern"})}


def bench3(quick, configs=("seed", "bn_freeze", "modern"), seeds=(42,)):
    rows = ["| recipe (10 epochs, real data) | seed | cached: wall s / training s / test accuracy | "
            "uncached: wall s / training s / test accuracy | wall speed-up | accuracy difference (points) |",
            "|---|---|---|---|---|---|"]
    name = "effnet_lite0_head"
    kw = dict(data=DATA, epochs=3 if quick else 10)
    summary = []
    for cfg in configs:
        label, extra = B3_CONFIGS[cfg]
        acc = {"cached": [], "uncached": []}
        speed = []
        for seed in seeds:
            a = run_recipe_py(name, **kw, **{"cache_features": "auto", **extra}, seed=seed)
            b = run_recipe_py(name, **kw, **{**extra, "cache_features": "off"}, seed=seed)
            assert a["config"]["speed"]["cached_features"] and not b["config"]["speed"]["cached_features"]
            ma, mb = a["metrics"], b["metrics"]
            acc["cached"].append(ma["accuracy"])
            acc["uncached"].append(mb["accuracy"])
            speed.append(b["wall"] / a["wall"])
            rows.append(f"| {name}, {label} | {seed} | {a['wall']:.0f} / {ma['train_seconds']:.0f} / {ma['accuracy']:.4f} | "
                        f"{b['wall']:.0f} / {mb['train_seconds']:.0f} / {mb['accuracy']:.4f} | {speed[-1]:.1f}x | "
                        f"{100 * (ma['accuracy'] - mb['accuracy']):+.2f} |")
            print(rows[-1], flush=True)
        ca, ua = statistics.mean(acc["cached"]), statistics.mean(acc["uncached"])
        summary.append(f"- {label}: wall speed-up min/median {mm(speed)}x (target >= 5x); mean test accuracy cached "
                       f"{ca:.4f} vs uncached {ua:.4f}, {100 * (ca - ua):+.2f} points over {len(seeds)} seed(s) "
                       f"(target within 1); uncached seed-to-seed range {100 * (max(acc['uncached']) - min(acc['uncached'])):.2f} points.")
    return "\n".join(rows + [""] + summary)


def bench4(quick):
    m = make_model("resnet18.tv_in1k")
    flops = train_flops_per_image(m, 224)
    rows = ["| batch | train img/s (bf16, channels-last) | achieved GFLOP/s | bf16 matmul peak GFLOP/s (2048^2) | fraction of peak (medians) |",
            "|---|---|---|---|---|"]
    peak = matmul_peak(torch.bfloat16, reps=3 if quick else 7)
    for bs in ((32,) if quick else (16, 32, 64)):
        rates = step_rate(m, bs, 224, fast=True, reps=2 if quick else 3)
        g = [r * flops / 1e9 for r in rates]
        rows.append(f"| {bs} | {mm(rates)} | {mm(g)} | {mm(peak)} | {statistics.median(g) / statistics.median(peak):.0%} |")
        print(rows[-1], flush=True)
    rows.append("\nWhere a bf16 channels-last step spends its time (torch profiler, batch 32, top ops by self CPU):\n")
    rows.append("```\n" + profile_step(m, 32) + "\n```")
    rows.append(f"\nResNet-18 at 224 px: {flops / 1e9:.2f} GFLOP per training image (forward + backward, torch's "
                f"FLOP counter, 2 FLOPs per multiply-add). fp32 matmul peak here: {mm(matmul_peak(torch.float32, reps=3))} GFLOP/s.")
    return "\n".join(rows)


def bench5(quick):
    import shutil

    import pandas as pd
    from covid_fastai.data import find_xray_folders
    counts = find_xray_folders(DATA).counts()
    n_train, n_valid = sum(counts["train"].values()), sum(counts["valid"].values())
    k = 16 if quick else 32  # images per class in each subset split
    rows = [f"Seconds per image measured with 1 epoch on a subset ({2 * k} train and {2 * k} valid images of the "
            f"shared data), extrapolated to {n_train} train + {n_valid} valid images x 10 epochs. With cached "
            "features the body runs once per view (2) over train and once over valid; the head's epochs are "
            "measured and scaled.", "",
            "| recipe | mode | train s/img (body pass when cached) | valid s/img | extrapolated 10-epoch hours |",
            "|---|---|---|---|---|"]
    sub = Path(tempfile.mkdtemp(prefix="bench-subset-"))
    for split in ("train", "valid"):
        for c in ("infected", "normal"):
            (sub / split / c).mkdir(parents=True)
            for f in sorted((DATA / split / c).iterdir())[:k]: os.symlink(f, sub / split / c / f.name)
    total = {"default": 0.0, "fastai defaults": 0.0}
    for name in ("vgg16_head", "vgg16_partial", "vgg16_few", "vgg16_full"):
        for mode, extra in (("default", {}), ("fastai defaults", {"bf16": "false", "channels_last": "false",
                                                                    "cache_features": "false"})):
            r = run_recipe_py(name, data=sub, epochs=1, **extra)
            h = pd.read_csv(Path(r["config"]["run_dir"]) / "history.csv")
            va = (h["epoch_seconds"].iloc[0] - h["train_seconds"].iloc[0]) / (2 * k)
            cf = r["config"]["speed"]["cached_features"]
            if cf:
                tr = cf["seconds"] / (cf["views"] * 2 * k + 2 * k)  # one body pass over one image
                head_epoch = h["train_seconds"].iloc[0] * n_train / (2 * k)
                hours = (tr * (cf["views"] * n_train + n_valid) + 10 * (head_epoch + va * n_valid)) / 3600
            else:
                tr = h["train_seconds"].iloc[0] / (2 * k)
                hours = 10 * (n_train * tr + n_valid * va) / 3600
            total[mode] += hours
            rows.append(f"| {name} | {mode} | {tr:.3f} | {va:.4f} | {hours:.2f} |")
            print(rows[-1], flush=True)
    shutil.rmtree(sub, ignore_errors=True)
    rows.append(f"\nWhole VGG-16 grid, extrapolated: default {total['default']:.2f} h, fastai defaults "
                f"{total['fastai defaults']:.2f} h ({total['fastai defaults'] / max(total['default'], 1e-9):.1f}x).")
    return "\n".join(rows)


def bench6(quick):
    "Data path: decode-once cache and loader workers; per-item augmentation on PIL uint8 vs torchvision tensors."
    import numpy as np
    import torchvision.transforms as TV
    import torchvision.transforms.v2 as V2
    from PIL import Image

    from covid_fastai import data as D
    from covid_fastai.augment import make_aug
    f = D.find_xray_folders(DATA)
    rows = ["| loader | pass | images/s (one full training epoch of loading, seed augmentation, 224 px) |", "|---|---|---|"]
    for nw in (0, 1, 2):
        D._DECODED.clear(); D._DECODED_BYTES[0] = 0
        dls = D.xray_dls(f, make_aug("seed", 224), bs=64, num_workers=nw, persistent_workers=nw > 0)
        for ep in range(1 if quick else 2):
            t = time.perf_counter(); n = sum(len(yb) for _, yb in dls.train)
            rows.append(f"| {nw} workers | {'first (pixels from the decode store, built when the loaders were made)' if ep == 0 else 'second'} | "
                        f"{n / (time.perf_counter() - t):.0f} |")
            print(rows[-1], flush=True)
    im = TV.Resize(256)(Image.open(f.files("train")[0]).convert("L"))
    pil = TV.Compose([TV.RandomRotation(30), TV.RandomResizedCrop(224), TV.RandomHorizontalFlip()])
    ten = V2.Compose([V2.RandomRotation(30), V2.RandomResizedCrop(224, antialias=True), V2.RandomHorizontalFlip()])
    x = torch.from_numpy(np.asarray(im))[None]
    for name, fn, inp in (("PIL, uint8 grayscale", pil, im), ("torchvision v2 on a uint8 tensor (1 channel)", ten, x)):
        rates = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(200): fn(inp)
            rates.append(200 / (time.perf_counter() - t))
        rows.append(f"| augmentation only: {name} | - | {mm(rates)} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller subsets (a smoke run)")
    ap.add_argument("--only", default="1,2,3,4,5,6", help="which measurements, e.g. 1,4")
    ap.add_argument("--b3-configs", default="seed,bn_freeze,modern", help=f"measurement 3: of {list(B3_CONFIGS)}")
    ap.add_argument("--b3-seeds", default="42,1,2", help="measurement 3: seeds (cached and uncached run per seed)")
    args = ap.parse_args()
    which = [int(x) for x in args.only.split(",")]
    os.environ.setdefault("COVID_FASTAI_CACHE", tempfile.mkdtemp(prefix="bench-cache-"))  # cold feature cache
    titles = {1: "Train-step images/s: library default vs fastai defaults",
              2: "End-to-end epoch vs pure train step", 3: "Head-only recipe: cached features vs none",
              4: "Achieved training GFLOP/s vs bf16 matmul peak", 5: "VGG-16 seed grid wall time (extrapolated)",
              6: "Data path: decode-once cache, loader workers, augmentation kernels"}
    b3 = lambda q: bench3(q, args.b3_configs.split(","), [int(x) for x in args.b3_seeds.split(",")])
    fns = {1: bench1, 2: bench2, 3: b3, 4: bench4, 5: bench5, 6: bench6}
    tag = args.only.replace(",", "-") + ("" if args.b3_configs == "seed,bn_freeze,modern" or 3 not in which
                                         else "-" + args.b3_configs.replace(",", "-"))
    out = OUT if args.only == "1,2,3,4,5,6" else OUT.with_name(f"results-only-{tag}.md")
    parts = [f"# Benchmarks\n\nRun: `python bench/bench.py{' --quick' if args.quick else ''}"
             f"{'' if out == OUT else ' --only ' + args.only}"
             f"{'' if 3 not in which else f' --b3-configs {args.b3_configs} --b3-seeds {args.b3_seeds}'}` on "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}.\n\nMachine: {machine()}\n\n"
             "Figures are min / median over repeats.\n"]
    for i in which:
        print(f"== {i}. {titles[i]}", flush=True)
        t = time.perf_counter()
        parts.append(f"## {i}. {titles[i]}\n\n{fns[i](args.quick)}\n\n(took {time.perf_counter() - t:.0f} s)\n")
        out.write_text("\n".join(parts))  # keep what is done if a later part fails
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
