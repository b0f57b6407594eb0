"""Time to accuracy (not a test): python bench/ttacc.py [--short] [--config best --config best:fastai ...] [--data DIR]

For each configuration, one full `recipe` run (a fresh process, as a user would start it) records after every epoch
the seconds since the process started (imports, data and model included) and the VALIDATION accuracy and ROC AUC
(p(infected), all validation images, no TTA); then the run's end-of-run valid accuracy and AUC (with the
recipe's TTA) and its wall time to its end (evaluation, TTA and plots
included). The test split is never read for anything here. Beside each recipe, `NAME:fastai` is the same recipe
with fastai's defaults for speed (fp32, NCHW, one size: `--bf16 false --channels_last false --fp32_size none`). Each run of this script also
records the CPU it ran on (ISA flags, bf16 yes/no) and that run's fp32 and bf16 GEMM peaks as the physical
reference. Appends to bench/results-ttacc.md (`--out`).

Configurations (`--config`, repeated): `NAME[:fastai][:key=value...]`, e.g. `best`, `best:fastai`,
`effnet_lite0_full:policy=modern`, `best:progressive=128:2,160:2`.
`--short`: a smoke run (2 epochs on the first images of each class of train, and of valid with --short-valid).
`--budget SECONDS`: stop each configuration's run at that wall clock and record the epochs it reached ("what does this
recipe reach in N minutes"; a run stopped mid-schedule is not the recipe's end result, and its row says so).
To see an AVX2-only fp32 CPU on an AVX-512/AMX machine, run it under
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` ("AVX2 emulated"; a proxy, not the same machine).
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # the worker's clock starts before its imports, as a user's command does

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench.py's helpers, imported where used (after T0's imports are counted)
DATA = Path(os.environ.get("COVID_FASTAI_REAL_DATA", ROOT.parent / "shared/data/cxr"))
OUT = ROOT / "bench" / "results-ttacc.md"
# fastai's own speed defaults: fp32, NCHW, the recipe's size on every CPU
FASTAI_DEFAULTS = {"bf16": "false", "channels_last": "false", "fp32_size": "none"}


def parse_config(spec: str) -> tuple[str, dict]:
    "'best:fastai:epochs=3' -> ('best', {**FASTAI_DEFAULTS, 'epochs': '3'})"
    name, *parts = spec.split(":")
    rest = []
    for r in parts:  # a value may hold ':' itself (progressive=128:2,160:2): a part without '=' continues it
        if r == "fastai" or "=" in r or not rest: rest.append(r)
        else: rest[-1] += ":" + r
    kw = {}
    for r in rest:
        if r == "fastai": kw.update(FASTAI_DEFAULTS)
        else:
            k, v = r.split("=", 1)
            kw[k] = v
    return name, kw


def epoch_clock(progress: Path | None = None):
    """A fastai callback: after each fit epoch, (seconds since T0, valid accuracy, valid ROC AUC) from its own preds;
    the rows so far are also written to `progress` (JSON), so a run stopped at a budget keeps its curve."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score
    from covid_fastai.callbacks import FitOnlyCallback
    from covid_fastai.metrics import positive_view

    class EpochClock(FitOnlyCallback):
        order = 90

        def before_fit(self): self.rows = []

        def before_validate(self): self.probs, self.targs = [], []

        def after_batch(self):
            if self.training: return
            self.probs.append(torch.softmax(self.pred.float(), 1).detach().cpu())
            self.targs.append(self.yb[0].detach().cpu())

        def after_validate(self):
            if not self.probs: return
            p, y = torch.cat(self.probs).numpy(), torch.cat(self.targs).numpy()
            vocab = getattr(self.dls, "vocab", None) or [str(i) for i in range(p.shape[1])]  # cached head: no vocab
            _, pp, yp = positive_view(list(vocab), p, y)
            auc = float(roc_auc_score(yp, pp)) if len(np.unique(yp)) == 2 else float("nan")
            self.rows.append({"epoch": len(self.rows), "seconds": time.perf_counter() - T0,
                              "valid_accuracy": float((p.argmax(1) == y).mean()), "valid_auc": auc})
            if progress is not None: progress.write_text(json.dumps(self.rows))

    return EpochClock()


def worker(name: str, kw: dict, out: Path, result: Path):
    "One run in this process; writes its per-epoch rows, wall time and speed record to `result` (JSON)."
    from covid_fastai.recipes import load_recipe, with_overrides
    from covid_fastai.train import run
    clock = epoch_clock(progress_file(result))
    rec = with_overrides(load_recipe(name), **kw)
    d = run(rec, out=out, cbs=[clock])
    cfg = json.loads((d / "config.json").read_text())
    met = json.loads((d / "metrics.json").read_text())
    assert met["split"] == "valid", f"{d} was evaluated on {met['split']}"  # ttacc's data has no test split
    result.write_text(json.dumps({"rows": clock.rows, "wall": time.perf_counter() - T0, "final": met["valid"]["at_0.5"],
                                  "run_wall": met["wall_seconds"], "train_seconds": met["train_seconds"],
                                  "speed": cfg.get("speed"), "run_dir": str(d)}))


def progress_file(result: Path) -> Path: return result.with_suffix(".rows.json")


def run_worker(args: list[str], budget: float | None) -> tuple[int | None, str]:
    """(return code, stderr) of one worker process; None when it was stopped at `budget` seconds (SIGTERM, then
    SIGKILL after 30 s)."""
    w = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = w.communicate(timeout=budget)
        return w.returncode, err
    except subprocess.TimeoutExpired:
        w.terminate()
        try: _, err = w.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            w.kill()
            _, err = w.communicate()
        return None, err


def subset(data: Path, n_per_class: int | None, dest: Path, n_valid: int | None = None) -> Path:
    """A folder of symlinks: the first `n_per_class` training images of each class (sorted names) and the first
    `n_valid` validation images of each class (None: all). No test split: nothing here may read it."""
    for split, n in (("train", n_per_class), ("valid", n_valid)):
        for cls in sorted(p.name for p in (data / split).iterdir() if p.is_dir()):
            files = sorted((data / split / cls).iterdir())[:n]
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files: (dest / split / cls / f.name).symlink_to(f.resolve())
    return dest


def cpu_line() -> str:
    from bench import cpu_flags, machine, matmul_peak, mm
    import torch
    from covid_fastai.callbacks import cpu_kind
    p32 = matmul_peak(torch.float32, reps=3)
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    p16 = matmul_peak(torch.bfloat16, reps=3) if bf16 else None
    emulated = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY")
    flags = cpu_flags()
    host = "AMX" if "amx_tile" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX-512"
    return (f"CPU kind `{cpu_kind()}`" + (f" (AVX2 emulated on the {host} machine: "
                                         f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')}, "
                                         f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')})"
                                         if emulated else "")
            + f". {machine()}. GEMM peaks of this run (2048², GFLOP/s, min / median): fp32 {mm(p32)}"
            + (f", bf16 {mm(p16)}." if p16 else "; bf16: not supported, fp32 only."))


def speed_cell(speed: dict | None) -> str:
    sp = speed or {}
    f = sp.get("fp32_size")
    return (f"bf16 {sp.get('bf16_autocast')}, channels-last {sp.get('channels_last')}"
            + (f", fp32_size {f['size']} px" if f and f.get("used") else ""))


def curve_cell(rows: list[dict]) -> str:
    return "<br>".join(f"{x['epoch']}: {x['seconds']:.0f} s → {x['valid_accuracy']:.4f} / {x['valid_auc']:.4f}"
                       for x in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=None)  # one configuration, repeatable; default best, best:fastai
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--short", action="store_true")  # 2 epochs on a subset of train: a smoke run
    p.add_argument("--short-train", type=int, default=64)  # training images per class in --short
    p.add_argument("--short-valid", type=int, default=None)  # validation images per class in --short (None: all)
    p.add_argument("--budget", type=float, default=None)  # seconds per configuration: stop there, keep its epochs
    p.add_argument("--set", action="append", default=[])  # KEY=VALUE for every configuration (e.g. pretrained=false)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)  # internal: NAME KW_JSON OUT RESULT
    a = p.parse_args(argv)
    if a.worker:
        name, kw, out, res = a.worker
        return worker(name, json.loads(kw), Path(out), Path(res))
    tmp = Path(tempfile.mkdtemp(prefix="ttacc-"))  # the runs and their weights: removed at the end
    try: measure(a, argv, tmp)
    finally: shutil.rmtree(tmp, ignore_errors=True)


def measure(a, argv, tmp: Path):
    "Run each configuration of `a` in a fresh process under `tmp`, and append the table to `a.out`."
    data = Path(a.data)
    # train and valid only: each run then evaluates on valid (with TTA where the recipe has it); test is never read
    data = subset(data, a.short_train if a.short else None, tmp / "data", a.short_valid if a.short else None)
    common = dict(kv.split("=", 1) for kv in a.set)
    if a.short: common = {"epochs": "2", **common}
    from bench import command_line
    lines = ["", f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}" + (" (short: smoke run)" if a.short else ""),
             "", cpu_line(), "",
             command_line("bench/ttacc.py", argv)
             + (f"; data: {a.short_train} training and {a.short_valid or 'all'} validation images per class"
                if a.short else ""),
             "", "| configuration | speed (config.json) | epoch: seconds since start → valid accuracy / AUC | "
                 "end of run: valid accuracy / AUC (recipe's TTA) | train s | wall s (whole run) |", "|---|---|---|---|---|---|"]
    for spec in a.config or ["best", "best:fastai"]:
        name, kw = parse_config(spec)
        kw = {"data": str(data), **common, **kw}
        res = tmp / f"{len(lines)}.json"
        code, err = run_worker([sys.executable, __file__, "--worker", name, json.dumps(kw), str(tmp / "runs"),
                                str(res)], a.budget)
        if code is None:  # stopped at the budget: the curve so far, no end-of-run scores
            rows = json.loads(progress_file(res).read_text()) if progress_file(res).is_file() else []
            cfgs = sorted((tmp / "runs").glob("*/*/config.json"), key=lambda f: f.stat().st_mtime)  # this run's: newest
            sp = json.loads(cfgs[-1].read_text()).get("speed") if cfgs else None
            lines.append(f"| {spec} | {speed_cell(sp)} | {curve_cell(rows) or 'no epoch finished'} | "
                         f"stopped at the budget ({a.budget:.0f} s) after {len(rows)} epochs: not the recipe's end | "
                         f"— | {a.budget:.0f} |")
            print(lines[-1], flush=True)
            continue
        if code:
            lines.append(f"| {spec} | failed: {err.strip().splitlines()[-1] if err.strip() else code} | | | | |")
            print(err[-3000:], file=sys.stderr)
            continue
        o = json.loads(res.read_text())
        speed = speed_cell(o["speed"])
        curve = curve_cell(o["rows"])
        fin = f"{o['final']['accuracy']:.4f} / {o['final']['roc_auc']:.4f}"
        lines.append(f"| {spec} | {speed} | {curve} | {fin} | {o['train_seconds']:.0f} | {o['wall']:.0f} |")
        print(lines[-1], flush=True)
    from bench import append_results
    append_results(a.out, lines)


if __name__ == "__main__":
    main()
