"""Where (HR, LR) image pairs come from: image folders, scikit-image's bundled images, and the decoded-image
cache that folders and DIV2K through TFDS (`rnan_jax.tfds_source`) are read into.

Every source yields full images, `hr` [s*h, s*w, 3] and `lr` [h, w, 3] uint8 RGB, with the HR image cropped
top-left to exactly `scale` times the LR size. TFDS and folder images are decoded once (LR made with
`degrade.bicubic_lr` when no LR file is given) into `.npy` files under a cache folder and come back as
`StoredImage`s, which read only the rows a patch needs: a training patch costs a small read from the page
cache, not a PNG decode or a resize, and worker processes share that cache. Unusable inputs are logged by
name and skipped; only a source left with no image is an error.
"""
from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np

from rnan_jax import benchmark_sets, degrade, env, images, paths
from rnan_jax.benchmark_sets import find_lr_file

log = logging.getLogger(__name__)

# Bump when what goes into a cache file changes (e.g. the resize code), so old entries are not reused.
_CACHE_VERSION = "1"
_CHANGED = ("something removed or rewrote it (a cleaned data.cache_dir?); rerun to remake it, or give each run its "
            "own data.cache_dir")
# np.save's header for a C-ordered uint8 [H, W, C] array (numpy 1.x and 2.x write it alike).
_NPY_PARSER_LOCK = threading.Lock()  # ast.literal_eval is not safe from several threads at once on CPython 3.11
_NPY_UINT8_HWC = re.compile(r"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+), (\d+), (\d+)\), \}")

_BAR_FROM = 10  # images to decode from which a progress bar shows

DEMO_TRAIN_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
# The held-out demo validation image: the centre 320x240 (width x height) crop of the left motorcycle view.
DEMO_VAL_CROP = (130, 210, 240, 320)  # top, left, height, width in stereo_motorcycle()[0] (500 x 741)


class DataError(ValueError):
    """A data source that cannot be used at all; the message is one line that says why."""


def default_cache_dir() -> str:
    """`$RNAN_CACHE_DIR`, else ~/.cache/rnan_jax/data: where decoded and resized training images are kept."""
    return env.cache_folder("data", "RNAN_CACHE_DIR")


def make_pair(hr: np.ndarray, lr: np.ndarray | None, scale: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(hr, lr) uint8 RGB with hr cropped top-left to scale * lr's size; lr = bicubic_lr(hr) when None.

    `hr` and `lr` as a TFDS dataset may hold them: [H, W] or [H, W, 1..4] (gray, gray + alpha, RGB, RGBA; alpha
    dropped), uint8 or uint16 (scaled to 8 bits, as `images.decode` reads a 16-bit file).
    Raises `images.ImageError` naming `name` when a given LR image does not match HR // scale, or an image has
    another shape or sample type.
    """
    hr = _rgb_uint8(hr, name, "HR")
    if lr is None:
        hr = degrade.modcrop(hr, scale)
        return hr, degrade.bicubic_lr(hr, scale)
    lr = _rgb_uint8(lr, name, "LR")
    h, w = lr.shape[:2]
    if (hr.shape[0] // scale, hr.shape[1] // scale) != (h, w):
        raise images.ImageError(
            f"{name}: LR image is {w}x{h} but the HR image is {hr.shape[1]}x{hr.shape[0]} "
            f"(expected {hr.shape[1] // scale}x{hr.shape[0] // scale} at x{scale})"
        )
    return hr[: scale * h, : scale * w], lr


def _rgb_uint8(image: np.ndarray, name: str, which: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of a uint8/uint16 [H, W] or [H, W, 1..4] image (`make_pair`'s inputs). A [H, W, 1] or
    RGBA example of a TFDS dataset was kept as it was, then broke the batches (grain's traceback) or the model's
    input; a uint16 one was cast modulo 256."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (1, 2, 4):
        a = a[..., : 3 if a.shape[2] == 4 else 1]
        a = a[..., 0] if a.shape[2] == 1 else a
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or min(a.shape[:2]) == 0:
        raise images.ImageError(f"{name}: the {which} image has shape {a.shape}, not [H, W] or [H, W, 1..4] pixels")
    if a.dtype == np.uint16:  # by the type's range, as images.decode reads a 16-bit file
        a = np.rint(a * (255.0 / 65535.0)).astype(np.uint8)
    elif a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > 255:
            raise images.ImageError(f"{name}: the {which} image has {a.dtype} samples; give uint8, uint16 or "
                                    "integers in 0..255")
        a = a.astype(np.uint8)
    return images.as_rgb(a)


class ArrayPairs:
    """An in-memory random-access source of {"hr", "lr"} uint8 pairs (grain `RandomAccessDataSource`)."""

    def __init__(self, pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]):
        self.names = tuple(name for name, _, _ in pairs)
        self._pairs = tuple((hr, lr) for _, hr, lr in pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        hr, lr = self._pairs[index]
        return {"hr": hr, "lr": lr}


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """A uint8 [H, W, C] image in an `.npy` file; slicing `[rows, cols]` reads only the band of rows it needs.

    A patch costs one `pread` (tens of microseconds) instead of opening a memory map (hundreds), and the
    object pickles as a path, a shape and an offset.
    """

    path: str
    shape: tuple[int, int, int]
    offset: int  # where the pixels start in the file

    @classmethod
    def open(cls, path: str) -> StoredImage:
        """Reads the `.npy` header; raises ValueError if it is not a C-ordered uint8 [H, W, C] array or is truncated.

        The header is matched as `np.save` writes it, not parsed by numpy: numpy's `ast.literal_eval` fails at
        random when threads call it at once on CPython 3.11 ("AST constructor recursion depth mismatch"), and
        `prepare_cached` opens its entries from a pool of threads. A header written another way (another
        numpy) is parsed with `ast.literal_eval`, one thread at a time.
        """
        with open(path, "rb") as f:
            magic = f.read(8)
            if magic[:6] != b"\x93NUMPY" or magic[6:7] not in (b"\x01", b"\x02", b"\x03"):
                raise ValueError(f"{path}: not a .npy file")
            size_bytes = 2 if magic[6:7] == b"\x01" else 4
            header_len = int.from_bytes(f.read(size_bytes), "little")
            header = f.read(header_len).decode("latin1")
            offset = 8 + size_bytes + header_len
        if len(header) != header_len:
            raise ValueError(f"{path}: truncated")
        match = _NPY_UINT8_HWC.fullmatch(header.strip())
        if match is not None:
            shape = tuple(int(v) for v in match.groups())
        else:  # another numpy's way of writing it: numpy's own parser, one thread at a time
            with _NPY_PARSER_LOCK:
                try:
                    fields = ast.literal_eval(header.strip())
                except (ValueError, SyntaxError):
                    fields = {}
            fields = fields if isinstance(fields, dict) else {}
            shape = tuple(fields.get("shape", ()))
            if (fields.get("descr") != "|u1" or fields.get("fortran_order", True) or len(shape) != 3
                    or not all(isinstance(v, int) for v in shape)):
                raise ValueError(f"{path}: not a C-ordered uint8 [H, W, C] array")
        if os.path.getsize(path) != offset + int(np.prod(shape)):
            raise ValueError(f"{path}: truncated")
        return cls(path, shape, offset)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """Raises `DataError` (one line) when the file has gone or shrunk since it was opened."""
        rows, cols = key
        h, w, c = self.shape
        start, stop, step = rows.indices(h)
        if step != 1:
            raise IndexError("StoredImage rows must be a contiguous slice")
        size = max(stop - start, 0) * w * c
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                band = os.pread(fd, size, self.offset + start * w * c)
            finally:
                os.close(fd)
        except OSError as e:
            raise DataError(f"cache file {self.path}: {e.strerror or e} while training; {_CHANGED}") from None
        if len(band) != size:
            raise DataError(f"cache file {self.path}: shorter than when it was opened (truncated) while training; "
                            f"{_CHANGED}")
        return np.frombuffer(band, np.uint8).reshape(-1, w, c)[:, cols]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:, :]
        return a if dtype is None else a.astype(dtype)


class CachedPairs:
    """A random-access source of {"hr", "lr"} `StoredImage`s (cached `.npy` files); pickles cheaply for
    grain's worker processes."""

    def __init__(self, entries: Sequence[tuple[str, StoredImage, StoredImage]]):
        self.names = tuple(name for name, _, _ in entries)
        self._images = tuple((hr, lr) for _, hr, lr in entries)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, StoredImage]:
        hr, lr = self._images[index]
        return {"hr": hr, "lr": lr}


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """One training image before decoding: `load()` -> (hr, lr or None) raises `images.ImageError`."""

    name: str
    key: str  # identifies the inputs' content (paths, sizes, times) for the cache
    load: Callable[[], tuple[np.ndarray, np.ndarray | None]]
    # whether a failed load is tried again by a rerun: a TFDS record's key does not change when it is read
    # again, and its failure may be a passing one (a gs:// read); a file's key changes with the file
    retry_unusable: bool = False


def digest(*parts: object) -> str:
    """A short hex key of the parts, for cache file names (a spec's `key`)."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _file_id(path: str) -> str:
    # The inode and change time too: a copy that keeps the old modification time (cp -p, rsync -a, tar x) of
    # another image of the same size (any BMP or PPM of the same shape) left the size and mtime unchanged, and
    # the cache served the old image's pixels. Neither can be set back by a user.
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


class _Skip(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _open_cached(hr_path: str, lr_path: str) -> tuple[StoredImage, StoredImage] | None:
    if not (os.path.exists(hr_path) and os.path.exists(lr_path)):
        return None
    try:
        pair = StoredImage.open(hr_path), StoredImage.open(lr_path)
    except (OSError, ValueError) as e:
        log.warning("remaking cache entry: %s", e)
        return None
    # an entry of a TFDS example of 1 or 4 channels, stored as it was before `make_pair` made it RGB
    return pair if all(image.shape[2] == 3 for image in pair) else None


def _entry_paths(spec: PairSpec, scale: int, cache_dir: str) -> tuple[str, str]:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name)[-48:].lstrip("_.") or "image"
    base = os.path.join(cache_dir, f"{stem}-{digest(spec.key, scale, _CACHE_VERSION)}")
    return base + ".hr.npy", base + ".lr.npy"


def _unusable_path(spec: PairSpec, scale: int, cache_dir: str) -> str:
    """Where the reason a spec cannot be used is kept: a rerun skips it again without reading it or announcing
    it as to decode (a new key, as a changed or replaced file gets, tries again)."""
    return _entry_paths(spec, scale, cache_dir)[0][: -len(".hr.npy")] + ".unusable.txt"


def _remember_unusable(spec: PairSpec, scale: int, cache_dir: str, reason: str) -> None:
    """Keeps why `spec` cannot be used, for `_known_unusable`, if it can be written; else a rerun tries again."""
    with contextlib.suppress(OSError):
        paths.write_atomically(_unusable_path(spec, scale, cache_dir), lambda f: f.write(reason.encode()))


def _known_unusable(spec: PairSpec, scale: int, cache_dir: str) -> str | None:
    try:
        with open(_unusable_path(spec, scale, cache_dir), encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _prepare_one(spec: PairSpec, scale: int, min_lr: int, cache_dir: str) -> tuple[str, StoredImage, StoredImage]:
    """The spec's cached pair, made first if need be. An image too small for the patch is cached all the same
    (it is small, and another patch size may use it): a rerun neither decodes it again nor announces it as to do."""
    hr_path, lr_path = _entry_paths(spec, scale, cache_dir)
    too_small = f"{spec.name}: {{w}}x{{h}} is smaller than the {scale * min_lr}-pixel HR patch (x{scale})"
    if (cached := _open_cached(hr_path, lr_path)) is not None:
        h, w, _ = cached[0].shape
    elif (reason := _known_unusable(spec, scale, cache_dir)) is not None:
        if (size := re.fullmatch(r"small\t(\d+)x(\d+)", reason)) is not None:  # not one LR pixel
            raise _Skip("small", too_small.format(w=size[1], h=size[2]))
        raise _Skip("unreadable", reason)
    else:
        try:
            hr, lr = spec.load()
            if min(hr.shape[:2]) < scale:  # not one LR pixel: nothing to cache, so remembered as unusable (it
                # was decoded again, and announced as an image to decode, by every run)
                _remember_unusable(spec, scale, cache_dir, f"small\t{hr.shape[1]}x{hr.shape[0]}")
                raise _Skip("small", too_small.format(w=hr.shape[1], h=hr.shape[0]))
            hr, lr = make_pair(hr, lr, scale, spec.name)
        except images.ImageError as e:
            reason = " ".join(str(e).split())
            if not (spec.retry_unusable or _system_error(e)):
                _remember_unusable(spec, scale, cache_dir, reason)
            raise _Skip("unreadable", reason) from None
        h, w, _ = hr.shape
        try:
            # through a partial file: a run reading the cache while another makes the same entry sees the old file
            # or the whole new one, and a failed write leaves nothing
            for path, array in ((hr_path, hr), (lr_path, lr)):
                paths.write_atomically(path, lambda f, a=array: np.save(f, np.ascontiguousarray(a)))
        except OSError as e:  # no permission (a read-only cache made before small images were cached), disk full
            if min(h, w) >= scale * min_lr:
                raise _unwritable(cache_dir, e) from None
    if min(h, w) < scale * min_lr:
        raise _Skip("small", too_small.format(w=w, h=h))
    return spec.name, *(cached or (StoredImage.open(hr_path), StoredImage.open(lr_path)))


def _system_error(error: images.ImageError) -> bool:
    """Whether the system, not the file's content, failed the read: an OSError with an errno behind the
    ImageError (EIO or ESTALE from a loaded NFS or gcsfuse mount, EMFILE, EACCES), which the next run may not
    meet. Remembered as unusable, the image was skipped by every later run (of every host sharing the cache)
    for good, with "[Errno 5] Input/output error", although it read well. Pillow's errors about the content
    ("image file is truncated", "cannot identify image file") carry no errno."""
    cause = error.__cause__ or error.__context__
    return isinstance(cause, OSError) and cause.errno is not None


def _unwritable(cache_dir: str, error: OSError) -> DataError:
    return DataError(f"cannot write the decoded-image cache in data.cache_dir={cache_dir} "
                     f"({error.strerror or error}); point data.cache_dir (or $RNAN_CACHE_DIR) at a writable folder")


def prepare_cached(
    specs: Sequence[PairSpec], *, scale: int, min_lr_size: int, cache_dir: str, what: str, threads: int = 0,
    announce: Callable[[str], None] | None = None,
) -> CachedPairs:
    """Decodes (and resizes) each spec once into `cache_dir`, reusing earlier entries; skips and logs unusable ones.

    `min_lr_size`: images whose LR side would be below it (HR below scale * min_lr_size) are skipped.
    `announce`: gets the one line that says how many images are decoded into which folder, before they are
    (nothing when all are cached), and a progress bar shows on a terminal's stderr when more than a handful
    are (the trainer passes its printer, on process 0 only); None: the line is logged at INFO, with no bar.
    Raises `DataError` (one line) when no image is usable or `cache_dir` cannot be written.
    """
    start = time.perf_counter()
    threads = threads or min(8, os.cpu_count() or 1)
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:  # a file in the way, no permission
        raise _unwritable(cache_dir, e) from None
    bar = _announce(specs, scale, cache_dir, what, announce)
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    entries, skipped = [], []
    try:
        futures = [pool.submit(_prepare_one, s, scale, min_lr_size, cache_dir) for s in specs]
        for f in futures:
            try:
                entries.append(f.result())
            except _Skip as e:
                log.warning("skipping %s", e)
                skipped.append(e)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        # On an error or Ctrl-C, the images not started are dropped: waiting for them (`with pool`) took as long
        # as decoding the whole set (minutes for DIV2K) before the run could stop.
        pool.shutdown(wait=True, cancel_futures=True)
    _report(what, len(specs), skipped, scale * min_lr_size)
    log.info("%s: %d images ready in %s (%.1f s)", what, len(entries), cache_dir, time.perf_counter() - start)
    return CachedPairs(entries)


def _announce(specs: Sequence[PairSpec], scale: int, cache_dir: str, what: str,
              announce: Callable[[str], None] | None):
    """Says how many of the images are not in the cache yet (the first run's decode of DIV2K takes minutes);
    returns a tqdm bar over all of them (the cached ones counted done) when one should show, else None."""
    todo = sum(not all(map(os.path.exists, _entry_paths(s, scale, cache_dir)))
               and not os.path.exists(_unusable_path(s, scale, cache_dir)) for s in specs)
    if not todo:
        return None
    why = "first use" if todo == len(specs) else f"{len(specs) - todo} already cached"
    (announce or log.info)(f"{what}: decoding {todo} of {len(specs)} images into {cache_dir} ({why}; later runs "
                           "reuse them) ...")
    if announce is None or todo < _BAR_FROM or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=len(specs), initial=len(specs) - todo, desc="decoding", unit="image", dynamic_ncols=True,
                leave=False)


def _report(what: str, total: int, skipped: Sequence[_Skip], hr_patch: int) -> None:
    if not total:  # an empty TFDS split ("train[800:]" of DIV2K's 800): a ZeroDivisionError in train_dataset
        raise DataError(f"{what}: the source holds no image")
    if not skipped:
        return
    kinds = {"unreadable": "unreadable or without a matching LR image",
             "small": f"smaller than the {hr_patch}-pixel HR patch"}
    detail = ", ".join(f"{n} {text}" for k, text in kinds.items() if (n := sum(s.kind == k for s in skipped)))
    if len(skipped) == total:
        raise DataError(f"{what}: no usable image: all {total} were skipped ({detail}); first: {skipped[0]}")
    log.warning("%s: skipped %d of %d images (%s)", what, len(skipped), total, detail)


def _load_files(hr_path: str, lr_path: str | None, scale: int,
                tags: tuple[int, int] = (1, 1)) -> tuple[np.ndarray, np.ndarray | None]:
    """The pair's pixels; `tags`: the HR and LR files' EXIF orientations (`folder_specs` read them for the key)."""
    hr = images.read_rgb(hr_path)
    if lr_path is None:
        return hr, None
    # an HR photo with an EXIF orientation tag and an LR file made from its stored pixels without the tag: the
    # HR alone was turned, and the pair trained misaligned (a square one) or was skipped as mis-sized
    return hr, benchmark_sets.lr_oriented_as_hr(hr, tags[0], images.read_rgb(lr_path), tags[1], scale)


def _unusable(error: images.ImageError) -> tuple[np.ndarray, np.ndarray | None]:
    raise error


def image_number(path: str) -> int | None:
    """The number a file's name is (801 for .../0801.png, as DIV2K's), None for a name that is not a number."""
    stem = benchmark_sets.image_name(path)
    return int(stem) if stem.isascii() and stem.isdigit() else None


def range_text(number_range: tuple[int, int]) -> str:
    """"801-810" for (801, 810), "801" for (801, 801)."""
    first, last = number_range
    return f"{first}-{last}" if first != last else f"{first}"


def numbered(files: Sequence[str], number_range: tuple[int, int] | None, folder: str, what: str, key: str
             ) -> list[str]:
    """The files (in order) whose `image_number` is in `number_range` (first, last; both included), all for None.
    Raises `DataError` (one line, naming the config `key`) when none is."""
    if number_range is None:
        return list(files)
    first, last = number_range
    kept = [f for f in files if (n := image_number(f)) is not None and first <= n <= last]
    if not kept:
        numbers = sorted(n for f in files if (n := image_number(f)) is not None)
        there = (f"its {len(numbers)} numbered images are {numbers[0]}-{numbers[-1]}" if numbers else
                 "no file there is named by a number, as DIV2K's 0001.png")
        raise DataError(f"{what}: {key} {range_text(number_range)} matches no image in {folder} ({there})")
    return kept


def folder_specs(hr_dirs: Sequence[str], lr_dirs: Sequence[str], scale: int, what: str = "training images",
                 ranges: Sequence[tuple[int, int] | None] = ()) -> list[PairSpec]:
    """One spec per image file in `hr_dirs` (in order, files sorted), LR from the matching `lr_dirs` entry.

    Empty `lr_dirs`: LR is made with `degrade.bicubic_lr`. `ranges`: empty, or one per HR folder, the (first, last)
    file-name numbers to take from it (`numbered`; data.hr_range), None for all. Raises `DataError` for a missing
    or empty folder, or a range that matches no file in its folder.
    """
    if lr_dirs and len(lr_dirs) != len(hr_dirs):
        raise DataError(f"{what}: {len(lr_dirs)} LR folders for {len(hr_dirs)} HR folders; give one per HR folder")
    if ranges and len(ranges) != len(hr_dirs):
        raise DataError(f"{what}: {len(ranges)} ranges for {len(hr_dirs)} HR folders; give one per HR folder")
    specs = []
    for i, hr_dir in enumerate(hr_dirs):
        try:
            files = images.list_images(hr_dir)
        except images.ImageError as e:
            raise DataError(f"{what}: {e}") from None
        files = numbered(files, ranges[i] if ranges else None, hr_dir, what, "data.hr_range")
        lr_dir = lr_dirs[i] if lr_dirs else None
        if lr_dir is not None and not os.path.isdir(lr_dir):
            raise DataError(f"{what}: {lr_dir}: no such LR folder")
        for folder in [] if lr_dir is None else [lr_dir, os.path.join(lr_dir, f"X{scale}")]:
            try:  # said once here, not once per image (800 lines for DIV2K) before "no usable image"
                if os.path.isdir(folder):
                    os.listdir(folder)
            except OSError as e:
                raise DataError(f"{what}: {folder}: cannot list the LR folder ({e.strerror or e})") from None
        for hr_path in files:
            try:
                lr_path = None if lr_dir is None else find_lr_file(hr_path, lr_dir, scale)
                key = digest(_file_id(hr_path), "bicubic_lr" if lr_path is None else _file_id(lr_path))
                # images' reading, which finds a PNG's eXIf chunk after the pixels too (decode applies it)
                tags = (1, 1) if lr_path is None else (images.exif_orientation(hr_path),
                                                       images.exif_orientation(lr_path))
                if tags[0] != tags[1]:  # pairs whose tags differ: entries made before they were lined up are not used
                    key = digest(key, "orientations", *tags)
            except (images.ImageError, OSError) as e:  # no LR file; a broken link, a file gone since the listing
                error = e if isinstance(e, images.ImageError) else images.ImageError(f"{e.filename}: {e.strerror}")
                # keyed by the reason too: the one kept for it is said by a rerun (another lr_dirs named the first)
                specs.append(PairSpec(hr_path, digest(hr_path, "missing", error), lambda e=error: _unusable(e)))
                continue
            specs.append(PairSpec(hr_path, key, lambda p=hr_path, q=lr_path, t=tags: _load_files(p, q, scale, t)))
    return specs


def demo_train_images() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled training images for the demo (no download): (name, uint8 RGB [H, W, 3])."""
    import skimage.data

    return [(n, images.as_rgb(getattr(skimage.data, n)())) for n in DEMO_TRAIN_NAMES]


def demo_validation_image() -> tuple[str, np.ndarray]:
    """The held-out demo image: the centre 320x240 crop of `skimage.data.stereo_motorcycle()[0]`, uint8 RGB."""
    import skimage.data

    top, left, h, w = DEMO_VAL_CROP
    return "stereo_motorcycle_320x240", skimage.data.stereo_motorcycle()[0][top: top + h, left: left + w]
