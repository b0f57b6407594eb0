"""Opening X-ray files robustly, in one place: every reader in the library goes through `open_xray`.

`open_xray(path)` returns an 8-bit grayscale (mode 'L') PIL image or raises `UnreadableImage` with a short
reason. It handles:

- JPEG/PNG/BMP/TIFF/... by content, not by extension (a PNG named `.jpg` reads fine);
- 16-bit and 32-bit grayscale ('I;16', 'I', 'F'): scaled from the image's own min..max to 0..255 (PIL's
  plain `convert('L')` would clip everything above 255 to white);
- RGB, RGBA/LA (alpha dropped), palette, CMYK, 1-bit -> grayscale; EXIF orientation applied;
- huge images: above `HUGE_PIXELS` a JPEG is decoded at a reduced scale (`draft`, 1/2..1/8, memory shrinks
  with it) and other formats are reduced right after decoding; files over PIL's decompression-bomb limit
  (2 x `Image.MAX_IMAGE_PIXELS`, about 179 M pixels) are refused rather than decoded;
- DICOM (`.dcm`, or any file with the `DICM` magic) through pydicom, as fastai's medical module reads it:
  modality rescale (RescaleSlope/Intercept or a Modality LUT), then the first WindowCenter/Width (else a VOI
  LUT, else the full range), MONOCHROME1 inverted so bone is always bright; no pixel data -> unreadable.

`scan_images(files)` decodes each file once with `open_xray` and splits them into readable files and
`(file, reason)` pairs; results are remembered per file (path, size, mtime) in the process and on disk
under the cache folder, so a rerun over the same data only re-checks changed files.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import write_atomic
from .progress import phase

__all__ = ["open_xray", "UnreadableImage", "IMAGE_EXTENSIONS", "is_dicom", "scan_images", "HUGE_PIXELS",
           "get_xray_files"]

HUGE_PIXELS = 25_000_000   # above this (5000 x 5000), decode at reduced scale: X-rays train at <= 512 px
HUGE_TARGET = 2048         # short side kept (at least) when a huge image is reduced
DICOM_EXTENSIONS = {".dcm", ".dicom"}


def _image_extensions() -> set[str]:
    from fastai.vision.all import image_extensions
    return set(image_extensions) | DICOM_EXTENSIONS


IMAGE_EXTENSIONS = _image_extensions()


def get_xray_files(path) -> list[Path]:
    """Image files under `path` (recursively): fastai's image extensions plus `.dcm`/`.dicom`, and any other file
    with the DICOM magic (scanners write names without extensions, or UIDs like `1.2.840.113619.2.320`)."""
    from fastai.vision.all import get_files
    files = get_files(path, recurse=True)  # fastai skips hidden files and folders
    # sorted by parts: Path's own order (so splits stay as they were), without Path.__lt__'s cost per comparison
    return sorted((f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS or is_dicom(f)), key=lambda f: f.parts)


class UnreadableImage(Exception):
    "A file that cannot be read as an X-ray image; the message is the reason, in a few words."


def is_dicom(path) -> bool:
    "A DICOM file by extension, or by its 'DICM' magic at byte 128 (DICOM files often have no extension)."
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS: return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _to_uint8(a: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    "Linear map lo..hi (default: the array's own min..max) to 0..255, clipping outside; a flat image -> 0."
    a = a.astype(np.float32, copy=False)
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    if not hi > lo: return np.zeros(a.shape, np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def to_gray8(im: Image.Image) -> Image.Image:
    "Any PIL mode -> 'L'. High bit depths are scaled by their actual range, never clipped."
    if im.mode == "L": return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im)), "L")
    if im.mode == "P":  # palette (with or without a transparent index): through RGB(A)
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGB" if im.mode != "LA" else "L")  # alpha dropped: X-rays carry no transparency
    if im.mode == "L": return im
    if im.mode not in ("RGB", "1"): im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return im.convert("L")


def _open_dicom(path: Path) -> Image.Image:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError) as e:
        raise UnreadableImage(f"not a readable DICOM file ({type(e).__name__}: {e})".splitlines()[0]) from None
    if "PixelData" not in ds:
        raise UnreadableImage("DICOM file has no pixel data (a report or structured document, not an image)")
    try:
        px = ds.pixel_array
    except Exception as e:  # compressed transfer syntaxes need extra decoders (pylibjpeg, gdcm)
        raise UnreadableImage(f"DICOM pixel data cannot be decoded: {e}".splitlines()[0]) from None
    if px.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1: px = px[0]  # multi-frame: the first frame
    if px.ndim == 3: return to_gray8(Image.fromarray(px.astype(np.uint8)))  # colour DICOM (rare for X-rays)
    hu = apply_modality_lut(px, ds).astype(np.float32)  # RescaleSlope/Intercept or a Modality LUT
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        first = lambda v: float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v)
        c, w = first(center), max(first(width), 1.0)
        out = _to_uint8(hu, c - w / 2, c + w / 2)  # fastai's `windowed`: clamp to the window, then scale
    elif "VOILUTSequence" in ds:
        # the VOI LUT maps the modality LUT's output (integer indices), not the stored pixels
        out = _to_uint8(apply_voi_lut(np.rint(hu).astype(np.int64), ds).astype(np.float32))
    else:
        out = _to_uint8(hu)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are white; flip so bone is bright as in every other X-ray
    return Image.fromarray(out, "L")


def open_xray(path, min_side: int | None = None) -> Image.Image:
    """Read `path` as an 8-bit grayscale PIL image (see the module docstring); `UnreadableImage` if it can't be.

    min_side: the short side the caller will resize to; a huge image is decoded/reduced to no less than
    max(min_side, HUGE_TARGET). Images up to `HUGE_PIXELS` are decoded at full size, whatever `min_side`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UnreadableImage(f"cannot be read: {e.strerror}") from None
    if size == 0: raise UnreadableImage("empty file (0 bytes)")
    if is_dicom(path): return _open_dicom(path)
    try:
        with warnings.catch_warnings():  # the size policy below is ours; PIL's warning would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"too large to decode safely ({e})".split(" could be")[0]) from None
    except UnidentifiedImageError:
        raise UnreadableImage("not an image: no image format recognises its content") from None
    except OSError as e:
        raise UnreadableImage(f"cannot be read: {e}") from None
    with im:
        target = max(min_side or 0, HUGE_TARGET)
        huge = im.width * im.height > HUGE_PIXELS
        if huge and im.format == "JPEG":
            im.draft(None, (target, target))  # DCT-domain downscale: decodes at 1/2..1/8 size, memory too
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
            raise UnreadableImage(f"truncated or corrupt image data ({e})") from None
        if huge and min(im.size) >= 2 * target:
            # Image.reduce refuses 16-bit, palette and 1-bit modes: 16-bit goes to 32-bit ints (values kept, scaled
            # by to_gray8 after), palette and 1-bit to 8-bit gray (nothing finer to keep)
            if im.mode.startswith("I;16"): im = im.convert("I")
            elif im.mode in ("P", "1"): im = to_gray8(im)
            im = im.reduce(min(im.size) // target)  # box-average down before any other mode conversion
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block: keep the pixels as stored
            pass
        return to_gray8(im)


# Scan results: {(path, size, mtime_ns): reason or None}, in this process and persisted per data root.
_SCANNED: dict = {}


def _scan_cache_file(root) -> Path | None:
    if root is None: return None
    from .cache import cache_dir
    h = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "scans" / f"{h}.json"


def _check(f: Path):
    try:
        open_xray(f, min_side=1)  # min_side=1: a huge JPEG is checked at the cheapest decode scale
        return None
    except UnreadableImage as e:
        return str(e)


def scan_images(files, root=None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Decode every file once: (readable files, [(unreadable file, reason)]), order kept.

    root: the data folder, to persist results under the cache folder (None: this process only).
    """
    cache_file = _scan_cache_file(root)
    disk = {}
    if cache_file is not None and cache_file.exists():
        try: disk = json.loads(cache_file.read_text())
        except (OSError, ValueError): disk = {}
    good, bad, changed, seen = [], [], False, {}
    files = list(files)
    with phase(f"pre-scan: decode each of {len(files)} images once", total=len(files)) as ph:
        for f in ph(files):
            f = Path(f)
            try:
                st = f.stat()
                key = (str(f), st.st_size, st.st_mtime_ns)
            except OSError as e:
                bad.append((f, f"cannot be read: {e.strerror}"))
                continue
            dkey = f"{key[0]}|{key[1]}|{key[2]}"
            if key in _SCANNED: reason = _SCANNED[key]
            elif dkey in disk: reason = disk[dkey]
            else:
                reason = _check(f)
                changed = True
            _SCANNED[key] = seen[dkey] = reason
            (good.append(f) if reason is None else bad.append((f, reason)))
    if changed and cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache_file, json.dumps(seen))  # only the files of this scan: stale entries drop out
        except OSError:
            pass  # a read-only cache only costs a rescan next time
    return good, bad
