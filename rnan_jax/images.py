"""Reading and writing image files as uint8 arrays, with every odd case turned into a clear outcome.

Shared by the data pipeline, the evaluation script and the upscaling CLI so that all three treat grayscale,
alpha, palette and 16-bit files the same way.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


class Decoded(NamedTuple):
    """A decoded image: `pixels` uint8 [H, W, 3] (colour) or [H, W] (gray); `alpha` uint8 [H, W] or None."""

    pixels: np.ndarray
    alpha: np.ndarray | None

    @property
    def is_gray(self) -> bool:
        return self.pixels.ndim == 2


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scales 16-bit (or 32-bit integer) samples to 8 bits with rounding; uint8 passes through."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    peak = 65535 if a.max(initial=0) > 255 else 255
    return np.clip(np.rint(a * (255.0 / peak)), 0, 255).astype(np.uint8)


# Pillow's decompression-bomb guard: an image above this many pixels is refused (None: no limit). Pillow's
# default (89.5 M) warns and twice that raises; here the limit is one number, raised by the CLIs' flag.
DEFAULT_MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
Image.MAX_IMAGE_PIXELS = None  # `decode` checks `max_pixels` itself, per call, with a message that says what to do


def decode(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Decoded:
    """Reads an image file, keeping grayscale as gray and alpha apart from the colour channels.

    The EXIF orientation is applied, as image viewers do (a phone photo stored sideways comes out upright).
    16-bit samples are scaled to 8 bits, palette images expanded, CMYK/YCbCr converted to RGB.
    Raises `ImageError` naming the file for a missing, unreadable, truncated or empty image, and for one of
    more than `max_pixels` pixels (a decompression bomb, or a very large photo: pass a higher limit or None).
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} is {w * h / 1e6:.1f} M pixels, above the limit of "
                                 f"{max_pixels / 1e6:.1f} M that guards against decompression bombs "
                                 f"(raise it with --max_image_pixels, 0 for no limit)")
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("PA",):
                im = im.convert("RGBA")
            elif mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                im = im.convert("RGB")
            a = np.asarray(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    if a.size == 0 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{path}: image is empty")
    alpha = None
    if a.ndim == 3 and a.shape[2] in (2, 4):
        alpha = _to_uint8(a[..., -1])
        a = a[..., :-1]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return Decoded(_to_uint8(a), alpha)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads an image as uint8 RGB [H, W, 3]: gray replicated to three channels, alpha dropped."""
    return as_rgb(decode(path).pixels)


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] -> [H, W, 3], gray replicated."""
    return np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels


def write_image(path: str | os.PathLike, pixels: np.ndarray, alpha: np.ndarray | None = None) -> None:
    """Writes uint8 [H, W] or [H, W, 3] (plus optional alpha [H, W]); the format follows the extension."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    if alpha is not None:
        alpha = np.asarray(alpha, dtype=np.uint8)
        pixels = np.concatenate([pixels if pixels.ndim == 3 else pixels[..., None], alpha[..., None]], axis=-1)
        if pixels.shape[-1] == 2:
            im = Image.fromarray(pixels, mode="LA")
        else:
            im = Image.fromarray(pixels, mode="RGBA")
    else:
        im = Image.fromarray(pixels)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(os.fspath(path))


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted image files directly in `folder`; raises `ImageError` for a missing or empty folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ImageError(f"{folder}: no such folder")
    files = sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ImageError(f"{folder}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def find_image(folder: str, stems: tuple[str, ...]) -> str | None:
    """The first file in `folder` whose name without extension is one of `stems` (in that order), or None."""
    if not os.path.isdir(folder):
        return None
    by_stem: dict[str, str] = {}
    for f in sorted(os.listdir(folder)):
        if f.lower().endswith(IMAGE_EXTENSIONS):
            by_stem.setdefault(os.path.splitext(f)[0], os.path.join(folder, f))
    return next((by_stem[s] for s in stems if s in by_stem), None)
