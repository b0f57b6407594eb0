"""Test-time augmentation passes against accuracy, on cross-validation folds (not a test):
python bench/tta_passes.py CV_DIR [CV_DIR ...] [--n 0,1,2,4] -> bench/results-tta.md

Each finished fold run of each cv folder is rebuilt from its config.json and model.safetensors (as `evaluate`
rebuilds a run) and re-scores its own held-out fold: with no TTA (n = 0: one plain pass) and with fastai's
`Learner.tta` at n augmented passes (n + 1 passes: the mean of n augmented predictions mixed 0.75 / 0.25 with the
plain one; recipes run n = 4). `N:AUG` draws the augmented passes from augmentation policy AUG instead of the
recipe's (its `tta_aug`, else its training augmentation; `4:xray`: `best`'s crops and rotations without the erasing
and contrast jitter of its training; the plain pass is the same). `...@SIZE` evaluates at SIZE px instead of the
run's size (`4:xray@256`: the whole film at 256 px, FixRes's larger test resolution; the network is convolutional
with global pooling, so the same weights take it). The same trained models, so every difference is the evaluation's
alone, paired by fold; seconds are the prediction passes only. One row per n: mean over folds of accuracy
(0.5), ROC AUC and sensitivity at specificity 0.95, the paired difference to the recipes' n = 4, and the ROC AUC
within each source, pooled.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from bench import ROOT, append_results, command_line, machine

OUT = ROOT / "bench" / "results-tta.md"


def fold_runs(cv_dir: Path) -> list[tuple[str, Path]]:
    "(fold tag, run folder) of a cv's finished folds, from its cv.csv."
    table = pd.read_csv(cv_dir / "cv.csv")
    return [(r["fold"], cv_dir / r["run"]) for _, r in table.iterrows()
            if isinstance(r["run"], str) and (cv_dir / r["run"] / "model.safetensors").is_file()]


def parse_setting(s: str) -> tuple[int, str | None, int | None]:
    "'4' -> (4, None, None): the recipe's augmentation and size; '4:xray' -> (4, 'xray', None); '0@256' -> (0, None, 256)."
    s, _, size = s.strip().partition("@")
    n, _, aug = s.partition(":")
    return int(n), aug or None, int(size) if size else None


def score_fold(run_dir: Path, settings: list[str], seed: int = 42) -> list[dict]:
    """One row per TTA setting ('4', '4:xray', see `parse_setting`): the fold model's predictions on its held-out fold,
    with their metrics, seconds and sources."""
    from fastai.torch_core import set_seed

    from covid_fastai.augment import tta_dl
    from covid_fastai.ensemble import valid_learner
    from covid_fastai.evaluate import load_run
    from covid_fastai.learner import resolve_data, tta_aug
    from covid_fastai.metrics import binary_metrics, positive_view
    from covid_fastai.recipes import with_overrides
    d, cfg, rec = load_run(run_dir)
    fold_dir = Path(resolve_data(rec.data))
    at_size = {None: (rec, valid_learner(d, cfg, rec))}  # size -> (recipe, Learner) evaluating at that size
    items = list(at_size[None][1].dls.valid.items)
    labels = pd.read_csv(fold_dir / "labels.csv", keep_default_na=False)
    source = dict(zip(labels["file"], labels["source"]))
    films = [source.get(str(Path(f).relative_to(fold_dir)), "") for f in items]
    rows = []
    for setting in settings:
        n, aug, size = parse_setting(setting)
        if size not in at_size:
            # a run that recorded its short side keeps its ratio to the crop (the seed policy's 256 / 224)
            rec_at = with_overrides(rec, size=size, **({} if rec.resize is None else
                                                       {"resize": round(rec.resize * size / rec.size)}))
            at_size[size] = rec_at, valid_learner(d, cfg, rec_at)
        rec_at, learn = at_size[size]
        assert list(learn.dls.valid.items) == items  # the same films, in the same order, at every size
        dl = tta_dl(learn.dls.valid, tta_aug(rec_at if aug is None else with_overrides(rec_at, tta_aug=aug)))
        set_seed(seed)  # the augmented passes draw their crops and erasing from the global generators
        t = time.perf_counter()
        probs, targs = learn.tta(dl=dl, n=n) if n else learn.get_preds(dl=dl)
        seconds = time.perf_counter() - t
        _, p, y = positive_view(list(dl.vocab), probs.float().numpy(), targs.numpy())
        m = binary_metrics(y, p)
        rows.append({"setting": setting, "n": n, "aug": aug, "size": size, "seconds": seconds, "films": len(y),
                     "accuracy": m["accuracy"], "auc": m["roc_auc"], "sens95": m["sens_at_spec95"], "y": y, "p": p,
                     "source": films, "files": [str(f) for f in items]})
    return rows


def label(setting: str) -> str:
    n, aug, size = parse_setting(setting)
    return ("none" if n == 0 else f"n={n}" + (f", aug {aug}" if aug else "")) + (f", {size} px" if size else "")


def summarise(rows: pd.DataFrame, settings: list[str], ref: str) -> list[str]:
    """Markdown rows: per TTA setting, means over folds, paired differences to setting `ref`, seconds, pooled
    within-source AUC."""
    from covid_fastai.cv_report import _source_differences, _source_rows, paired
    sources = sorted({s for ss in rows["source"] for s in ss if s})
    out = [f"| TTA | passes | accuracy (0.5) | ROC AUC | sens at spec 0.95 | "
           f"accuracy − {label(ref)} (ahead/behind, p) | ROC AUC − {label(ref)} (ahead/behind, p) | "
           "prediction s (all folds) | within-source ROC AUC, pooled: " + " / ".join(sources) + " |",
           "|---|---|---|---|---|---|---|---|---|"]

    def folds(setting):
        return {"folds": [{"fold": f"{r.cv}/{r.fold}", "accuracy": r.accuracy, "auc": r.auc}
                          for r in rows[rows["setting"] == setting].itertuples()]}

    def frames(setting):  # one (file, source, y, p) frame per fold, as cv_report pools a cv's folds
        return [pd.DataFrame({"file": r.files, "source": r.source, "y": r.y, "p": r.p})
                for r in rows[rows["setting"] == setting].itertuples()]

    for setting in settings:
        part = rows[rows["setting"] == setting]
        pooled = {r["source"]: r["ROC AUC pooled"] for r in _source_rows(frames(setting))}
        within = ["n/a" if pooled.get(s) is None else f"{pooled[s]:.3f}" for s in sources]
        diffs = []
        for metric in ("accuracy", "auc"):
            if setting == ref: diffs.append("—"); continue
            d = paired(folds(ref), folds(setting), metric)
            diffs.append(f"{d['mean']:+.4f} ({d['ahead']}/{d['behind']}, p {d['p']:.2f})" if d["p"] is not None
                         else f"{d['mean']:+.4f} ({d['ahead']}/{d['behind']})")
        out.append(f"| {label(setting)} | {parse_setting(setting)[0] + 1} | {part['accuracy'].mean():.4f} | "
                   f"{part['auc'].mean():.4f} | {part['sens95'].mean():.4f} | {diffs[0]} | {diffs[1]} | "
                   f"{part['seconds'].sum():.0f} | {' / '.join(within)} |")
    # the same films under two TTA settings: a bootstrap of films within each source, paired (cv_report's)
    out += ["", f"Within-source ROC AUC minus {label(ref)}'s, pooled over folds, with its paired 95% bootstrap "
                "interval:", "",
            "| TTA | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    base = pd.concat(frames(ref), ignore_index=True)
    for setting in settings:
        if setting == ref: continue
        d = _source_differences(base, pd.concat(frames(setting), ignore_index=True))
        cells = ["n/a" if d.get(s, {}).get("difference") is None else
                 f"{d[s]['difference']:+.3f} [{d[s]['low']:+.3f}, {d[s]['high']:+.3f}]" for s in sources]
        out.append(f"| {label(setting)} | " + " | ".join(cells) + " |")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cv_dirs", nargs="+")
    ap.add_argument("--n", default="0,1,2,4", help="augmented passes to try (0: no TTA); N:AUG draws them from "
                                                  "augmentation policy AUG (4:xray); @SIZE evaluates at "
                                                  "SIZE px (4:xray@256)")
    ap.add_argument("--label", default="", help="how the CPU ran, e.g. 'AVX2 emulated' (the section heading)")
    ap.add_argument("--out", default=str(OUT), help="the markdown file the section is appended to")
    a = ap.parse_args(argv)
    settings = [x.strip() for x in a.n.split(",")]
    ref = "4" if "4" in settings else settings[-1]
    from covid_fastai.callbacks import cpu_kind
    records, listed = [], []
    for cv in map(Path, a.cv_dirs):
        runs = fold_runs(cv)
        title = json.loads((cv / "cv.json").read_text()).get("title", cv.name)
        listed.append(f"`{cv}` ({title}; {len(runs)} folds)")
        for fold, run in runs:
            for r in score_fold(run, settings):
                records.append({"cv": cv.name, "fold": fold, **r})
                print(f"{cv.name} {fold} {label(r['setting'])}: accuracy {r['accuracy']:.4f}, AUC {r['auc']:.4f}, "
                      f"{r['seconds']:.1f} s", flush=True)
    rows = pd.DataFrame(records)
    append_results(a.out, [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
                         f"CPU kind `{cpu_kind()}`{f' ({a.label})' if a.label else ''}. {machine()}.", "",
                         command_line("bench/tta_passes.py", argv, a.label), "",
                         f"Fold models of {', '.join(listed)}; {len(rows) // len(settings)} folds, "
                         f"{rows[rows['setting'] == settings[0]]['films'].sum()} held-out films. Differences are "
                         f"paired by fold against {label(ref)} (paired t-test p).", "",
                         *summarise(rows, settings, ref), ""])
    return rows


if __name__ == "__main__":
    main()
