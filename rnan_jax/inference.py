"""Upscaling whole images with a trained model: `upscale_image(params, image)`, optionally in tiles.

Tiling bounds memory by the tile, not the image: the LR image is cut into equal `tile` x `tile` windows
(clamped to the image; the last window in each row and column is shifted back inside the image rather than
padded, so every window has the same size and a large image compiles once) that overlap by at least
`overlap` LR pixels. Each window's output is weighted along each axis by a ramp centred in the middle of
every overlap, rising from 0 to 1 over half the overlap, so the weights of neighbours sum to 1 and the
outer quarter of each overlap, where a window's zero padding is felt, gets weight 0. Convolutions are
therefore reproduced exactly when a quarter of the overlap covers their receptive field; the GC block's
softmax context is global, so with it tiled output differs slightly from whole-image output
(tools/BENCHMARKS.md, "Inference: tiling", measures by how much).
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from PIL import Image

from rnan_jax import api, degrade, ensemble, metrics
from rnan_jax.model import RNANConfig

log = logging.getLogger(__name__)

# Chosen with tools/tiling_bound.py (tools/BENCHMARKS.md, "Inference: tiling"): overlap 8 -> 32 took the
# worst tiled-vs-whole PSNR of a 64-pixel tiling from 66 to 82 dB on an image whose windows see similar
# content; what remains is the GC block's per-window context, which no overlap removes.
DEFAULT_OVERLAP = 32

Params = Mapping[str, Any]


@functools.lru_cache(maxsize=8)
def compiled_forward(config: RNANConfig) -> Callable[[Params, jax.Array], jax.Array]:
    """`apply` jitted for one architecture: (params, lr [B, h, w, 3]) -> sr; jit compiles once per input shape.

    Cached by config so that every `upscale_image` call with the same architecture reuses its compilations.
    """
    return jax.jit(functools.partial(api.apply, config=config))


# The most whole-image/window programs (one per distinct LR shape) `upscale_image` keeps compiled per architecture.
# Each holds its executable in host memory (5-10 MB for the small zoo models on CPU, more for deeper ones) until it is
# dropped, so a folder or benchmark of many distinct sizes (Urban100, a user's photos) grew the process without
# bound; past this many the architecture's programs are dropped together. Generous, so that a training run's
# validation sets (each size recompiled at every validation once dropped) normally stay compiled.
MAX_COMPILED_SHAPES = 64


def _bound_compiled(forward: Any) -> None:
    """Drops `forward`'s compiled programs when it holds more than MAX_COMPILED_SHAPES of them."""
    size = getattr(forward, "_cache_size", None)  # jax.jit's count of compiled input signatures
    if size is not None and size() > MAX_COMPILED_SHAPES:
        forward.clear_cache()


def default_overlap(tile: int | None) -> int:
    """DEFAULT_OVERLAP, or half of a tile of 64 LR pixels or less (which the default would not fit)."""
    return DEFAULT_OVERLAP if tile is None else min(DEFAULT_OVERLAP, tile // 2)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of size `tile` covering [0, length), evenly spread, neighbours overlapping by
    at least `overlap`; the first starts at 0 and the last ends at `length`. Needs tile <= length."""
    if tile >= length:
        return [0]
    count = -(-(length - overlap) // (tile - overlap))  # ceil
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_weights(starts: list[int], tile: int, overlap: int, scale: int) -> list[np.ndarray]:
    """Per-window float32 weights [scale * tile] along one axis, in output (HR) pixels.

    Between neighbouring windows the weight ramps linearly over overlap - 2 * (overlap // 4) LR pixels (a
    hard step when that is 0) centred in the middle of their overlap, so the outer overlap // 4 LR pixels of
    each inner edge get weight 0. The two ramps sum to 1, so the weights of all windows sum to 1 at every
    pixel when a window's two ramps do not meet (windows spaced at least overlap / 2 apart: `tile_starts` may
    space them closer, [0, 12, 25] for 89 pixels in tiles of 64 with overlap 40, where they sum to up to 1.035);
    `_tiled` divides by the summed weights in any case.
    """
    x = np.arange(scale * tile, dtype=np.float64) + 0.5  # pixel centres, relative to the window's start
    ramp = scale * (overlap - 2 * (overlap // 4))  # overlap // 4 LR pixels at each edge get weight 0

    def rising(centre: float) -> np.ndarray:
        if ramp == 0:
            return (x >= centre).astype(np.float64)
        return np.clip((x - centre) / ramp + 0.5, 0.0, 1.0)

    weights = []
    for k, start in enumerate(starts):
        w = np.ones_like(x)
        if k > 0:  # the overlap with the previous window is [start, previous end)
            w *= rising(scale * (starts[k - 1] + tile - start) / 2)
        if k + 1 < len(starts):  # the overlap with the next window is [next start, end)
            w *= 1.0 - rising(scale * (starts[k + 1] - start + tile) / 2)
        weights.append(w.astype(np.float32))
    return weights


def _tiled(run: Callable[[np.ndarray], np.ndarray], lr: np.ndarray, scale: int, tile: int, overlap: int,
           finish: Callable[[np.ndarray], np.ndarray], progress: Callable[[int, int], None] | None) -> np.ndarray:
    """`run` over overlapping windows of lr float32 [h, w, 3], blended, then `finish`ed (e.g. quantized) band
    by band into the output: host memory beyond the output is one row of windows, not the whole float image.
    `progress(done, total)` is called after every window."""
    h, w, _ = lr.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy, wx = blend_weights(ys, th, overlap, scale), blend_weights(xs, tw, overlap, scale)
    out = None
    carry = None  # (weighted sum, weight) of the rows that the previous row of windows shares with this one
    for k, (y, weight_y) in enumerate(zip(ys, wy)):
        acc = np.zeros((scale * th, scale * w, 3), np.float32)
        total = np.zeros((scale * th, scale * w, 1), np.float32)
        if carry is not None:
            acc[:len(carry[0])] += carry[0]
            total[:len(carry[1])] += carry[1]
        for i, (x, weight_x) in enumerate(zip(xs, wx)):
            sr = np.asarray(run(lr[y:y + th, x:x + tw]), np.float32)
            weight = (weight_y[:, None] * weight_x[None, :])[..., None]
            acc[:, scale * x:scale * (x + tw)] += weight * sr
            total[:, scale * x:scale * (x + tw)] += weight
            if progress is not None:
                progress(k * len(xs) + i + 1, len(ys) * len(xs))
        done = scale * (ys[k + 1] - y) if k + 1 < len(ys) else scale * th  # rows no later window touches
        band = finish(acc[:done] / total[:done])
        if out is None:
            out = np.empty((scale * h,) + band.shape[1:], band.dtype)
        out[scale * y:scale * y + done] = band
        carry = (acc[done:], total[done:])
    return out


def check_float_image(lr: np.ndarray, tolerance: float = 1e-3) -> None:
    """Raises ValueError for a float image with NaN/inf values or values outside [0, 1] (by more than
    `tolerance`): the GC block's softmax spreads one NaN to every output pixel, and a 0..255 image gives
    garbage, so both are refused rather than upscaled."""
    finite = np.isfinite(lr)
    if not finite.all():
        raise ValueError(f"image holds {int((~finite).sum())} NaN or infinite value(s); the model needs finite "
                         "values in [0, 1]")
    low, high = (float(lr.min()), float(lr.max())) if lr.size else (0.0, 0.0)  # the span shown: not widened to 0
    if low < -tolerance or high > 1 + tolerance:
        hint = " (a 0..255 image? divide it by 255, or pass it as uint8)" if high > 1.5 else ""
        raise ValueError(f"float image values span [{low:.4g}, {high:.4g}]; expected [0, 1]{hint}")


def _gray16(rgb: np.ndarray) -> np.ndarray:
    """uint16 [..., 3] -> uint16 [...]: round(0.299 R + 0.587 G + 0.114 B), halves up (`metrics.rgb_to_gray`'s)."""
    n = rgb.astype(np.int64) @ np.array([299, 587, 114], np.int64)
    return ((2 * n + 1000) // 2000).astype(np.uint16)


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


# Window sides tried, largest first, when a whole image does not fit in device memory.
FALLBACK_TILES = (1024, 512, 256, 128, 64)
# On CPU, the share of the available host memory that one whole-image program may take before windows are used.
HOST_MEMORY_SHARE = 0.7


_PROC = "/proc"
_CGROUP_ROOT = "/sys/fs/cgroup"


def host_memory_available() -> int | None:
    """Bytes of host memory available to a new allocation, or None where unknown: the least of Linux's MemAvailable,
    what this process's memory cgroup and its ancestors can still take (a container's, a SLURM job's or a
    Kubernetes pod's limit, which MemAvailable does not show: the whole image was judged to fit, and the kernel
    killed the run or XLA aborted on std::bad_alloc) and, under `ulimit -v`, the address space left."""
    known = [v for v in (_proc_field("meminfo", "MemAvailable:"), _cgroup_headroom(), _address_space_left())
             if v is not None]
    return min(known) if known else None


def _proc_field(name: str, key: str) -> int | None:
    """A `key: N kB` line of /proc/<name> (meminfo, self/status), in bytes."""
    try:
        with open(os.path.join(_PROC, name)) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_number(path: str) -> int | None:
    """The integer a cgroup file holds; None for "max" (no limit), a missing or unreadable file."""
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_headroom() -> int | None:
    """The least, over this process's memory cgroups (v2's unified one, or v1's memory controller) and their
    ancestors that set a limit, of limit - (usage - inactive file cache, which the kernel reclaims first); None
    where none is set or readable. A cgroup path that is not under the mount (a container without its own cgroup
    namespace sees its own cgroup at the mount's root) is looked up from the root."""
    try:
        with open(os.path.join(_PROC, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    least = None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            mount, limit_file, usage_file, cache_key = _CGROUP_ROOT, "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            mount, limit_file, usage_file, cache_key = (os.path.join(_CGROUP_ROOT, "memory"), "memory.limit_in_bytes",
                                                        "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        parts = [p for p in path.split("/") if p and p != ".."]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(mount, *parts[:depth])
            limit = _read_number(os.path.join(folder, limit_file))
            usage = _read_number(os.path.join(folder, usage_file))
            if limit is None or usage is None or limit >= 1 << 60:  # v1 writes "no limit" as about 2**63
                continue
            cache = 0
            try:
                with open(os.path.join(folder, "memory.stat")) as f:
                    cache = next((int(v) for k, v in (ln.split() for ln in f if ln.strip()) if k == cache_key), 0)
            except (OSError, ValueError):
                pass
            headroom = max(0, limit - max(0, usage - cache))
            least = headroom if least is None else min(least, headroom)
    return least


def _address_space_left() -> int | None:
    """Under `ulimit -v` (RLIMIT_AS), the address space this process has left; None without one."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    used = _proc_field(os.path.join("self", "status"), "VmSize:")
    return None if used is None else max(0, soft - used)


def _host_memory_tile(forward: Any, params: Params, size: tuple[int, int], overlap: int) -> int | None:
    """On CPU, where device memory is host memory and running out of it gets the process killed (no error to
    fall back on, and the other images of a run lost), the window side to use instead of the whole image: None
    when the whole image's program (compiled here, and reused by the call that follows) fits in
    HOST_MEMORY_SHARE of the available memory, else the largest of FALLBACK_TILES whose share of that
    program's memory, by area, fits (a warning says which)."""
    available = host_memory_available()
    if available is None:
        return None
    h, w = size
    try:
        memory = forward.lower(params, jax.ShapeDtypeStruct((h, w, 3), np.float32)).compile().memory_analysis()
        need = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    except (AttributeError, TypeError, NotImplementedError):  # no analysis on this backend or version
        return None
    budget = HOST_MEMORY_SHARE * available
    if need <= budget:
        return None
    per_pixel = need / (h * w)
    fitting = [t for t in FALLBACK_TILES if t < max(h, w) and t > overlap and per_pixel * t * t <= budget]
    tile = fitting[0] if fitting else min((t for t in FALLBACK_TILES if t > overlap), default=None)
    if tile is not None and tile >= max(h, w):  # no window smaller than the image: whole, as it would be anyway
        return None
    if tile is not None:
        log.warning("a %dx%d image needs about %.1f GiB of host memory whole, %.1f GiB are available; upscaling "
                    "it in %d-pixel windows (choose with --tile / tile=)", w, h, need / 2**30, available / 2**30,
                    tile)
    return tile


class NonFiniteOutputError(ValueError):
    """The model's output holds NaN or infinite values (non-finite parameters, or an overflow in its dtype)."""


def upscale_image(params: Params, image: np.ndarray, *, config: RNANConfig | None = None,
                  tile: int | None = None, overlap: int | None = None, self_ensemble: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Super-resolves one image of any size: [H, W, 3] RGB or [H, W] gray -> [s*H, s*W(, 3)], same kind out.

    image: uint8 (0..255), uint16 (0..65535, read at full precision: x / 65535), or float in [0, 1] (NaN, inf
      or values outside [0, 1] raise ValueError). Integer output has the input's type, clipped and rounded;
      float output is float32, not clipped (as `apply`). Gray is fed to the model replicated to RGB, and its
      output reduced back to gray as round(0.299 R + 0.587 G + 0.114 B) (the metrics' convention; unrounded
      for float).
    config: the architecture (default: read off `params`).
    tile: LR window side for tiled processing (None: the whole image at once; if that runs out of device
      memory, the largest of FALLBACK_TILES that fits is used, with a warning). overlap: LR pixels that
      neighbouring windows share (>= 4 x the receptive field radius makes convolutions exact); default
      `default_overlap(tile)`.
    self_ensemble: average the 8 flips/rotations of each window (RNAN+), in float.
    progress: called as progress(windows done, windows in all) while tiling.
    """
    config = config or api.infer_config(params)
    if isinstance(image, (str, bytes, os.PathLike)):
        raise TypeError(f"image must be an array of pixels, got the path {os.fsdecode(image)!r}: read it first, e.g. "
                        "np.asarray(PIL.Image.open(path).convert('RGB')) (or use python -m rnan_jax.upscale for files)")
    if isinstance(image, Image.Image) and image.mode not in ("L", "RGB", "I;16", "I;16L", "I;16B", "F"):
        # as an array, a palette image (GIF, many PNGs) is its palette indices, which passed as a gray image
        raise ValueError(f"image is a PIL image of mode {image.mode}, whose array is not RGB or gray pixels: pass "
                         "image.convert('RGB') (python -m rnan_jax.upscale keeps alpha, upscaled apart)")
    image = np.asarray(image)
    if image.dtype.byteorder not in ("=", "|"):  # big-endian samples (FITS data, a 16-bit PGM's bytes, Pillow's
        image = image.astype(image.dtype.newbyteorder("="))  # I;16B) are the same values: not "must be uint16, got >u2"
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        hint = ""
        if image.ndim == 4:
            hint = " (a batch: upscale each image, or call rnan_jax.apply, which takes [B, h, w, 3] floats in [0, 1])"
        elif image.ndim == 3 and image.shape[-1] == 4:
            hint = " (RGBA: upscale the RGB channels; python -m rnan_jax.upscale keeps alpha, upscaled apart)"
        elif image.ndim == 3 and image.shape[0] in (1, 3):
            hint = " (channels first? upscale_image takes channels last: image.transpose(1, 2, 0))"
        raise ValueError(f"image must be [H, W, 3] or [H, W], got shape {image.shape}{hint}")
    if image.dtype == np.uint8:
        lr = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        lr = image.astype(np.float32) / 65535.0
    elif jax.numpy.issubdtype(image.dtype, jax.numpy.floating):  # bfloat16 too, which NumPy does not call floating
        lr = image.astype(np.float32)
        check_float_image(lr)
    else:
        raise TypeError(f"image must be uint8, uint16 or float, got {image.dtype}")
    if lr.ndim == 2:
        lr = np.repeat(lr[..., None], 3, axis=-1)
    overlap = default_overlap(tile) if overlap is None else overlap
    if tile is not None and not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap {overlap} and tile {tile}")

    forward = compiled_forward(config)
    _bound_compiled(forward)
    # on the device once, not per call; arrays there already stay where they are (a training run's parameters,
    # replicated over the devices of several processes, which device_put to one device refuses)
    params = jax.tree_util.tree_map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), params)

    def run(x: np.ndarray) -> np.ndarray:
        def fn(y):  # on the host: undone and summed on the device, the ensemble compiled 7 programs per size
            return np.asarray(forward(params, y), np.float32)

        return ensemble.self_ensemble(fn, x) if self_ensemble else fn(x)

    def finish(sr: np.ndarray) -> np.ndarray:
        if not np.isfinite(sr).all():  # clipped and rounded, a NaN was a black pixel: a black image scored or saved
            raise NonFiniteOutputError(f"the model's output holds {int((~np.isfinite(sr)).sum())} NaN or infinite "
                                       "value(s): its parameters are not finite, or its dtype overflowed")
        if image.dtype == np.uint8:
            sr = metrics.quantize(sr)
            return metrics.rgb_to_gray(sr) if image.ndim == 2 else sr
        if image.dtype == np.uint16:
            sr = degrade.round_half_up(np.clip(sr.astype(np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)
            return _gray16(sr) if image.ndim == 2 else sr
        if image.ndim == 2:
            sr = sr[..., 0] * 0.299 + sr[..., 1] * 0.587 + sr[..., 2] * 0.114
        return sr.astype(np.float32)

    h, w, _ = lr.shape
    if tile is None and jax.default_backend() == "cpu":
        tile = _host_memory_tile(forward, params, (h, w), overlap)
    if tile is not None and (tile < h or tile < w):
        return _tiled(run, lr, config.scale, tile, overlap, finish, progress)
    try:
        return finish(run(lr))
    except jax.errors.JaxRuntimeError as e:
        if tile is not None or not is_out_of_memory(e):
            raise
        error = e
    for fallback in (t for t in FALLBACK_TILES if t < max(h, w) and t > overlap):
        log.warning("a %dx%d image does not fit in device memory whole; upscaling it in %d-pixel windows "
                    "(choose with --tile / tile=)", w, h, fallback)
        try:
            return _tiled(run, lr, config.scale, fallback, overlap, finish, progress)
        except jax.errors.JaxRuntimeError as e:
            if not is_out_of_memory(e):
                raise
            error = e
    raise error
