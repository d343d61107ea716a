"""Reading and writing image files as uint8 arrays, with every odd case turned into a clear outcome.

Shared by the data pipeline, the evaluation script and the upscaling CLI so that all three treat grayscale,
alpha, palette and 16-bit files the same way. The upscaling CLI alone keeps 16-bit files at 16 bits
(`decode(..., high_bit_depth=True)`, `write_image` of uint16): Pillow reads 16-bit colour PNGs and TIFFs as
8 bits and writes no 16-bit colour PNG, so those go through `_read_deep` and `encode_png16`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import sys
import threading
import warnings
import zlib
from typing import BinaryIO, Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

try:  # LittleCMS, which a Pillow built without it lacks: a CMYK file is then converted without its profile
    from PIL import ImageCms
except ImportError:  # pragma: no cover
    ImageCms = None

from rnan_jax import paths

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# What the upscaling CLI's folder scans take: also the formats Pillow reads that SR datasets do not come in
# (the training and benchmark scans keep to IMAGE_EXTENSIONS). An animated file gives its first frame.
# .jfif/.jpe (JPEG), .apng and .avif (where this Pillow reads it) were left out of a folder without a word
READABLE_EXTENSIONS = IMAGE_EXTENSIONS + (".gif", ".pbm", ".pnm", ".tga", ".qoi", ".jfif", ".jpe", ".apng", ".avif")

_reading = threading.local()  # .path: the file this thread is reading (`_naming_warnings`)
_warned: set[tuple[str, str]] = set()  # (file, message) already logged: EXIF is parsed by the scan and the decode
_warned_lock = threading.Lock()


class _NamingWarnings:
    """Stands in for the `warnings` module in Pillow's TIFF and EXIF reader (PIL.TiffImagePlugin), whose warnings
    ("Corrupt EXIF data.  Expecting to read 12 bytes but only got 2.") named no file, and, shown once per line of
    Pillow, were said for the first bad file only. While this thread reads a file (`_naming_warnings`), each is
    logged once naming the file; anywhere else it goes to `warnings.warn` as before. Per thread, which
    `warnings.catch_warnings` is not (the pipeline decodes in threads)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def warn(self, message, category=None, stacklevel: int = 1, source=None) -> None:
        path = getattr(_reading, "path", None)
        if path is None:
            self._module.warn(message, category, stacklevel + 1, source)
            return
        text = " ".join(str(message).split())
        with _warned_lock:
            if (path, text) in _warned:
                return
            _warned.add((path, text))
        log.warning("%s: %s (Pillow, reading its metadata)", path, text)


if getattr(TiffImagePlugin, "warnings", None) is warnings:
    TiffImagePlugin.warnings = _NamingWarnings(warnings)


@contextlib.contextmanager
def _naming_warnings(path: str) -> Iterator[None]:
    """Pillow's metadata warnings while this thread reads `path` are logged naming it (`_NamingWarnings`)."""
    outer = getattr(_reading, "path", None)
    _reading.path = path
    try:
        yield
    finally:
        _reading.path = outer


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


class Decoded(NamedTuple):
    """A decoded image: `pixels` uint8 [H, W, 3] (colour) or [H, W] (gray); `alpha` [H, W] of the same type, or
    None; both uint16 for a 16-bit file decoded with `high_bit_depth`. `frames`: the file's frame count (the
    pixels are the first frame's; of an MPO, its views only, not a phone photo's gain or depth map). `icc_profile`:
    the embedded ICC profile (a phone's Display P3, Adobe RGB), kept only when its colour space is the pixels' (a
    CMYK file is converted to sRGB through its profile instead). `dpi`: the file's resolution (x, y) in pixels per
    inch, turned with the pixels, or None where it says none."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    frames: int = 1
    icc_profile: bytes | None = None  # the file's embedded colour profile, when it describes `pixels` (RGB or gray)
    dpi: tuple[float, float] | None = None

    @property
    def is_gray(self) -> bool:
        return self.pixels.ndim == 2


def _from_unit(a: np.ndarray, dtype: type) -> np.ndarray:
    """Float samples in [0, 1] at `dtype`'s full scale, rounded; outside it clipped, NaN as 0."""
    peak = np.iinfo(dtype).max
    return np.clip(np.rint(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0) * peak), 0, peak).astype(dtype)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scales 16-bit (or 32-bit integer) samples to 8 bits with rounding; uint8 passes through."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        return _from_unit(a, np.uint8)
    # 16-bit types are scaled by their range, not their values: a dark 16-bit image (every sample <= 255) is
    # dark, not 8-bit. Pillow's 32-bit mode I does not say its depth: above 255 is taken as 16-bit.
    peak = 65535 if a.dtype.itemsize == 2 or a.max(initial=0) > 255 else 255
    return np.clip(np.rint(a.astype(np.int64) * (255.0 / peak)), 0, 255).astype(np.uint8)


def _to_uint16(a: np.ndarray) -> np.ndarray:
    """Samples as uint16 at full scale: 8-bit ones x257 (255 -> 65535), floats in [0, 1] x65535."""
    if a.dtype == np.uint8:
        return a.astype(np.uint16) * 257
    if a.dtype == bool:
        return a.astype(np.uint16) * 65535
    if np.issubdtype(a.dtype, np.floating):
        return _from_unit(a, np.uint16)
    return np.clip(a, 0, 65535).astype(np.uint16)


def _warn_out_of_range(path: str, a: np.ndarray) -> None:
    """A warning for samples that `_to_uint8`/`_to_uint16` clip: a float TIFF outside [0, 1] (an HDR or 0..255
    one came out nearly white), a 32-bit integer one above 65535."""
    if np.issubdtype(a.dtype, np.floating):
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo < 0 or hi > 1 or finite.size < a.size:
            log.warning("%s: float samples in [%g, %g]%s, read as [0, 1]: clipped", path, lo, hi,
                        "" if finite.size == a.size else f" and {a.size - finite.size} NaN or infinite (NaN read as 0)")
    elif a.dtype.itemsize == 4 and np.issubdtype(a.dtype, np.integer) and (a.min() < 0 or a.max() > 65535):
        log.warning("%s: 32-bit integer samples in [%d, %d], read as 16-bit: clipped to [0, 65535]", path,
                    a.min(), a.max())


def _deep(a: np.ndarray) -> bool:
    """Whether samples hold more than 8 bits: 16-bit types, and 32-bit integers above 255 (Pillow's mode I)."""
    if a.dtype.itemsize == 2 or np.issubdtype(a.dtype, np.floating):
        return True
    return np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize > 2 and int(a.max(initial=0)) > 255


# Pillow's raw modes for 16-bit colour PNGs and TIFFs, all of which it unpacks to 8 bits, each sample's high byte:
# big-endian (B) for PNG (LA;16B to RGBA); for TIFF the file's byte order, or the machine's (N) where libtiff
# decodes (compressed files). RGBX has an unused 4th sample, RGBa premultiplied alpha; R;16L and the like (one
# band of a planar TIFF) are `_deep_rawmodes`' own.
_DEEP_RAWMODES = frozenset({"LA;16B"} | {f"{m};16{order}" for m in ("RGB", "RGBA", "RGBX", "RGBa", "R", "G", "B", "A")
                                         for order in "LBN"})
_MACHINE_ORDER = "L" if sys.byteorder == "little" else "B"
_OTHER_BYTE_ORDER = {"L": "B", "B": "L"}


def _deep_rawmodes(im: Image.Image) -> list[str] | None:
    """For a just opened 16-bit colour PNG or TIFF, the raw mode Pillow unpacks each of its tiles with; None for
    any other image, and for a compressed planar TIFF, whose bands Pillow's libtiff decoder unpacks in the
    machine's byte order whatever the raw mode says (so its low bytes cannot be had). Pillow unpacks a band of an
    uncompressed planar 16-bit TIFF as if 8-bit: 'R', not 'R;16L'."""
    if im.format not in ("PNG", "TIFF") or not im.tile or (im.format == "PNG" and len(im.tile) > 1):
        return None
    if im.tile[0][0] == "libtiff" and im.tag_v2.get(TiffImagePlugin.PLANAR_CONFIGURATION, 1) == 2:
        return None
    rawmodes = [t[3] if isinstance(t[3], str) else t[3][0] for t in im.tile]
    if im.format == "TIFF" and all(len(r) == 1 for r in rawmodes) and _tiff_bits(im) == 16:
        rawmodes = [f"{r};16{'L' if im.tag_v2.prefix == b'II' else 'B'}" for r in rawmodes]
    if not all(r in _DEEP_RAWMODES for r in rawmodes):
        return None
    # libtiff's machine order as the explicit one: Pillow before 11 has no 'RGBX;16N' (nor reads such a file)
    return [r[:-1] + _MACHINE_ORDER if r.endswith("N") else r for r in rawmodes]


def _tiff_bits(im: Image.Image) -> int:
    """The most bits of any sample of a TIFF (8 for other images)."""
    return max(im.tag_v2.get(TiffImagePlugin.BITSPERSAMPLE, (8,))) if im.format == "TIFF" else 8


def _with_rawmode(tile: tuple, rawmode: str) -> tuple:
    """A Pillow tile (codec, extents, offset, args) unpacked with `rawmode`: PNG's args are the raw mode, TIFF's a
    tuple that starts with it. A plain tuple before Pillow 11, a named one since."""
    args = rawmode if isinstance(tile[3], str) else (rawmode, *tile[3][1:])
    return type(tile)(*tile[:3], args) if hasattr(tile, "_replace") else (*tile[:3], args)


# EXIF orientation (2-8) -> the transpose that makes the image upright, as `ImageOps.exif_transpose` does.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _upright(im: Image.Image) -> Image.Image:
    """`ImageOps.exif_transpose`; for a malformed EXIF block that Pillow reads but cannot write back into the
    turned image (struct.error: a WebP's or PNG's `exif` info), the same turn without rewriting the block."""
    try:
        return ImageOps.exif_transpose(im)
    except (struct.error, TypeError, ValueError, IndexError, KeyError):
        method = _UPRIGHT.get(im.getexif().get(0x0112))
        return im if method is None else im.transpose(method)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_exif_after_pixels(path: str) -> bytes | None:
    """The body of a PNG's eXIf chunk, found by skipping from chunk to chunk (no pixel is decoded); None without
    one. For an eXIf after the image data (the PNG spec allows it), which Pillow reads only when it decodes."""
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return None
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                body = f.read(length)
                return body if len(body) == length else None
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)  # the body and its CRC
    return None


def exif_orientation(path: str | os.PathLike) -> int:
    """The EXIF orientation tag of an image file (1..8) that `decode` applies; 1 when it has none or cannot be
    read. Reads the header, and for a PNG without EXIF there the chunk list (an eXIf chunk may follow the pixels,
    and Pillow's decode applies it)."""
    path = os.fspath(path)
    try:
        with _naming_warnings(path), Image.open(path) as im:
            if im.format == "PNG" and "exif" not in im.info:  # Pillow's getexif would decode the pixels for it
                body = _png_exif_after_pixels(path)
                if body is None:
                    return 1
                exif = Image.Exif()
                exif.load(body)
            else:
                exif = im.getexif()
            value = exif.get(0x0112, 1)
    except Exception:  # the decode that follows reports an unreadable file
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _load_with_rawmodes(path: str, rawmodes: list[str]) -> np.ndarray:
    """A PNG or TIFF decoded by Pillow (filters, compression, interlacing, tiles, EXIF orientation) but with each
    tile unpacked with its raw mode in `rawmodes`."""
    with Image.open(path) as im:
        im.tile = [_with_rawmode(t, r) for t, r in zip(im.tile, rawmodes, strict=True)]
        im.load()
        return np.asarray(_upright(im))


def _read_deep(path: str, rawmodes: list[str]) -> np.ndarray:
    """uint16 [H, W, C] samples (C: 3 RGB, 4 RGBA, 2 gray + alpha) of a 16-bit colour PNG or TIFF whose tiles
    Pillow unpacks with `rawmodes` (`_deep_rawmodes`): those keep each sample's high byte; the same bytes read in
    the other byte order give the low one. Gray + alpha (4 bytes a pixel) is copied byte for byte as 8-bit RGBA;
    premultiplied alpha (RGBa) is read as RGBA and divided out at 16 bits."""
    if rawmodes == ["LA;16B"]:
        b = _load_with_rawmodes(path, ["RGBA"]).astype(np.uint16)
        return np.stack([b[..., 0] << 8 | b[..., 1], b[..., 2] << 8 | b[..., 3]], axis=-1)
    straight = [r.replace("RGBa", "RGBA") for r in rawmodes]
    high = _load_with_rawmodes(path, straight).astype(np.uint16)
    a = high << 8 | _load_with_rawmodes(path, [r[:-1] + _OTHER_BYTE_ORDER[r[-1]] for r in straight])
    return a if straight == rawmodes else _unpremultiply(a)


def _unpremultiply(rgba: np.ndarray) -> np.ndarray:
    """uint16 RGBA with colour premultiplied by alpha -> straight colour (0 where alpha is 0), rounded."""
    alpha = rgba[..., 3:].astype(np.int64)
    colour = (rgba[..., :3].astype(np.int64) * 65535 + alpha // 2) // np.maximum(alpha, 1)
    return np.concatenate([np.minimum(colour, 65535) * (alpha > 0), alpha], axis=-1).astype(np.uint16)


def _ppm16_tile(im: Image.Image) -> tuple[int, int] | None:
    """(data offset, maxval) of a binary colour PPM (P6) of more than 8 bits a sample, which Pillow reads at 8 bits
    (a 16-bit PPM, as `dcraw -4` and other raw converters write, lost its low bits without a word); else None."""
    if im.format != "PPM" or im.mode != "RGB" or len(im.tile) != 1 or im.tile[0][0] != "ppm":
        return None
    args = im.tile[0][3]
    maxval = args[1] if isinstance(args, tuple) and len(args) > 1 and isinstance(args[1], int) else 255
    fp = im.fp
    fp.seek(0)
    binary = fp.read(2) == b"P6"
    return (im.tile[0][2], maxval) if binary and maxval > 255 else None


def _read_ppm16(f: BinaryIO, size: tuple[int, int], offset: int, maxval: int) -> np.ndarray:
    """uint16 RGB [H, W, 3] of a P6 PPM's big-endian 16-bit samples, at full scale (0..maxval -> 0..65535)."""
    w, h = size
    f.seek(offset)
    data = f.read(w * h * 6)
    if len(data) < w * h * 6:
        raise ImageError(f"{getattr(f, 'name', 'PPM')}: cannot read image (the file is cut short)")
    a = np.frombuffer(data, ">u2").reshape(h, w, 3).astype(np.uint16)
    return a if maxval == 65535 else np.rint(np.minimum(a, maxval) * (65535.0 / maxval)).astype(np.uint16)


def _bmp_alpha_tile(im: Image.Image) -> tuple[int, int, int] | None:
    """(data offset, row stride, row order: -1 bottom-up) of a 32-bit uncompressed (BI_RGB) BMP, whose 4th byte a
    pixel Pillow drops as unused (RGB); else None."""
    if im.format != "BMP" or im.mode != "RGB" or im.info.get("compression") != 0 or len(im.tile) != 1:
        return None
    codec, _, offset, args = im.tile[0]
    if codec != "raw" or not isinstance(args, tuple) or len(args) < 3 or args[0] != "BGRX":
        return None
    return offset, args[1], args[2]


def _read_bmp_alpha(f: BinaryIO, size: tuple[int, int], offset: int, stride: int, order: int) -> np.ndarray | None:
    """uint8 [H, W]: the 4th byte of each pixel of a 32-bit BI_RGB BMP where it holds alpha (Pillow writes RGBA
    so, and browsers show it so); None where it is 0 everywhere (unused, as the format says) or 255 everywhere
    (opaque)."""
    w, h = size
    f.seek(offset)
    data = f.read(stride * h)
    if len(data) < stride * h or stride < 4 * w:
        return None
    alpha = np.frombuffer(data, np.uint8).reshape(h, stride)[:, 3:4 * w:4]
    if order < 0:
        alpha = alpha[::-1]
    return None if not alpha.any() or (alpha == 255).all() else np.ascontiguousarray(alpha)


def _with_colour_key(a: np.ndarray, key: int | tuple[int, ...]) -> np.ndarray:
    """16-bit gray [H, W] or RGB [H, W, 3] samples with an alpha channel appended: 0 where the pixel is the PNG
    colour key (tRNS: a gray value, or an RGB triple, compared at full precision), 65535 elsewhere."""
    keyed = np.all(a.reshape(*a.shape[:2], -1) == np.asarray(key).reshape(-1), axis=-1)
    return np.dstack([a, np.where(keyed, 0, 65535).astype(a.dtype)])


# Pillow's decompression-bomb guard: an image above this many pixels is refused (None: no limit). Pillow's
# default (89.5 M) warns and twice that raises; here the limit is one number, raised by the CLIs' flag.
DEFAULT_MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
Image.MAX_IMAGE_PIXELS = None  # `decode` checks `max_pixels` itself, per call, with a message that says what to do


def decode(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
           high_bit_depth: bool = False) -> Decoded:
    """Reads an image file, keeping grayscale as gray and alpha apart from the colour channels.

    The EXIF orientation is applied, as image viewers do (a phone photo stored sideways comes out upright).
    16-bit samples are scaled to 8 bits (rounded, by the type's range: a dark 16-bit image stays dark), palette
    images expanded, CMYK/YCbCr converted to RGB (CMYK through its embedded colour profile, to sRGB, as image
    viewers show it; Pillow's own conversion ignores the profile). With `high_bit_depth`, a file of more than 8
    bits a sample (16-bit PNG or TIFF, 32-bit integer or float TIFF) gives uint16 pixels and alpha at full
    precision instead; 8-bit files give what they give without it. A PNG's colour key (tRNS) becomes alpha, at 16
    bits for a 16-bit PNG, and so does a 32-bit BMP's 4th byte where it holds alpha (`_read_bmp_alpha`). A 16-bit
    TIFF that Pillow reads only at 8 bits (CMYK) is read so, with a warning naming the file.
    Raises `ImageError` naming the file for a missing, unreadable, truncated or empty image, and for one of
    more than `max_pixels` pixels (a decompression bomb, or a very large photo: pass a higher limit or None).
    """
    path = os.fspath(path)
    with _naming_warnings(path):
        return _decode(path, max_pixels, high_bit_depth)


def _decode(path: str, max_pixels: int | None, high_bit_depth: bool) -> Decoded:
    """`decode`'s work."""
    try:
        # from a file object, not the path: Pillow memory-maps an uncompressed one-strip TIFF opened by path (8-bit
        # gray, RGBA, 16-bit gray) with its size already turned for EXIF orientations 5-8, which scrambled the pixels
        with open(path, "rb") as f, Image.open(f) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} is {w * h / 1e6:.1f} M pixels, above the limit of "
                                 f"{max_pixels / 1e6:.1f} M that guards against decompression bombs "
                                 "(the upscale CLI's --max_image_pixels raises it, 0 for no limit; in Python, "
                                 "decode's max_pixels)")
            try:  # counting frames scans a GIF or TIFF; a broken later frame must not lose the first
                frames = getattr(im, "n_frames", 1)
            except Exception:  # Pillow raises IndexError, TypeError, KeyError, SyntaxError, ... there
                frames = 1
                im.seek(0)  # the failed scan left the image set up as the broken frame (its size, its mode)
            if im.format == "MPO" and frames > 1:
                frames = _mpo_views(im, frames)
            ppm16 = _ppm16_tile(im)
            # a PGM of more than 8 bits: Pillow's mode I, at 0..65535 whatever its maxval, which `_to_uint8` took
            # for 8-bit where every sample was <= 255 (a dark 16-bit PGM came out up to 257 times too bright)
            pgm16 = im.format == "PPM" and im.mode == "I"
            bmp = _bmp_alpha_tile(im)
            deep = _deep_rawmodes(im)
            if deep:  # the explicit byte order (Pillow before 11 cannot unpack 'RGBX;16N' itself)
                im.tile = [_with_rawmode(t, r) for t, r in zip(im.tile, deep, strict=True)]
            bits = _tiff_bits(im)
            # a 16-bit PNG's colour key (tRNS) is a 16-bit value: matched after the samples are read in full
            key = im.info.get("transparency") if im.format == "PNG" and (deep or im.mode.startswith("I")) else None
            icc = im.info.get("icc_profile") or None
            dpi = _dpi(im.info.get("dpi"))
            im.load()
            if dpi is not None and im.getexif().get(0x0112) in (5, 6, 7, 8):  # turned a quarter: x and y swap
                dpi = dpi[::-1]
            im = _upright(im)
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("PA",):
                im = im.convert("RGBA")
            elif mode in ("1", "L", "RGB") and "transparency" in im.info and key is None:  # a colour key (tRNS):
                im = im.convert({"1": "LA", "L": "LA", "RGB": "RGBA"}[mode])  # as alpha, which the upscaler scales
            elif mode == "CMYK" and (srgb := _cmyk_to_srgb(im, icc, path)) is not None:
                im = srgb
            elif mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                im = im.convert("RGB")
            a = np.asarray(im) if ppm16 is None else _read_ppm16(f, im.size, *ppm16)
            if pgm16:
                a = np.clip(a, 0, 65535).astype(np.uint16)
            if bmp is not None and (bmp_alpha := _read_bmp_alpha(f, im.size, *bmp)) is not None:
                a = np.dstack([a, bmp_alpha])  # a 32-bit BMP's alpha, which Pillow reads as an unused byte
        if deep:  # also for 8 bits: rounded from 16 (Pillow truncates) and LA stays gray
            a = _read_deep(path, deep)
        elif 8 < bits < 16 and a.dtype == np.uint16:  # a 10/12/14-bit TIFF: Pillow gives 0..2^bits-1 as I;16,
            a = np.rint(a * (65535.0 / (2 ** bits - 1))).astype(np.uint16)  # which reads as 16-bit: 16x too dark
        elif bits > 8 and mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
            log.warning("%s: a %d-bit %s TIFF, which Pillow reads at 8 bits (the high byte of each sample); read so",
                        path, bits, mode)
        if key is not None:
            a = _with_colour_key(a, key)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:  # Pillow's message names the file object it was given
        raise ImageError(f"{path}: cannot read image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    if a.size == 0 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{path}: image is empty")
    _warn_out_of_range(path, a)
    convert = _to_uint16 if high_bit_depth and _deep(a) else _to_uint8
    alpha = None
    if a.ndim == 3 and a.shape[2] in (2, 4):
        alpha = convert(a[..., -1])
        a = a[..., :-1]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if icc is not None and icc[16:20] != (b"GRAY" if a.ndim == 2 else b"RGB "):  # the data colour space field
        icc = None
    return Decoded(convert(a), alpha, frames, icc, dpi)


def _mpo_views(im: Image.Image, frames: int) -> int:
    """The frames of an MPO (a JPEG with a Multi-Picture index) that are views of the scene: the first and each
    later one the index calls a multi-frame image (a stereo pair's other eye, a panorama's or multi-angle
    shot's next one). A phone photo's gain map or depth map (type Undefined), a large thumbnail, are not photos
    beside it. `frames` when the index cannot be read."""
    try:
        entries = im.mpinfo[0xB002]  # MP Entry: one dict a picture, each's "Attribute" with its "MPType"
        kinds = [str(e["Attribute"]["MPType"]) for e in entries]
    except (AttributeError, KeyError, IndexError, TypeError):
        return frames
    return 1 + sum(kind.startswith("Multi-Frame Image") for kind in kinds[1:])


def _cmyk_to_srgb(im: Image.Image, icc: bytes | None, path: str) -> Image.Image | None:
    """A CMYK image converted to sRGB through its embedded CMYK profile (`icc`), with the profile's own rendering
    intent, as colour-managed viewers show it; None without such a profile (Pillow's plain conversion then), and
    with a warning naming the file for a profile LittleCMS cannot use or a Pillow without LittleCMS."""
    if icc is None or icc[16:20] != b"CMYK":
        return None
    if ImageCms is None:  # pragma: no cover
        log.warning("%s: a CMYK image with a colour profile, which this Pillow (without LittleCMS) cannot apply: "
                    "converted to RGB without it, so its colours may be off", path)
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, profile, ImageCms.createProfile("sRGB"),
                                         renderingIntent=ImageCms.getDefaultIntent(profile), outputMode="RGB")
    except (ImageCms.PyCMSError, ImportError, OSError, ValueError, TypeError) as e:  # ImportError: no LittleCMS
        log.warning("%s: its CMYK colour profile cannot be applied (%s): converted to RGB without it, so its colours "
                    "may be off", path, " ".join(str(e).split()) or type(e).__name__)
        return None


def _dpi(value) -> tuple[float, float] | None:
    """A resolution Pillow read ((x, y) pixels per inch) as two positive finite floats, else None."""
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (x, y) if all(0 < v < float("inf") for v in (x, y)) else None


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as uint8 RGB [H, W, 3]: gray replicated to three channels, alpha dropped."""
    return as_rgb(decode(path).pixels)


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> [H, W, 3], gray replicated."""
    return np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels


def write_image(path: str | os.PathLike, pixels: np.ndarray, alpha: np.ndarray | None = None, *,
                icc_profile: bytes | None = None, dpi: tuple[float, float] | None = None) -> None:
    """Writes uint8 [H, W] or [H, W, 3] (plus optional alpha [H, W]); the format follows the extension.
    `icc_profile` (e.g. `Decoded.icc_profile`) is embedded where the format holds one (PNG, JPEG, TIFF, WebP),
    `dpi` ((x, y) pixels per inch, e.g. `Decoded.dpi`) where it holds a resolution (PNG, JPEG, TIFF, BMP).

    uint16 pixels (and alpha) are written as a 16-bit PNG, or reduced to 8 bits for any other format. The
    file is written beside `path` and renamed, so that a failure (a full disk) leaves no half-written image
    and an earlier file of that name as it was.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(ext)
    if image_format is None:
        raise ValueError(f"{path}: unknown image file extension {ext!r}")
    pixels = np.asarray(pixels)
    deep = pixels.dtype == np.uint16 and image_format == "PNG"

    def convert(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if deep:
            return _to_uint16(a)
        return np.rint(a / 257.0).astype(np.uint8) if a.dtype == np.uint16 else np.asarray(a, dtype=np.uint8)

    samples = convert(pixels)
    samples = samples if samples.ndim == 3 else samples[..., None]
    if alpha is not None:
        samples = np.concatenate([samples, convert(alpha)[..., None]], axis=-1)
    if deep and samples.shape[-1] > 1:  # Pillow writes 16-bit gray only
        paths.write_atomically(path, lambda f: f.write(encode_png16(samples, icc_profile=icc_profile, dpi=dpi)))
        return
    im = Image.fromarray(samples[..., 0] if samples.shape[-1] == 1 else samples,
                         mode={1: None, 2: "LA", 3: None, 4: "RGBA"}[samples.shape[-1]])
    extra = {"icc_profile": icc_profile} if icc_profile and image_format in ("PNG", "JPEG", "TIFF", "WEBP") else {}
    if dpi is not None and image_format in ("PNG", "JPEG", "TIFF", "BMP"):
        extra["dpi"] = tuple(dpi)
    paths.write_atomically(path, lambda f: im.save(f, format=image_format, **extra))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png16(samples: np.ndarray, rows_per_band: int = 256, *, icc_profile: bytes | None = None,
                 dpi: tuple[float, float] | None = None) -> bytes:
    """A 16-bit PNG file of uint16 [H, W, C] samples, C: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA (and an iCCP
    chunk holding `icc_profile`, a pHYs chunk holding `dpi` (x, y) in pixels per inch, if given).

    Every row is Paeth-filtered (what photographs compress best with), `rows_per_band` rows at a time so that
    the int16 temporaries stay small beside a large image."""
    h, w, c = samples.shape
    bpp = 2 * c  # bytes a pixel: the filters' left neighbour
    data = np.ascontiguousarray(samples, dtype=">u2").view(np.uint8).reshape(h, w * bpp)
    compressor = zlib.compressobj(6)
    idat = []
    for y in range(0, h, rows_per_band):
        x = data[y:y + rows_per_band].astype(np.int16)
        up = np.zeros_like(x)
        up[0] = data[y - 1] if y > 0 else 0
        up[1:] = x[:-1]
        left, up_left = np.zeros_like(x), np.zeros_like(x)
        left[:, bpp:], up_left[:, bpp:] = x[:, :-bpp], up[:, :-bpp]
        p = left + up - up_left
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
        predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        rows = np.empty((len(x), 1 + w * bpp), np.uint8)
        rows[:, 0] = 4  # Paeth
        rows[:, 1:] = (x - predicted) & 255
        idat.append(compressor.compress(rows.tobytes()))
    idat.append(compressor.flush())
    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    iccp = _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)) if icc_profile else b""
    # pixels per metre, as Pillow writes them (300 dpi: 11811)
    phys = _png_chunk(b"pHYs", struct.pack(">IIB", *(int(d / 0.0254 + 0.5) for d in dpi), 1)) if dpi else b""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + iccp + phys + _png_chunk(b"IDAT", b"".join(idat))
            + _png_chunk(b"IEND", b""))


def list_images(folder: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Sorted image files (names ending in one of `extensions`; not folders) directly in `folder`, hidden ones (a
    name starting with '.': the `._photo.png` metadata files macOS leaves on other filesystems and in archives) left
    out; raises `ImageError` for a missing or empty folder, or one this user may not list (chmod, another user's
    copy)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ImageError(f"{folder}: no such folder")
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise ImageError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    # a folder named like an image (photos.png/) is not one: listed, it was skipped as unreadable, which left a
    # benchmark set unscored and made upscale exit 1
    files = sorted(os.path.join(folder, f) for f in names if f.lower().endswith(extensions) and not f.startswith(".")
                   and not os.path.isdir(os.path.join(folder, f)))
    if not files:
        raise ImageError(f"{folder}: folder holds no image files ({', '.join(extensions)})")
    return files


def find_image(folder: str, stems: tuple[str, ...]) -> str | None:
    """The first image file (not a folder) in `folder` whose name without extension is one of `stems` (in that
    order), or None."""
    if not os.path.isdir(folder):
        return None
    by_stem: dict[str, str] = {}
    for f in sorted(os.listdir(folder)):
        if f.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(os.path.join(folder, f)):  # a folder: not one
            by_stem.setdefault(os.path.splitext(f)[0], os.path.join(folder, f))
    return next((by_stem[s] for s in stems if s in by_stem), None)
