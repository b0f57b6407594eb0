"""Ray plumbing shared by `sweep`/`cv --engine ray` and `tune --engine ray`: import, start or join, each task's
resources, and the shutdown.

- `ray_session(address, cpus)`: joins the cluster at `address` ('auto', 'HOST:6379' or 'ray://HOST:10001'), or starts
  a local Ray of `cpus` CPUs (default: all), for a `with` block; shut down at its end only if it started it. An
  already initialised Ray (a notebook, a test) is used as it is.
- Workers import the driver's checkout of this package: a local Ray gets the driver's `sys.path` as PYTHONPATH (an
  editable or uninstalled checkout, no upload); a cluster gets this package's folder through `py_modules`, uploaded
  by Ray, so every node runs the driver's code. Its dependencies (fastai, timm, torch) must be installed on the
  nodes, and the data and output folders must be at the same path on every node (a shared file system): a run
  writes its folder where the driver will read it.
- `remote(fn, cpus, gpus)`: `fn` as a Ray task declaring its CPUs and GPUs, never retried (a run that failed
  once fails again; its folder says why). `use_threads(cpus)` in the task sets torch's threads to its CPUs.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from .errors import MissingExtra, RecipeError, UserError, first_line

__all__ = ["ENGINES", "need_ray", "check_engine", "runtime_env", "ray_session", "remote", "use_threads"]

ENGINES = ("local", "ray")  # local: one run after another in this process


def need_ray(what: str = "--engine ray"):
    "ray, or a one-line MissingExtra naming the extra to install."
    try:
        import ray
    except ImportError:
        raise MissingExtra("ray", "dist", what) from None
    return ray


def check_engine(engine: str, cpus: float = 1, gpus: float = 0, per: str = "run"):
    """A one-line RecipeError for an unknown engine or an impossible resource need; ray must be importable for
    'ray' (checked before any folder is made). per: 'run' or 'trial', as the CLI option says."""
    if engine not in ENGINES: raise RecipeError(f"--engine must be {' or '.join(ENGINES)}, got {engine!r}")
    for name, v, least in ((f"cpus_per_{per}", cpus, 0.01), (f"gpus_per_{per}", gpus, 0)):
        try: ok = float(v) >= least and math.isfinite(float(v))
        except (TypeError, ValueError): ok = False
        if not ok: raise RecipeError(f"--{name} must be a number >= {least:g}, got {v!r}")
    if engine == "ray": need_ray()


def runtime_env(address: str | None) -> dict:
    "What Ray's workers need to import this checkout (see the module docstring)."
    if not address:
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
    return {"py_modules": [str(Path(__file__).resolve().parent)]}


@contextlib.contextmanager
def ray_session(address: str | None = None, cpus: int | None = None):
    """Ray for the `with` block: joins `address`, else starts a local Ray of `cpus` CPUs (None: all); shut down at
    the end if started here. Yields the `ray` module."""
    ray = need_ray()
    if address and not _reachable(address):
        raise UserError(f"cannot join the Ray cluster at {address}: nothing answers there",
                        "start it (`ray start --head` there, `ray status` shows its address), or drop --address "
                        "for a local Ray")
    if ray.is_initialized():
        yield ray
        return
    main = threading.current_thread() is threading.main_thread()
    term = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=True,
                 runtime_env=runtime_env(address), **({} if address else {"num_cpus": cpus}))
    except ConnectionError as e:  # no cluster there, or one that refused us (Ray's auth token)
        raise UserError(f"cannot join the Ray cluster at {address}: {first_line(e)}",
                        "start it (`ray start --head` there, `ray status` shows its address and state), or drop "
                        "--address for a local Ray") from None
    # ray.init makes SIGTERM exit at once; keep the caller's handler (the CLI's turns it into Ctrl-C: runs marked
    # interrupted, the sweep resumable)
    if term is not None: signal.signal(signal.SIGTERM, term)
    try:
        yield ray
    finally:
        ray.shutdown()


def _reachable(address: str, timeout: float = 5) -> bool:
    "Whether HOST:PORT (or ray://HOST:PORT) takes a TCP connection: Ray retries an unreachable address for minutes."
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit(): return True  # 'auto' and the like: Ray finds it, or fails at once
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def remote(fn, cpus: float = 1, gpus: float = 0):
    "`fn` as a Ray task that declares `cpus` CPUs and `gpus` GPUs and is never retried."
    return need_ray().remote(num_cpus=float(cpus), num_gpus=float(gpus), max_retries=0)(fn)


def use_threads(cpus: float):
    "In a task: torch uses as many threads as the CPUs it declared (at least one)."
    import torch
    torch.set_num_threads(max(1, math.ceil(float(cpus))))
