"Bad and unusual image files: each is read correctly or refused with a reason (covid_fastai.images)."
import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_fastai.images import UnreadableImage, get_xray_files, is_dicom, open_xray, scan_images

ROOT = Path(__file__).resolve().parents[1]


def gradient(w=64, h=48, hi=255, dtype=np.uint8):
    "Left-to-right ramp 0..hi: easy to check orientation and scaling."
    return np.tile(np.linspace(0, hi, w), (h, 1)).round().astype(dtype)


def jpeg_bytes(im, **kw):
    b = io.BytesIO()
    im.save(b, "JPEG", quality=95, **kw)
    return b.getvalue()


# ---- files that must be refused, each with its reason ----

@pytest.mark.parametrize("name, content, reason", [
    ("zero.jpg", b"", "empty file (0 bytes)"),
    ("notes.jpg", b"patient list, not an image\n" * 20, "not an image"),
    ("truncated.jpg", None, "truncated or corrupt"),
])
def test_unreadable_files_give_a_reason(tmp_path, name, content, reason):
    f = tmp_path / name
    if content is None:  # a real JPEG cut in half
        content = jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), np.uint8)))
        content = content[: len(content) // 2]
    f.write_bytes(content)
    with pytest.raises(UnreadableImage, match=re.escape(reason)):
        open_xray(f)


def test_png_with_a_jpg_extension_reads(tmp_path):
    f = tmp_path / "actually_png.jpg"
    Image.fromarray(gradient()).save(f, "PNG")
    assert np.array_equal(np.asarray(open_xray(f)), gradient())


# ---- unusual but valid images: read correctly, as 8-bit grayscale ----

def test_16bit_png_is_scaled_not_clipped(tmp_path):
    f = tmp_path / "x16.png"
    raw = gradient(hi=4095, dtype=np.uint16)  # 12-bit data in a 16-bit PNG, as detectors write
    Image.fromarray(raw).save(f)
    with Image.open(f) as im: assert im.mode.startswith("I")
    out = np.asarray(open_xray(f))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)          # still a ramp
    assert np.abs(out.astype(int) - gradient()).max() <= 1    # the full ramp, not a clipped one
    assert (out == 255).mean() < 0.05


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1"])
def test_other_png_modes_become_gray(tmp_path, mode):
    g = Image.fromarray(gradient())
    im = {"RGBA": lambda: g.convert("RGBA"), "P": lambda: g.convert("RGB").convert("P", palette=Image.ADAPTIVE),
          "LA": lambda: g.convert("LA"), "1": lambda: g.convert("1")}[mode]()
    f = tmp_path / f"x_{mode}.png"
    im.save(f)
    out = open_xray(f)
    assert out.mode == "L" and out.size == g.size
    a = np.asarray(out).astype(int)
    if mode == "1":  # dithered black/white: the ramp survives as column averages
        assert set(np.unique(a)) <= {0, 255} and np.abs(a.mean(0) - gradient()[0]).mean() < 40
    else:
        assert np.abs(a - gradient()).max() <= 4


def test_cmyk_jpeg(tmp_path):
    f = tmp_path / "cmyk.jpg"
    Image.fromarray(gradient()).convert("RGB").convert("CMYK").save(f, "JPEG", quality=95)
    with Image.open(f) as im: assert im.mode == "CMYK"
    out = np.asarray(open_xray(f)).astype(int)
    assert out.shape == (48, 64) and np.abs(out - gradient()).mean() < 6


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    f = tmp_path / "rotated.jpg"
    stored = Image.fromarray(gradient())  # 64 wide, 48 high, dark on the left
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: the viewer must rotate 90 degrees clockwise
    stored.save(f, "JPEG", quality=95, exif=exif.tobytes())
    out = np.asarray(open_xray(f)).astype(int)
    assert out.shape == (64, 48)                               # portrait now
    assert out[:4].mean() < 40 and out[-4:].mean() > 215       # dark top, bright bottom: rotated clockwise


def test_tiny_8x8_image(tmp_path):
    f = tmp_path / "tiny.png"
    Image.fromarray(gradient(8, 8)).save(f)
    assert open_xray(f).size == (8, 8)


def test_10000px_jpeg_decodes_at_reduced_scale_in_little_memory(tmp_path):
    f = tmp_path / "huge.jpg"
    Image.new("L", (10000, 10000), 90).save(f, "JPEG", quality=50)
    del_code = textwrap.dedent(f"""
        import resource, sys
        from covid_fastai import open_xray  # the package name: fastai's import-time jit warning held back
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        im = open_xray({str(f)!r}, min_side=256)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(im.size[0], im.size[1], im.getpixel((5, 5)), grown // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", del_code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    w, h, px, grown_mb = map(int, r.stdout.split())
    assert 2048 <= w < 10000 and w == h and abs(px - 90) <= 2
    assert grown_mb < 60  # a full decode would take 100 MB (8-bit) or 300 MB (RGB)
    assert not r.stderr.strip()  # no DecompressionBombWarning noise


def test_decompression_bomb_is_refused_not_decoded(tmp_path):
    f = tmp_path / "bomb.png"
    # A 20000 x 10000 PNG of zeros: ~200 M pixels, over PIL's hard limit (2 x MAX_IMAGE_PIXELS), a few KB on disk.
    Image.new("1", (20000, 10000)).save(f)
    with pytest.raises(UnreadableImage, match="too large to decode safely"):
        open_xray(f)


# ---- DICOM ----

def write_dicom(path, raw: np.ndarray | None, photometric="MONOCHROME2", slope=1.0, intercept=0.0,
                center=None, width=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "CR"
    ds.PatientName = "Test^Phantom"
    if raw is not None:
        ds.Rows, ds.Columns = raw.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if center is not None: ds.WindowCenter, ds.WindowWidth = center, width
        ds.PixelData = raw.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    raw = gradient(w=410, h=8, hi=4095, dtype=np.uint16)
    # value = 2 * raw - 1000; window 3000 +- 1000 covers raw 1500..2500
    f = write_dicom(tmp_path / "chest.dcm", raw, "MONOCHROME1", slope=2.0, intercept=-1000.0, center=3000, width=2000)
    assert is_dicom(f)
    out = np.asarray(open_xray(f)).astype(int)
    assert out.shape == raw.shape
    value = raw * 2.0 - 1000
    assert (out[value <= 2000] == 255).all() and (out[value >= 4000] == 0).all()  # clamped, then inverted
    mid = (value > 2050) & (value < 3950)
    expect = 255 - np.clip(np.rint((value - 2000) * 255 / 2000), 0, 255)
    assert np.abs(out[mid] - expect[mid]).max() <= 1


def test_dicom_without_extension_and_without_window(tmp_path):
    raw = gradient(w=64, h=8, hi=4095, dtype=np.uint16)
    f = write_dicom(tmp_path / "IM0001", raw)  # scanners often write no extension: found by the DICM magic
    out = np.asarray(open_xray(f)).astype(int)
    assert out.min() == 0 and out.max() == 255 and np.abs(out - gradient(w=64, h=8)).max() <= 1


def test_dicom_voi_lut_maps_the_rescaled_values(tmp_path):
    "A VOI LUT Sequence (no window) applies to the modality LUT's output, as DICOM PS3.3 C.11 orders them."
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    raw = gradient(w=256, h=4, hi=1023, dtype=np.uint16)
    f = write_dicom(tmp_path / "voi.dcm", raw, slope=2.0, intercept=-1000.0)  # values -1000..1046
    ds = dcmread(f)
    lut = Dataset()
    lut.LUTDescriptor = [1024, 0, 12]  # entries for values 0..1023, 12-bit output
    lut.add_new(0x00283006, "US", [min(4095, 4 * i) for i in range(1024)])  # LUTData
    ds.VOILUTSequence = Sequence([lut])
    ds.save_as(f)
    out = np.asarray(open_xray(f)).astype(int)
    value = raw * 2.0 - 1000
    expect = np.rint(np.clip(4 * np.clip(value, 0, 1023), 0, 4095) * 255 / 4092)  # output range 0..4092
    assert np.abs(out - expect).max() <= 1


@pytest.mark.parametrize("mode", ["I;16", "P", "1"])
def test_huge_image_of_any_mode_is_reduced(tmp_path, monkeypatch, mode):
    "Image.reduce refuses 16-bit, palette and 1-bit images: such huge files still read (thresholds made small)."
    import covid_fastai.images as I
    monkeypatch.setattr(I, "HUGE_PIXELS", 1000)
    monkeypatch.setattr(I, "HUGE_TARGET", 16)
    g8 = Image.fromarray(gradient(w=128, h=64))
    im = {"I;16": lambda: Image.fromarray(gradient(w=128, h=64, hi=4095, dtype=np.uint16)),
          "P": lambda: g8.convert("RGB").convert("P", palette=Image.ADAPTIVE), "1": lambda: g8.convert("1")}[mode]()
    f = tmp_path / "huge.png"
    im.save(f)
    out = open_xray(f)
    assert out.mode == "L" and out.size == (32, 16)  # reduced by 64 // 16 = 4
    a = np.asarray(out).astype(int)
    assert np.abs(a.mean(0) - gradient(w=32, h=16)[0]).max() <= (40 if mode == "1" else 6)  # still the ramp


def test_dicom_without_pixel_data_is_refused(tmp_path):
    f = write_dicom(tmp_path / "report.dcm", None)
    with pytest.raises(UnreadableImage, match="no pixel data"):
        open_xray(f)


def test_dcm_files_are_listed(tmp_path):
    write_dicom(tmp_path / "a.dcm", gradient(8, 8, 100, np.uint16))
    (tmp_path / "b.txt").write_text("x" * 200)
    Image.fromarray(gradient()).save(tmp_path / "c.png")
    write_dicom(tmp_path / "IM0001", gradient(8, 8, 100, np.uint16))  # no extension: found by the DICM magic
    write_dicom(tmp_path / "1.2.840.113619.2.320", gradient(8, 8, 100, np.uint16))  # a UID name
    assert [p.name for p in get_xray_files(tmp_path)] == ["1.2.840.113619.2.320", "IM0001", "a.dcm", "c.png"]


def test_scan_splits_good_and_bad_and_remembers(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(gradient()).save(good)
    png = good.read_bytes()
    (tmp_path / "bad.jpg").write_bytes(b"")
    ok, bad = scan_images([good, tmp_path / "bad.jpg"], root=tmp_path)
    assert ok == [good] and bad == [(tmp_path / "bad.jpg", "empty file (0 bytes)")]
    # Spoil good.png behind the scan's back, keeping its size and modification time: a scan that remembers its
    # verdict per (path, size, mtime) still calls it readable; one that decodes again refuses it.
    st = good.stat()
    good.write_bytes(b"x" * st.st_size)
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(UnreadableImage): open_xray(good)
    assert scan_images([good])[0] == [good]  # remembered in this process (no cache folder involved)
    # ... and in the next one, from the cache folder
    code = f"from covid_fastai.images import scan_images; print(scan_images([{str(good)!r}], root={str(tmp_path)!r})[1])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
    (tmp_path / "bad.jpg").write_bytes(png)  # fixed: a changed file is checked again
    ok, bad = scan_images([tmp_path / "bad.jpg"], root=tmp_path)
    assert ok == [tmp_path / "bad.jpg"] and bad == []
