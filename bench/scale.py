"""Scale benchmark: start-up, `check`, peak memory and training speed at 2.4k / 20k / 85k images.

    python bench/scale.py                       # 2400,20000,85000 images, writes bench/results-scale.md
    python bench/scale.py --counts 2400 --out /tmp/x.md

For each count it generates small X-ray-like images (a dark field, two darker lung ellipses, noise; `infected`
adds bright blobs) in ImageFolder layout in a temporary folder outside the repository (removed afterwards), with
a fresh cache folder, then times, each in a new process:

- `check` (`python -m covid_fastai check --data DIR`): cold (nothing scanned yet) and warm;
- a training process, cold (nothing scanned or decoded yet) and warm (pre-scan and decode store from the cold
  one): start-up = process start to the first training batch loaded (imports, pre-scan, loaders with the decode
  store, model, fit set-up), then `--batches` training batches of ResNet-18 (random init) at `--size` px; peak RSS
  (VmHWM) and its anonymous/file-backed parts at the end (/proc/self/status).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def generate(root: Path, n: int, h: int, w: int, seed: int = 0):
    "n images (80/10/10 train/valid/test, two classes), h x w 8-bit PNG; about 0.3 ms each."
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.full((h, w), 40, np.float32)
    for side in (-1, 1):
        base[((xx - w / 2 - side * 0.2 * w) / (0.14 * w)) ** 2 + ((yy - 0.48 * h) / (0.28 * h)) ** 2 < 1] -= 25
    base += 90 * np.exp(-((xx - w / 2) / (0.07 * w)) ** 2)
    blobs = [np.exp(-(((xx - rng.uniform(0.2, 0.8) * w) ** 2 + (yy - rng.uniform(0.3, 0.7) * h) ** 2)
                      / (2 * (0.08 * w) ** 2))) for _ in range(16)]
    for i in range(n):
        split = "train" if i % 10 < 8 else ("valid" if i % 10 == 8 else "test")
        infected = (i // 10) % 2 == 0
        img = base + rng.normal(0, 8, (h, w)).astype(np.float32)
        if infected: img += 60 * blobs[i % 16]
        d = root / split / ("infected" if infected else "normal")
        if i < 20: d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(d / f"{i:06d}.png", compress_level=1)


def proc_status() -> dict:
    "VmHWM (peak RSS), RssAnon, RssFile of this process, in MB."
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"): out[k] = int(v.split()[0]) / 1024
    return out


def child(args):
    "One training process: start-up to the first batch, then a short fit; prints one JSON line."
    t0 = float(os.environ["SCALE_T0"])
    from fastai.callback.core import Callback, CancelFitException

    from covid_fastai.learner import recipe_learner
    from covid_fastai.recipes import load_recipe, with_overrides
    t_import = time.time()
    rec = with_overrides(load_recipe("resnet18_full"), data=args.data, pretrained=False, size=args.size,
                         resize=args.size, bs=args.bs, epochs=1, workers=0)
    learn, folders = recipe_learner(rec)
    t_learner = time.time()
    stamps, ready = [], []

    class Stop(Callback):
        def before_batch(self):
            if not ready: ready.append(time.time())  # the first batch is loaded: start-up ends here

        def after_batch(self):
            stamps.append(time.time())
            if len(stamps) == args.batches + 1: raise CancelFitException

    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=Stop())
    first = stamps[0]  # the first batch includes fastai's one-off set-up: timed from the end of it
    ips = args.batches * args.bs / (stamps[-1] - first)
    print(json.dumps({"import_s": t_import - t0, "learner_s": t_learner - t_import,
                      "startup_s": ready[0] - t0, "img_s": ips, "n_train": len(learn.dls.train_ds),
                      "n_valid": len(learn.dls.valid_ds), **proc_status()}), flush=True)


def aug_cost(n: int = 400) -> float:
    "ms per image for the seed policy's item transforms at 224 px on a 307 x 256 uint8 image (what the store serves)."
    from fastai.vision.all import Pipeline, PILImage, ToTensor
    from PIL import Image

    from covid_fastai.augment import make_aug
    pipe = Pipeline(make_aug("seed", 224).item_tfms() + [ToTensor()], split_idx=0)
    arrs = [np.random.default_rng(i).integers(0, 255, (307, 256), dtype=np.uint8) for i in range(8)]
    for a in arrs: pipe(PILImage(Image.fromarray(a)))
    t = time.perf_counter()
    for i in range(n): pipe(PILImage(Image.fromarray(np.array(arrs[i % 8]))))
    return (time.perf_counter() - t) / n * 1000


def run_child(args, data: Path, env: dict) -> dict:
    # torch threads: on a machine shared with other jobs, 2 OpenMP threads that spin for cores measured 10x slower
    env = {**env, "OMP_NUM_THREADS": str(args.threads), "SCALE_T0": repr(time.time())}
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--size", str(args.size), "--bs", str(args.bs),
           "--batches", str(args.batches)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0: raise SystemExit(f"training process failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def timed_check(data: Path, env: dict) -> float:
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "covid_fastai", "check", "--data", str(data)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0: raise SystemExit(f"check failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.time() - t


def cpu_kind() -> str:
    import torch
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{model}, {os.cpu_count()} cores, flags {' '.join(keep)}, torch {torch.__version__} cpu capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="2400,20000,85000", help="image counts, comma-separated")
    ap.add_argument("--height", type=int, default=72, help="generated image height (px)")
    ap.add_argument("--width", type=int, default=64, help="generated image width (px)")
    ap.add_argument("--size", type=int, default=64, help="training size and resize (px)")
    ap.add_argument("--bs", type=int, default=32, help="batch size")
    ap.add_argument("--batches", type=int, default=5, help="timed training batches (after the first)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--out", default=str(HERE / "results-scale.md"), help="the results file (markdown)")
    ap.add_argument("--aug_cost", action="store_true", help="only print the per-image augmentation cost (1 thread)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child: return child(args)
    if args.aug_cost:
        import torch
        torch.set_num_threads(1)
        return print(f"seed augmentation at 224 px from a 307 x 256 stored image: {aug_cost():.2f} ms per image, "
                     f"load avg {os.getloadavg()[0]:.1f}, on {cpu_kind()}")
    rows, started = [], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for n in (int(c) for c in args.counts.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix=f"covid_scale_{n}_"))
        try:
            env = {**os.environ, "COVID_FASTAI_CACHE": str(tmp / "cache")}
            t = time.time(); generate(tmp / "data", n, args.height, args.width); gen = time.time() - t
            print(f"{n}: generated in {gen:.0f} s", flush=True)
            check_cold = timed_check(tmp / "data", env)
            shutil.rmtree(tmp / "cache")  # the training start-up below is cold: no scan results either
            cold = run_child(args, tmp / "data", env)
            warm = run_child(args, tmp / "data", env)
            check_warm = timed_check(tmp / "data", env)
            store = sum(f.stat().st_size for f in (tmp / "cache" / "decoded").rglob("pixels.u8"))
            row = {"n": n, "load_avg_1min": os.getloadavg()[0], "gen_s": gen, "check_cold_s": check_cold,
                   "check_warm_s": check_warm, "cold": cold, "warm": warm, "store_mb": store / 2 ** 20}
            print(json.dumps(row), flush=True)
            rows.append(row)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    write(args, rows, started)


def write(args, rows, started):
    L = ["| images | check cold / warm (s) | start-up cold / warm (s) | of which imports (s) | peak RSS cold / warm "
         "(MB) | RSS anon / file at end, warm (MB) | decode store (MB) | train img/s cold / warm | load avg |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, w = r["cold"], r["warm"]
        L.append(f"| {r['n']:,} | {r['check_cold_s']:.1f} / {r['check_warm_s']:.1f} | {c['startup_s']:.1f} / "
                 f"{w['startup_s']:.1f} | {c['import_s']:.1f} / {w['import_s']:.1f} | {c['VmHWM']:.0f} / "
                 f"{w['VmHWM']:.0f} | {w['RssAnon']:.0f} / {w['RssFile']:.0f} | {r['store_mb']:.0f} | "
                 f"{c['img_s']:.0f} / {w['img_s']:.0f} | {r['load_avg_1min']:.1f} |")
    text = "\n".join(L)
    cmd = (f"python bench/scale.py --counts {args.counts} --height {args.height} --width {args.width} "
           f"--size {args.size} --bs {args.bs} --batches {args.batches} --threads {args.threads}")
    out = Path(args.out)
    head = (f"<!-- measured {started} by `{cmd}` on {cpu_kind()} -->\n")
    out.write_text(head + text + "\n\n<!-- raw -->\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
