"""The run folder: one object that creates, opens, locks and records a run (config.json, metrics.json).

A run writes `outputs/<recipe>/<UTC timestamp>[-k]/`; a new run never reuses a folder. config.json says what the
run is and how it ended: its `status` is `running`, then `complete`, `interrupted` or `failed`. `RunDir` is the
one place that reads that status and rebuilds the exact `Recipe` a run used.
"""
from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .errors import Command, RunFolderError
from .files import folder_lock, write_json
from .fit import mom_trained_with
from .recipes import Recipe, recipe_from_dict

__all__ = ["OUTPUTS", "CHECKPOINT", "CONFIG", "RunDir", "new_run_dir", "run_status", "trained_size",
           "recipe_from_config", "open_unfinished", "run_summary"]

OUTPUTS = Path(os.environ.get("COVID_FASTAI_OUTPUTS", "outputs"))
CHECKPOINT = "checkpoint.pt"  # written after every finished epoch, removed once the run is complete
CONFIG = "config.json"

_WRITABLE = "pass --out DIR somewhere writable"


def _now() -> str: return datetime.now(timezone.utc).isoformat()


def one_line(e: BaseException, limit: int = 500) -> str:
    "An exception as one line (fastai wraps callback errors in a multi-line message), as config.json records it."
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}"[:limit] if msg else type(e).__name__


def new_run_dir(root, name: str) -> Path:
    "A fresh `root/name/<UTC timestamp>[-k]/`; `mkdir` without exist_ok makes concurrent runs distinct."
    base = Path(root).expanduser().absolute() / name  # absolute: fastai joins a Learner's relative path twice
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create output folder {base}: {e.strerror}", _WRITABLE, path=base) from None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        d = base / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
        except OSError as e:
            raise RunFolderError(f"cannot create run folder {d}: {e.strerror}", _WRITABLE, path=d) from None
    raise RunFolderError(f"too many runs of {name} in the same second under {base}", path=base)


def run_status(run_dir) -> str | None:
    "A run folder's status from its config.json ('complete', 'interrupted', ...), None if it never wrote one."
    cfg = Path(run_dir) / CONFIG if run_dir else None
    if cfg is None or not cfg.is_file(): return None
    return json.loads(cfg.read_text()).get("status")


def trained_size(run_dir) -> int | None:
    """The input size a run trained at (config.json's `recipe.size`: a recipe's `fp32_size` makes it the CPU's choice),
    None if it never wrote a config."""
    cfg = Path(run_dir) / CONFIG if run_dir else None
    if cfg is None or not cfg.is_file(): return None
    return int(json.loads(cfg.read_text())["recipe"]["size"])


def open_unfinished(folder, manifest: str, what: str, example: str, summary) -> tuple[Path, dict]:
    """(folder, its parsed `manifest` file) of a sweep/cv/tune folder to carry on; `RunFolderError` when it is not
    one (`what`, e.g. 'sweep', and `example`, a folder it would be) or has finished (pointing at `summary(folder,
    manifest)`, its report)."""
    folder = Path(folder).expanduser().resolve()
    f = folder / manifest
    if not f.is_file():
        raise RunFolderError(f"{folder} is not a {what} folder (no {manifest})",
                             f"pass a folder a {what} created, e.g. {example}", path=folder)
    m = json.loads(f.read_text())
    if m.get("status") == "complete":
        raise RunFolderError(f"{folder} finished already (status complete)", f"its summary is {summary(folder, m)}",
                             path=folder)
    return folder, m


def recipe_from_config(config: dict) -> Recipe:
    "The exact `Recipe` a run used, from its config.json (its data path as recorded, absolute)."
    from .augment import ASSIGNMENT_RESIZE_RATIO
    rec = recipe_from_dict(config["recipe"])
    # the short side the run used; runs before it was recorded all used size*256/224
    resize = rec.resize or config["data"].get("resize") or round(rec.size * ASSIGNMENT_RESIZE_RATIO)
    return dataclasses.replace(rec, data=config["data"]["path"], resize=resize, mom=mom_trained_with(config))


def run_summary(run_dir) -> str:
    "One line for a finished run: its split accuracy, F1 per class and training time."
    run_dir = Path(run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    f1 = ", ".join(f"F1 {c} {v['f1']:.3f}" for c, v in m["per_class"].items())
    return (f"{run_dir}: {m['split']} accuracy {m['accuracy']:.4f}, {f1}; "
            f"trained {m['train_seconds']:.0f} s at {m['train_images_per_s']:.1f} images/s")


@dataclasses.dataclass
class RunDir:
    """One run's folder and its config.json (`config`, kept in memory and written whole, atomically, on `save`).

    `RunDir.new(root, name)` makes a fresh folder; `RunDir.open(path)` reads an existing run's config.json."""
    path: Path
    config: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def new(cls, root, name: str) -> RunDir: return cls(new_run_dir(root, name))

    @classmethod
    def open(cls, path) -> RunDir:
        path = Path(path).expanduser().absolute()
        if not (path / CONFIG).is_file():
            raise RunFolderError(f"{path} is not a run folder (no {CONFIG})",
                                 "pass a folder a run created, e.g. outputs/<recipe>/<timestamp>", path=path)
        return cls(path, json.loads((path / CONFIG).read_text()))

    def __truediv__(self, name) -> Path: return self.path / name
    def __str__(self): return str(self.path)

    @property
    def status(self) -> str | None: return self.config.get("status")
    @property
    def name(self) -> str: return self.config["recipe"]["name"]
    @property
    def checkpoint(self) -> Path: return self.path / CHECKPOINT
    @property
    def resume_command(self) -> Command: return Command("resume", (str(self.path),))

    def recipe(self) -> Recipe: return recipe_from_config(self.config)

    def lock(self):
        "One process at a time per run folder (a resume while the run still goes); released when the process dies."
        return folder_lock(self.path, RunFolderError(
            f"{self.path} is in use by another process (a run or resume still going)",
            "wait for it or stop it first", path=self.path))

    def save(self) -> Path:
        "Write config.json atomically: readers see the previous one or the whole new one."
        return write_json(self.path / CONFIG, self.config)

    def write_json(self, name: str, obj) -> Path: return write_json(self.path / name, obj)

    def start(self, recipe: Recipe, from_epoch: int = 0) -> dict:
        """config.json for a run starting (or, from_epoch > 0, resuming): status `running`; what a resumed folder
        recorded before is kept, less its last fate (error, resume advice, stop time)."""
        old, resuming = self.config, from_epoch > 0
        self.config = {
            **{k: v for k, v in old.items() if k not in ("error", "resume", "stopped")},
            "recipe": {**dataclasses.asdict(recipe), "plan": {**dataclasses.asdict(recipe.plan),
                                                              "description": recipe.plan.describe()}},
            "status": "running", "run_dir": str(self.path),
            "created": old.get("created", _now()),
            "resumed": old.get("resumed", []) + ([{"at": _now(), "from_epoch": from_epoch}] if resuming else []),
        }
        self.save()  # from here on the folder says what it is
        return self.config

    def mark(self, status: str, **fields):
        "Record the run's fate in config.json; best effort (a full disk may refuse even this)."
        self.config.update(status=status, **fields, stopped=_now())
        try: self.save()
        except OSError: pass

    def complete(self, report=None, **fields):
        """Mark the run complete: `fields` and the finish time join config, `report(config)` writes what reads it,
        and config.json is saved last ('complete' only once everything is written); the checkpoint goes."""
        self.config.update(status="complete", finished=_now(), **fields)
        if report is not None: report(self.config)
        self.save()
        self.checkpoint.unlink(missing_ok=True)  # nothing left to resume; model.safetensors has the weights
