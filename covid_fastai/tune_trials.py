"""One tune's trials: the Optuna storage and objective, the per-epoch pruning signal, and the local and Ray engines.

A trial is an ordinary run (`train.run`) of the tune's recipe with the trial's settings (and the proxies), evaluated
on the validation split only (`evaluate_on="valid"`); its value is `metrics.json` `valid.at_0.5.<metric>`. Optuna's
fastai integration (`FastAIPruningCallback`) watches the recorder's per-epoch `valid_roc_auc` (added by
`EpochRocAuc`: the objective's own measure) or `valid_accuracy`.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path

import numpy as np
from fastai.callback.core import Callback
from fastai.learner import Recorder
from fastai.metrics import AccumMetric, ActivationType

from .errors import MissingExtra, RecipeError
from .metrics import positive_view
from .ray_engine import need_ray, ray_session, remote, use_threads
from .recipes import Recipe, recipe_from_dict, with_overrides
from .rundir import RunDir, one_line

__all__ = ["METRICS", "TUNE_FILE", "need_optuna", "storage", "load_study", "EpochRocAuc", "pruning_callback",
           "make_pruner", "trial_recipe", "objective", "run_trials", "need_ray", "run_ray", "finished"]

TUNE_FILE = "tune.json"
METRICS = ("roc_auc", "accuracy", "balanced_accuracy", "pr_auc", "sens_at_spec95")  # all: higher is better


def need_optuna():
    "optuna and its fastai integration, or a one-line MissingExtra naming the extra to install."
    try:
        import optuna
        import optuna_integration.fastaiv2  # noqa: F401 (needs fastai: fails here, not in trial 1)
    except ImportError as e:
        raise MissingExtra(e.name or "optuna", "tune", "tune") from None
    return optuna


def _suggest(trial, name: str, spec):
    kind, *args = spec
    if kind == "choice": return trial.suggest_categorical(name, list(args[0]))
    if kind == "int": return trial.suggest_int(name, int(args[0]), int(args[1]))
    return trial.suggest_float(name, float(args[0]), float(args[1]), log=kind == "log")


# -- pruning: Optuna's fastai integration, fitted to our runs ------------------------------------------------------
def _roc_auc_of(vocab):
    def roc_auc(probs, targs):  # as metrics.json's: ROC AUC of p(positive), covid_fastai.metrics.positive_view
        from sklearn.metrics import roc_auc_score
        _, p, y = positive_view(list(vocab), np.asarray(probs), np.asarray(targs))
        return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return roc_auc


class EpochRocAuc(Callback):
    """Adds the ROC AUC of p(positive) (the objective's measure) to the fitting Learner's metrics for the fit, so
    the recorder logs `valid_roc_auc` each epoch (and history.csv keeps it) and the pruner can watch it.
    Our Learners log accuracy and F1 only; fastai's `RocAucBinary` scores the last class, not the positive view."""
    order = Recorder.order - 1  # the recorder reads the metric names in its own before_fit

    def before_fit(self):
        self._old = self.learn.metrics
        self.learn.metrics = [*self._old, AccumMetric(_roc_auc_of(self.dls.vocab), dim_argmax=-1, to_np=True,
                                                      activation=ActivationType.Softmax, flatten=False)]

    def after_fit(self): self.learn.metrics = self._old


@functools.lru_cache(maxsize=None)
def _pruning_class():
    need_optuna()
    from optuna_integration import FastAIPruningCallback as base

    class TrialPruning(base):
        """`optuna_integration.FastAIPruningCallback` given the metric's plain name (`roc_auc`, `accuracy`).

        The integration asserts `monitor` is one of the recorder's names; our runs log train metrics too, so the
        recorder calls the validation columns `valid_<name>` (a plain `accuracy` would fail its assert). Otherwise it
        is used as it is: it reports the value after each epoch and ends the fit (CancelFitException, then
        `optuna.TrialPruned` from after_fit) when the pruner says so."""
        def __init__(self, trial, metric: str = "roc_auc"):
            super().__init__(trial, monitor=metric)
            self.metric = metric

        def before_fit(self):
            names = list(self.recorder.metric_names[1:])
            self.monitor = f"valid_{self.metric}" if f"valid_{self.metric}" in names else self.metric
            super().before_fit()
    return TrialPruning


def pruning_callback(trial, metric: str = "roc_auc"):
    "Optuna's fastai pruning callback for `trial`, watching the recorder's per-epoch `valid_<metric>`."
    return _pruning_class()(trial, metric)


def make_pruner(spec: dict):
    "An Optuna pruner from tune.json's spec: {'kind': 'median'|'none', 'n_startup_trials', 'n_warmup_steps'}."
    optuna = need_optuna()
    if spec["kind"] == "none": return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=spec.get("n_startup_trials", 2),
                                       n_warmup_steps=spec.get("n_warmup_steps", 1))


# -- the study ------------------------------------------------------------------------------------------------------
def storage(tune_dir):
    "The tune's Optuna storage: SQLite in the tune folder, with heartbeats (a dead worker's trial is failed)."
    optuna = need_optuna()
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna; they are what fails a lost trial
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(f"sqlite:///{Path(tune_dir).resolve() / 'study.db'}", heartbeat_interval=60,
                                          grace_period=180, engine_kwargs={"connect_args": {"timeout": 60}})


def load_study(tune_dir, plan: dict, pruner=None, worker: int = 0):
    """The tune's study with a TPE sampler and the plan's pruner (or `pruner`). The sampler's seed is the plan's
    plus the trials so far and the worker's index: a resumed tune or a second worker must not draw again the
    settings the first one drew (the same seed would repeat its random start-up trials)."""
    optuna = need_optuna()
    study = optuna.load_study(study_name=plan["study"], storage=storage(tune_dir),
                              pruner=pruner if pruner is not None else make_pruner(plan["pruner"]))
    seed = plan["seed"] + len(study.get_trials(deepcopy=False)) + 1009 * worker
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    return study


def trial_recipe(plan: dict, params: dict, proxies: bool = True) -> Recipe:
    "The recipe a trial runs: the tune's recipe, the trial's settings, and (proxies=True) the proxies on top."
    return with_overrides(recipe_from_dict(plan["recipe"]), **params, **(plan["proxy_overrides"] if proxies else {}))


def objective(tune_dir: Path, plan: dict, cbs=()):
    "The Optuna objective: one run folder per trial, evaluated on valid; returns valid `plan['metric']`."
    optuna = need_optuna()
    from .train import run

    def f(trial):
        params = {k: _suggest(trial, k, spec) for k, spec in plan["space"].items()}
        rec = trial_recipe(plan, params)
        prune = pruning_callback(trial, plan["monitor"])
        try:
            d = run(rec, out=tune_dir / "runs", cbs=[EpochRocAuc(), prune, *cbs], evaluate_on="valid",
                    started=lambda p: trial.set_user_attr("run_dir", str(p)))
        except optuna.TrialPruned:
            rd = trial.user_attrs.get("run_dir")
            if rd: RunDir.open(rd).mark("pruned", pruned_after_epoch=int(prune.epoch))
            raise
        except BaseException as e:  # recorded with the trial (FAIL), for trials.md
            trial.set_user_attr("error", "interrupted" if isinstance(e, KeyboardInterrupt) else one_line(e))
            raise
        valid = json.loads((d / "metrics.json").read_text())["valid"]["at_0.5"]
        trial.set_user_attr("valid", {k: valid.get(k) for k in METRICS})
        v = valid.get(plan["metric"])
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise RecipeError(f"{d}: valid {plan['metric']} is undefined (one class in the validation split?)")
        return float(v)
    return f


def run_trials(tune_dir: Path, plan: dict, n: int, pruner=None, cbs=(), worker: int = 0):
    "Run trials in this process until the study has `plan['trials']` finished (complete or pruned) ones, n at most."
    need_optuna()
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    study = load_study(tune_dir, plan, pruner, worker)
    stop = MaxTrialsCallback(plan["trials"], states=(TrialState.COMPLETE, TrialState.PRUNED))
    # a failed trial (bad settings, a crash) is recorded and the search goes on; Ctrl-C stops it (recorded FAIL)
    study.optimize(objective(tune_dir, plan, cbs), n_trials=n, callbacks=[stop], catch=(Exception,),
                   gc_after_trial=True)


def _worker(tune_dir: str, n: int, threads: float, worker: int):  # one Ray task: an Optuna worker on the shared storage
    use_threads(threads)
    tune_dir = Path(tune_dir)
    run_trials(tune_dir, json.loads((tune_dir / TUNE_FILE).read_text()), n, worker=worker)
    return n


def run_ray(tune_dir: Path, plan: dict, n: int):
    "Trials as Ray tasks, `workers` at once, each declaring `cpus_per_trial` CPUs; joins `address` or starts Ray."
    eng = plan["engine"]
    with ray_session(eng["address"], eng["cpus"]) as ray:
        cpus = eng["cpus_per_trial"]
        workers = eng["workers"] or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
        workers = max(1, min(workers, n))
        task = remote(_worker, cpus=cpus)
        per = math.ceil(n / workers)
        ray.get([task.remote(str(tune_dir), per, cpus, w) for w in range(workers)])


def counts(study) -> dict:
    from collections import Counter
    return dict(Counter(t.state.name for t in study.get_trials(deepcopy=False)))


def finished(study) -> int:
    c = counts(study)
    return c.get("COMPLETE", 0) + c.get("PRUNED", 0)
