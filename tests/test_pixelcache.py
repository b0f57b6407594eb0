"The shared on-disk decode store (covid_fastai.pixelcache) and DecodeOnce reading it."
import multiprocessing as mp
import os
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_fastai import data as D
from covid_fastai import pixelcache as P
from covid_fastai.augment import make_aug


def _images(root: Path, n: int = 6) -> list[Path]:
    "PNGs of different aspect ratios and modes (8-bit, 16-bit, RGB): what the store must keep exactly."
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        h, w = (40 + 7 * i, 64 - 5 * i) if i % 2 else (64 - 3 * i, 40 + 9 * i)
        if i % 3 == 1: im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
        elif i % 3 == 2: im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
        else: im = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), "L")
        out.append(root / f"im{i}.png")
        im.save(out[-1])
    return out


def test_store_holds_exactly_the_decoded_pixels(tmp_path):
    "Every image at its own shape, byte for byte what decode_resized gives (nothing padded, cropped or rescaled)."
    files = _images(tmp_path / "im")
    store = P.open_or_build(files, 37, lambda f: D.decode_resized(f, 37), root=tmp_path / "c")
    shapes = set()
    for f in files:
        want = D.decode_resized(f, 37)
        got = store.get(f)
        assert got.dtype == np.uint8 and np.array_equal(got, want)
        shapes.add(got.shape)
    assert len(shapes) == len(files) and all(min(s) == 37 for s in shapes)
    assert store.get(tmp_path / "other.png") is None


def test_store_is_reused_and_keyed_by_files_and_size(tmp_path):
    files = _images(tmp_path / "im", 4)
    calls = []
    dec = lambda f: (calls.append(f), D.decode_resized(f, 32))[1]
    a = P.open_or_build(files, 32, dec, root=tmp_path / "c")
    b = P.open_or_build(files, 32, dec, root=tmp_path / "c")
    assert len(calls) == 4 and a.folder == b.folder  # the second open decodes nothing
    c = P.open_or_build(files, 33, lambda f: D.decode_resized(f, 33), root=tmp_path / "c")
    os.utime(files[0], ns=(1, 1))  # another modification time: another key
    d = P.open_or_build(files, 32, dec, root=tmp_path / "c")
    assert len({a.folder, c.folder, d.folder}) == 3 and len(calls) == 8


def test_changed_file_is_not_served_from_the_store(tmp_path):
    files = _images(tmp_path / "im", 3)
    store = P.open_or_build(files, 32, lambda f: D.decode_resized(f, 32), root=tmp_path / "c")
    files[1].write_bytes(files[2].read_bytes())
    assert store.get(files[1]) is None and store.get(files[0]) is not None


def test_a_failed_build_leaves_nothing(tmp_path):
    "A build killed half-way (here: an error on the 3rd image) leaves no store and no temporary folder."
    files = _images(tmp_path / "im", 4)

    def dec(f):
        if f.endswith("im2.png"): raise RuntimeError("killed")
        return D.decode_resized(f, 32)
    with pytest.raises(RuntimeError):
        P.open_or_build(files, 32, dec, root=tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []
    assert len(P.open_or_build(files, 32, lambda f: D.decode_resized(f, 32), root=tmp_path / "c")) == 4


def _slow_decode(f, log):
    with open(log, "a") as fh: fh.write(f"{os.getpid()} {f}\n")
    time.sleep(0.05)
    return D.decode_resized(f, 32)


def _builder(files, root, log, q):
    s = P.open_or_build(files, 32, lambda f: _slow_decode(f, log), root=root)
    q.put((str(s.folder), [s.get(f).tobytes() for f in files]))


def test_concurrent_builders_build_once(tmp_path):
    "Two processes (as two torchrun ranks) asking for the same store at once: one decodes, both read the same pixels."
    files = _images(tmp_path / "im", 8)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_builder, args=(files, tmp_path / "c", tmp_path / "log", q)) for _ in range(2)]
    for p in procs: p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs: p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert got[0] == got[1]
    decoders = {line.split()[0] for line in (tmp_path / "log").read_text().splitlines()}
    assert len((tmp_path / "log").read_text().splitlines()) == 8 and len(decoders) == 1
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")) == [Path(got[0][0]).name]


def test_store_pickles_by_path(tmp_path):
    "What a DataLoader worker (spawn) or an exported learner receives is the folder's path, never the pixels."
    files = _images(tmp_path / "im", 4)
    store = P.open_or_build(files, 48, lambda f: D.decode_resized(f, 48), root=tmp_path / "c")
    blob = pickle.dumps(store)
    assert len(blob) < 1000 < store.pixels.nbytes
    again = pickle.loads(blob)
    assert np.array_equal(again.get(files[3]), store.get(files[3]))
    import shutil
    shutil.rmtree(store.folder)  # an exported learner loaded where the store is not (another machine, a cleared cache)
    gone = pickle.loads(blob)
    assert len(gone) == 0 and gone.get(files[3]) is None


def test_batches_match_without_the_store(tiny_data, monkeypatch):
    "The same seeded training batches whether the pixels come from the store or are decoded per process (today's path)."
    monkeypatch.setattr(D, "_DECODED", {})
    monkeypatch.setattr(D, "_DECODED_BYTES", [0])
    f = D.find_xray_folders(tiny_data)
    batches = []
    for use_store in (True, False):
        dls = D.xray_dls(f, make_aug("seed", 32), bs=8, seed=0)
        if not use_store: D.decode_once(dls).store = None
        torch.manual_seed(0)
        dls.train.rng.seed(0)
        batches.append([xb.clone() for xb, _ in dls.train])
    assert D.decode_once(dls).store is None and len(D._DECODED) > 0  # the second pass did decode per process
    assert all(torch.equal(a, b) for a, b in zip(*batches)) and len(batches[0]) == 3


def test_unwritable_cache_falls_back_with_a_warning(tiny_data, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COVID_FASTAI_CACHE", str(blocker))  # a file, not a folder: nothing can be made under it
    f = D.find_xray_folders(tiny_data, scan=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dls = D.xray_dls(f, make_aug("seed", 32), bs=8)
    assert D.decode_once(dls).store is None
    assert any("decode cache not written" in str(x.message) and "COVID_FASTAI_CACHE" in str(x.message) for x in w)
    xb, yb = dls.train.one_batch()
    assert xb.shape == (8, 3, 32, 32)


def test_parallel_build_equals_serial(tmp_path):
    "The build in worker processes (machines with more than 2 cores) stores the same pixels in the same order."
    from functools import partial
    files = [str(f) for f in _images(tmp_path / "im", 5)]
    ident = P._identity(files)
    a = P.PixelStore(P.build_store(tmp_path / "a", ident, partial(D.decode_resized, size=32), workers=0))
    b = P.PixelStore(P.build_store(tmp_path / "b", ident, partial(D.decode_resized, size=32), workers=2))
    assert np.array_equal(a.index, b.index) and np.array_equal(a.pixels, b.pixels)


def test_same_images_in_another_order_share_the_store(tmp_path):
    "Cross-validation folds list the same images split (and ordered) differently, and through symlinks: one store."
    files = _images(tmp_path / "im", 4)
    (tmp_path / "view").mkdir()
    links = []
    for f in files:
        links.append(tmp_path / "view" / f.name)
        links[-1].symlink_to(f)
    a = P.open_or_build(files, 32, lambda f: D.decode_resized(f, 32), root=tmp_path / "c")
    b = P.open_or_build(links[::-1] + links[:1], 32, lambda f: 1 / 0, root=tmp_path / "c")  # never decodes
    assert a.folder == b.folder and len(b) == 4 and np.array_equal(b.get(links[2]), a.get(files[2]))


def test_file_broken_after_the_scan_is_a_one_line_error_and_leaves_no_store(tiny_data, tmp_path, monkeypatch):
    import shutil
    from covid_fastai.errors import DataError
    monkeypatch.setenv("COVID_FASTAI_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    f = D.find_xray_folders(root)
    bad = f.files("train")[3]
    bad.write_bytes(b"not an image any more")
    with pytest.raises(DataError, match="became unreadable during the run") as e:
        D.xray_dls(f, make_aug("seed", 32), bs=8)
    assert str(bad) in str(e.value)
    assert not [p for p in (tmp_path / "cache" / "decoded").iterdir() if not p.name.endswith(".lock")]


@pytest.mark.realdata
def test_real_xrays_stored_exactly(real_data, tmp_path):
    "Real JPEGs of several sources and aspect ratios: the store holds what decoding each file gives, at 224 px."
    files = sorted((real_data / "train").rglob("*.jpg"))[::40]
    store = P.open_or_build(files, 224, lambda f: D.decode_resized(f, 224), root=tmp_path / "c")
    assert len(store) == len(files) > 30
    assert all(np.array_equal(store.get(f), D.decode_resized(f, 224)) for f in files)
    assert len({store.get(f).shape for f in files}) > 1  # not all one shape: nothing was padded to a common one
