"""Training and validation data: config, the seeded patch transform and the grain pipeline.

Training: a random-access source of full (HR, LR) pairs (`rnan_jax.sources`, all of them in every process) ->
repeat to >= 16k entries -> shuffle -> repeat forever -> a random LR patch with the HR patch at the matching
place and one of the 8 rot90/flip transforms -> batch -> `to_iter_dataset` with read threads (+ worker
processes), wrapped in `loader.BatchIterator`, whose checkpointable state is a batch count. Batches stay uint8 on
the host, {"lr": [b, p, p, 3], "hr": [b, s*p, s*p, 3]}: the train step should convert them to float32 in
[0, 1] on the device, which moves a quarter of the bytes and spares the host a conversion that costs more
than making the batch (tools/BENCHMARKS.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from typing import Any, Callable, Iterable

import grain
import ml_collections
import numpy as np

from rnan_jax import benchmark_sets, degrade, images, loader, paths, sources, tfds_source
from rnan_jax.ensemble import transform  # the 8 dihedral maps, shared with RNAN+
from rnan_jax.env import default_data_dir

log = logging.getLogger(__name__)

SOURCES = ("tfds", "folder", "demo")
VAL_SOURCES = ("demo", "benchmark", "folder", "tfds")
_MIN_SHUFFLE_LENGTH = 16384


def _items(value: Any) -> list[Any]:
    """A list key's items: a text's comma-separated parts, or a tuple's or list's own items (a dict given from Python:
    hr_dirs=("/a", "/b") was an AttributeError traceback)."""
    return list(value) if isinstance(value, (tuple, list)) else str(value).split(",")


def _split_dirs(value: str | tuple[str, ...], scale: int = 0) -> tuple[str, ...]:
    return tuple(os.path.expanduser(str(d).strip()) for d in _items(value) if str(d).strip())


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section: its keys and defaults (`default_config` is made from these fields), their
    meaning, checks, and the typed values the pipeline uses (`from_config` resolves "" defaults)."""

    scale: int  # from model.scale, not a key of the section
    # Training images: "tfds" (DIV2K via tfds.data_source), "folder" (hr_dirs/lr_dirs) or "demo" (the six
    # images scikit-image ships: astronaut, coffee, chelsea, rocket, immunohistochemistry, hubble_deep_field).
    source: str = "tfds"
    patch_size: int = 48  # LR patch side; the HR patch is scale * patch_size (paper: 48)
    augment: bool = True  # one of the 8 rot90/flip transforms per patch, the same on LR and HR
    tfds_name: str = ""  # "" = f"div2k/bicubic_x{scale}"
    tfds_data_dir: str | None = ""  # "" (None once resolved) = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    tfds_split: str = "train"  # any TFDS split string, e.g. "train[:100]"
    # source="folder": comma-separated HR folders, e.g. ".../train/T91,.../train/BSD200" (a tuple once resolved)
    hr_dirs: tuple[str, ...] | str = ""
    # source="folder": comma-separated LR folders, one per HR folder, in DIV2K's naming (X4/0001x4.png,
    # 0001x4.png or 0001.png); "" = make LR from HR with degrade.bicubic_lr (MATLAB bicubic).
    lr_dirs: tuple[str, ...] | str = ""
    # source="folder": which images of each hr_dirs folder to train on, by the number that is the file's name
    # (0801.png is 801; files not named by a number are left out): "FIRST-LAST" (both included) or "N", one per
    # HR folder, comma-separated as hr_dirs, an empty one for a whole folder ("1-800," for DIV2K then Flickr2K);
    # "" = every file. EDSR's --data_range 1-800/801-810 on one DIV2K folder of 0001..0900 is hr_range="1-800"
    # with val_range="801-810" (EDSR counts the sorted files from 1: the same images there). Ranges are tuples
    # of (first, last) or None once resolved.
    hr_range: tuple[tuple[int, int] | None, ...] | str = ""
    # Decoded (and bicubic-made) training images as .npy, made once and reused by later runs;
    # "" = $RNAN_CACHE_DIR or ~/.cache/rnan_jax/data. DIV2K needs about 7 GB there at x4, 8.5 GB at x2 (estimated).
    cache_dir: str = ""
    num_workers: int = 0  # grain worker processes making batches (0 = in the training process)
    worker_buffer_size: int = 2  # batches each worker process keeps ready
    read_threads: int = 4  # threads per process making batches (grain ReadOptions.num_threads)
    prefetch_buffer_size: int = 8  # batches read ahead per process (grain ReadOptions.prefetch_buffer_size)
    # Validation (full images): "benchmark" (val_set under val_dir), "folder" (val_dir, LR from val_lr_dir
    # or bicubic), "tfds" (the validation split of tfds_name) or "demo" (a held-out crop of
    # skimage.data.stereo_motorcycle()). LR is made with degrade.bicubic_lr wherever no LR file is given.
    val_source: str = "benchmark"
    # val_source="benchmark": Set5, Set14, B100 or Urban100, or several, comma-separated ("Set5,Set14"): the
    # first is the run's val/psnr (which picks best/), each other logged as val/<set>/psnr
    val_set: str = "Set5"
    val_dir: str = ""  # "benchmark": the folder holding <val_set>/HR ("" = <data dir>/benchmark); "folder": HR folder
    val_lr_dir: str = ""  # val_source="folder": LR folder in DIV2K naming; "" = bicubic
    # val_source="folder": the images of val_dir to validate on, by file-name number as hr_range ("801-810");
    # "" = every file. A val_dir that is also a training folder must take images its hr_range leaves out: a
    # run validating on images it trains on is refused (its val/psnr, and best/, would measure memory).
    val_range: tuple[int, int] | None | str = ""
    val_max_images: int = 10  # use the first N usable validation images (0 = all); unusable ones do not count

    @property
    def val_sets(self) -> tuple[str, ...]:
        """The benchmark sets `val_set` names, in order."""
        return tuple(n.strip() for n in self.val_set.split(","))

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.val_source not in VAL_SOURCES:
            raise ValueError(f"data.val_source must be one of {', '.join(VAL_SOURCES)}; got {self.val_source!r}")
        if self.scale < 1 or self.patch_size < 1:
            raise ValueError(f"scale and data.patch_size must be positive; got {self.scale} and {self.patch_size}")
        if self.source == "folder" and not self.hr_dirs:
            raise ValueError("data.source='folder' needs data.hr_dirs (comma-separated HR image folders)")
        if self.lr_dirs and len(self.lr_dirs) != len(self.hr_dirs):
            raise ValueError(f"data.lr_dirs names {len(self.lr_dirs)} folders for {len(self.hr_dirs)} in data.hr_dirs")
        if self.hr_range and len(self.hr_range) != len(self.hr_dirs):
            raise ValueError(f"data.hr_range gives {len(self.hr_range)} ranges for the {len(self.hr_dirs)} folders of "
                             "data.hr_dirs: give one per folder, comma-separated, an empty one for a whole folder "
                             "(e.g. '1-800,')")
        if self.val_source == "benchmark" and (not all(self.val_sets) or len(set(self.val_sets)) < len(self.val_sets)):
            raise ValueError(f"data.val_set must name one set or several, comma-separated and each once; got "
                             f"{self.val_set!r}")
        if self.val_source == "folder" and not self.val_dir:
            raise ValueError("data.val_source='folder' needs data.val_dir (a folder of HR images)")
        if self.source == "folder" and self.val_source == "folder":
            self._check_disjoint()
        if min(self.num_workers, self.val_max_images) < 0 or min(self.read_threads, self.prefetch_buffer_size,
                                                                 self.worker_buffer_size) < 1:
            raise ValueError("data.num_workers and val_max_images must be >= 0, the buffer and thread counts >= 1")

    def _check_disjoint(self) -> None:
        """Raises ValueError when val_dir is one of hr_dirs and the two ranges share a number."""
        val, v = os.path.realpath(self.val_dir), self.val_range
        for i, hr_dir in enumerate(self.hr_dirs):
            t = self.hr_range[i] if self.hr_range else None
            if os.path.realpath(hr_dir) != val or (t is not None and v is not None and (t[1] < v[0] or v[1] < t[0])):
                continue
            given = (f"data.val_range {sources.range_text(v)} overlaps data.hr_range {sources.range_text(t)} there"
                     if t is not None and v is not None else
                     f"data.{'hr_range' if t is None else 'val_range'} takes the whole folder")
            raise ValueError(f"data.val_dir {self.val_dir} is also a training folder (data.hr_dirs) and {given}: the "
                             "run would validate on images it trains on; give disjoint ranges, e.g. "
                             "data.hr_range='1-800' and data.val_range='801-810' for DIV2K")

    @classmethod
    def from_config(cls, cd: ml_collections.ConfigDict | dict[str, Any], *, scale: int) -> DataConfig:
        """The `data` ConfigDict (or dict) -> DataConfig; unknown keys and values raise ValueError."""
        values = dict(cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else cd)
        defaults = default_config().to_dict()
        if unknown := sorted(set(values) - set(defaults)):
            raise ValueError(f"unknown data config keys {unknown}; known: {sorted(defaults)}")
        values = {**defaults, **values}
        # None in a text key is its unset "", as configs.check_nones reads an experiment file; in another key a
        # ValueError (`_typed`): augment=None turned the augmentation off, "False" on, as bool() read them.
        values = {k: "" if v is None and defaults[k] == "" else v for k, v in values.items()}
        _check_read(values)
        for key in ("hr_dirs", "lr_dirs", "val_dir", "val_lr_dir", "cache_dir"):
            for value in map(str, _items(values[key])) if key.endswith("dirs") else [str(values[key])]:
                advice = ("the decoded-image cache is on local disk" if key == "cache_dir" else
                          "copy the images here first, e.g. gcloud storage cp -r; TFDS reads gs:// itself: "
                          "data.tfds_data_dir")
                if (error := paths.url_error(f"data.{key}", value.strip(), advice)) is not None:
                    raise ValueError(error)  # it was "no such folder" (or a local folder named gs:) after setup
        resolved = {name: _RESOLVE.get(name, lambda v, s, n=name: _typed(n, v, defaults[n]))(values[name], scale)
                    for name in defaults}
        return cls(scale=int(scale), **resolved)


def _check_read(values: dict[str, Any]) -> None:
    """Raises ValueError for a data key set (in the config as given, before defaults are resolved) that the
    chosen sources do not read: it would be ignored without a word, and the run train on other data."""
    source, val_source = values["source"], values["val_source"]
    unread = [(key, f"data.source is {source!r}; set --config.data.source=folder to train on it")
              for key in ("hr_dirs", "lr_dirs", "hr_range") if values[key] and source != "folder"]
    unread += [(key, f"data.val_source is {val_source!r}")
               for key, readers in (("val_dir", ("folder", "benchmark")), ("val_lr_dir", ("folder",)),
                                    ("val_range", ("folder",)))
               if values[key] and val_source not in readers]
    unread += [(key, f"neither data.source nor data.val_source is 'tfds' (they are {source!r} and {val_source!r})")
               for key in ("tfds_name", "tfds_data_dir") if values[key] and "tfds" not in (source, val_source)]
    if unread:
        key, why = unread[0]
        raise ValueError(f"data.{key} is set but nothing reads it: {why}")


_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_FORMS = {"hr_range": "a text of ranges, one per data.hr_dirs folder, comma-separated ('1-800' or '1-800,'), or a "
                      "tuple of one per folder, each 'FIRST-LAST', 'N', '' (the whole folder), (FIRST, LAST) or None "
                      "(('1-800', '') or ((1, 800), None))",
          "val_range": "'FIRST-LAST' (both included, e.g. '801-810'), 'N', (FIRST, LAST) or '' (every file)"}


def _int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _typed(key: str, value: Any, default: Any) -> Any:
    """`value` as the type of the key's default (bool, int or str), as a ConfigDict takes it; ValueError (one line)
    for a value of another kind: a dict's "False" or None was read by bool() as True or False."""
    kind = type(default)
    if isinstance(value, (bool, np.bool_)) if kind is bool else _int(value) if kind is int else isinstance(value, kind):
        return kind(value)
    what = {bool: "a bool (True or False)", int: "an int", str: "a str"}[kind]
    raise ValueError(f"data.{key} must be {what} (default {default!r}); got {value!r}")


def _parse_range(key: str, text: Any) -> tuple[int, int] | None:
    """(first, last) of "FIRST-LAST" or "N" (or, from Python, a (FIRST, LAST) pair or an int N); None for "" (or
    None); ValueError (one line, naming data.KEY) otherwise."""
    if text is None:
        return None
    if _int(text) or (isinstance(text, (tuple, list)) and len(text) == 2 and all(map(_int, text))):
        first, last = (int(text), int(text)) if _int(text) else (int(text[0]), int(text[1]))
        if first < 0:
            raise ValueError(f"data.{key} {text!r} is not a range of image numbers: give {_FORMS[key]}")
        text = f"{first}-{last}"
    elif not isinstance(text, str):
        raise ValueError(f"data.{key} {text!r} is not a range of image numbers: give {_FORMS[key]}")
    if not text.strip():
        return None
    match = _RANGE.fullmatch(text)
    if match is None:
        halves = text.split("/")
        edsr = (f"; EDSR's --data_range {text.strip()} is data.hr_range={halves[0].strip()!r} and "
                f"data.val_range={halves[1].strip()!r}" if len(halves) == 2 and all(map(_RANGE.fullmatch, halves))
                else "")
        raise ValueError(f"data.{key} {text!r} is not a range of image numbers: give 'FIRST-LAST' (both included, "
                         f"e.g. '1-800') or 'N'{edsr}")
    first, last = int(match[1]), int(match[2] or match[1])
    if first > last:
        raise ValueError(f"data.{key} {text!r} is empty: its first number, {first}, is above its last, {last}")
    return first, last


def _parse_ranges(value: Any, scale: int) -> tuple[tuple[int, int] | None, ...]:
    """hr_range's ranges: a text's comma-separated ones, or (from Python) a tuple's or list's items. A bare pair of
    ints, (1, 800), is refused: one range for one folder or the images 1 and 800 of two."""
    if isinstance(value, (tuple, list)):
        if len(value) == 2 and all(map(_int, value)):
            raise ValueError(f"data.hr_range {value!r} is ambiguous: one range per data.hr_dirs folder, so "
                             f"'{value[0]}-{value[1]}' or (({value[0]}, {value[1]}),) for one folder; give "
                             f"{_FORMS['hr_range']}")
        return tuple(_parse_range("hr_range", t) for t in value)
    if _int(value):
        return (_parse_range("hr_range", value),)
    if not isinstance(value, str):
        raise ValueError(f"data.hr_range {value!r} is not a range of image numbers: give {_FORMS['hr_range']}")
    return () if not value.strip() else tuple(_parse_range("hr_range", t) for t in value.split(","))


# How a key's config value becomes its DataConfig value (the rest: cast to the default's type).
_RESOLVE = {
    "tfds_name": lambda v, scale: v or f"div2k/bicubic_x{scale}",
    "tfds_data_dir": lambda v, scale: v or None,
    "hr_dirs": _split_dirs,
    "lr_dirs": _split_dirs,
    "cache_dir": lambda v, scale: os.path.expanduser(v) or sources.default_cache_dir(),
    "val_dir": lambda v, scale: os.path.expanduser(v),
    "val_lr_dir": lambda v, scale: os.path.expanduser(v),
    "hr_range": _parse_ranges,
    "val_range": lambda v, scale: _parse_range("val_range", v),
}


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of an experiment config: every field of `DataConfig` (documented there) but scale."""
    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(DataConfig) if f.name != "scale"})


@dataclasses.dataclass(frozen=True)
class RandomPatch(grain.transforms.RandomMap):
    """{"hr", "lr"} full images -> a random LR patch [p, p, 3] and the HR patch [s*p, s*p, 3] at the matching
    place (LR top-left (y, x) <-> HR top-left (s*y, s*x)), both under the same random dihedral transform."""

    patch_size: int
    scale: int
    augment: bool = True

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        lr, hr = element["lr"], element["hr"]
        p, s = self.patch_size, self.scale
        y = int(rng.integers(0, lr.shape[0] - p + 1))
        x = int(rng.integers(0, lr.shape[1] - p + 1))
        k = int(rng.integers(0, 8)) if self.augment else 0
        lr_patch = lr[y: y + p, x: x + p]
        hr_patch = hr[s * y: s * (y + p), s * x: s * (x + p)]
        # np.array copies: the patch owns writable memory, not a view of a read buffer or a cached image.
        return {"lr": np.array(transform(lr_patch, k)), "hr": np.array(transform(hr_patch, k))}


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def training_pairs(cfg: DataConfig, announce: Callable[[str], None] | None = None):
    """All training pairs, the same list in every process (each then reads, lazily, the patches of its share
    of each global batch: `train_dataset`). `announce`: as `sources.prepare_cached`'s, the line that says a first
    run decodes the images into the cache (and a progress bar on a terminal).

    Returns a grain random-access source of {"hr", "lr"} uint8 full images with `.names`.
    Raises `sources.DataError` (one line) when no usable image remains.
    """
    split = f" {cfg.tfds_name} split {cfg.tfds_split!r}" if cfg.source == "tfds" else ""
    what = f"training images ({cfg.source}{split})"
    min_lr = cfg.patch_size
    if cfg.source == "demo":
        pairs = [(n, *sources.make_pair(im, None, cfg.scale, n)) for n, im in sources.demo_train_images()]
        for name, _, lr in pairs:
            if min(lr.shape[:2]) < min_lr:
                log.warning("skipping %s: its x%d LR image %dx%d is smaller than the %d-pixel patch",
                            name, cfg.scale, lr.shape[1], lr.shape[0], min_lr)
        pairs = [p for p in pairs if min(p[2].shape[:2]) >= min_lr]
        if not pairs:
            raise sources.DataError(f"{what}: no demo image has an LR side of at least {min_lr} pixels")
        return sources.ArrayPairs(pairs)
    if cfg.source == "folder":
        specs = sources.folder_specs(cfg.hr_dirs, cfg.lr_dirs, cfg.scale, ranges=cfg.hr_range)
    else:
        specs = tfds_source.tfds_specs(cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir)
    return sources.prepare_cached(specs, scale=cfg.scale, min_lr_size=min_lr, cache_dir=cfg.cache_dir, what=what,
                                  announce=announce)


@dataclasses.dataclass(frozen=True)
class ImageList:
    """Which training images a process cut its batches from: their count and a sha256 of their file names
    (without folders, which may be mounted elsewhere on another host) and HR sizes, in order. Every process of
    a run must have the same, or the global batches are not one sequence (the trainer checks)."""

    count: int
    digest: bytes  # 32 bytes

    @classmethod
    def of(cls, pairs) -> ImageList:
        """The list of a `training_pairs` source; reads no pixels."""
        h = hashlib.sha256()
        for i, name in enumerate(pairs.names):
            h.update(f"{os.path.basename(name)}\0{tuple(pairs[i]['hr'].shape)}\n".encode())
        return cls(len(pairs.names), h.digest())


def train_dataset(pairs: Any, cfg: DataConfig, *, part: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """The infinite MapDataset of this process's parts of the global batches (before `to_iter_dataset`), cut from
    `pairs` (a `training_pairs` source), `part` patches each (the global batch over `process_count`).

    One global sequence of patches, a function of `seed` alone: global batch k is patches k*B .. k*B+B-1
    (B = part * process_count, the global batch), and process i of n takes its i-th n-th of it. So batch k is
    the same whatever the number of processes, and a run checkpointed with n processes resumes with another
    count at the same global batch (elastic resume): the data state is the step.
    """
    # Shuffle and crops get unrelated seeds (those of the former process 0, so one-process runs are unchanged).
    shuffle_seed, crop_seed = (int(v) for v in np.random.SeedSequence([seed, 0]).generate_state(2))
    # grain's index_shuffle costs about 30 ms / length per element (4.8 ms for the 6 demo images, 0.15 ms
    # for 240, 9 us for 16k; tools/BENCHMARKS.md), so the shuffled unit is every image repeated to at least
    # _MIN_SHUFFLE_LENGTH entries: an epoch in the sense of EDSR's dataset repeat.
    copies = -(-_MIN_SHUFFLE_LENGTH // len(pairs))
    parts = (
        grain.MapDataset.source(pairs)
        .repeat(copies)
        .shuffle(seed=shuffle_seed)
        .repeat()
        .random_map(RandomPatch(cfg.patch_size, cfg.scale, cfg.augment), seed=crop_seed)
        .batch(part, drop_remainder=True)
    )
    return parts[process_index::process_count] if process_count > 1 else parts


def train_iterator(cfg: DataConfig, *, global_batch_size: int, seed: int, process_index: int | None = None,
                   process_count: int | None = None, announce: Callable[[str], None] | None = None
                   ) -> loader.BatchIterator:
    """The infinite, checkpointable iterator of this process's batches.

    Yields {"lr": uint8 [b, p, p, 3], "hr": uint8 [b, s*p, s*p, 3]} with b = global_batch_size //
    process_count: this process's part of each global batch (`train_dataset`), read from the images as
    needed. The state is the number of batches taken, which the trainer sets on resume to the global step (to the
    first batch past the patches trained on after a batch_size change: `trainer._next_batch`): exact also with
    another num_workers or process count. Its `images`
    is the `ImageList` of this process, for the trainer to check that every process has the same. Call
    `close()` when done to stop worker processes. `announce` (process 0's only): see `training_pairs`.
    """
    process_index, process_count = _process(process_index, process_count)
    if global_batch_size % process_count:  # before the images are decoded (minutes for DIV2K)
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {process_count} processes")
    pairs = training_pairs(cfg, announce if process_index == 0 else None)
    ds = train_dataset(pairs, cfg, part=global_batch_size // process_count, seed=seed, process_index=process_index,
                       process_count=process_count)
    read_options = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
    return loader.BatchIterator(ds, read_options, loader.worker_options(cfg.num_workers, cfg.worker_buffer_size),
                                images=ImageList.of(pairs))


def _first_usable(items: Iterable, make: Callable[..., benchmark_sets.Pair], n: int) -> list[benchmark_sets.Pair]:
    """make(item) for the items in order until n are made (0 = all); an item whose make raises
    `images.ImageError` is skipped with a warning, and items after the n-th pair are never made. A
    `benchmark_sets.FolderError` (a folder no image can use) is raised at once."""
    pairs = []
    for item in items:
        try:
            pairs.append(make(item))
        except benchmark_sets.FolderError:
            raise
        except images.ImageError as e:
            log.warning("skipping %s", e)
            continue
        if len(pairs) == n:
            break
    return pairs


def _tfds_pair(spec: sources.PairSpec, cfg: DataConfig) -> benchmark_sets.Pair:
    hr, lr = sources.make_pair(*spec.load(), cfg.scale, spec.name)
    if min(hr.shape[:2]) < benchmark_sets.min_side(cfg.scale):
        raise images.ImageError(f"{spec.name}: image is {hr.shape[1]}x{hr.shape[0]}, too small to score "
                                f"at x{cfg.scale}")
    return benchmark_sets.Pair(cfg.tfds_name or "div2k", spec.name, cfg.scale, hr, given_lr=lr)


def _file_pair(path: str, dataset: str, lr_dir: str | None, scale: int) -> benchmark_sets.Pair:
    pair = benchmark_sets.make_pair(dataset, path, images.decode(path).pixels, scale, lr_dir)
    pair.lr  # read (and size-checked) now, so that an unusable LR file is skipped like a missing one
    return pair


def validation_images(cfg: DataConfig) -> list[benchmark_sets.Pair]:
    """The first val_max_images usable full validation images (0 = all) as `benchmark_sets.Pair`s, the pairs
    `evaluate` scores: HR cropped to a multiple of the scale (gray files stay gray), LR from the source when it
    has one (DIV2K's validation split, val_lr_dir, a benchmark set's LR_bicubic/X<s>), else `bicubic_lr`.
    Every process gets the same list. Unreadable or too small images are skipped with a warning and do not
    count; images after the val_max_images-th usable one are not read."""
    what = f"validation images ({cfg.val_source})"
    if cfg.val_source == "demo":
        name, hr = sources.demo_validation_image()
        return [benchmark_sets.Pair("demo", name, cfg.scale, degrade.modcrop(hr, cfg.scale))]
    if cfg.val_source == "tfds":
        specs = tfds_source.tfds_specs(cfg.tfds_name, "validation", cfg.tfds_data_dir)
        pairs = _first_usable(specs, lambda spec: _tfds_pair(spec, cfg), cfg.val_max_images)
        if not pairs:
            raise sources.DataError(f"{what}: no usable image in the validation split of {cfg.tfds_name}")
        return pairs
    if cfg.val_source == "benchmark":
        hr_dir = os.path.join(cfg.val_dir or os.path.join(default_data_dir(), "benchmark"), cfg.val_set, "HR")
        dataset, lr_dir = cfg.val_set, None
    else:
        hr_dir, dataset, lr_dir = cfg.val_dir, "folder", cfg.val_lr_dir or None
    try:
        files = images.list_images(hr_dir)
    except images.ImageError as e:
        raise sources.DataError(f"{what}: {e}") from None
    if cfg.val_source == "folder":
        files = sources.numbered(files, cfg.val_range, hr_dir, what, "data.val_range")
    try:
        pairs = _first_usable(files, lambda path: _file_pair(path, dataset, lr_dir, cfg.scale), cfg.val_max_images)
    except benchmark_sets.FolderError as e:
        raise sources.DataError(f"{what}: {e}") from None
    if not pairs:
        raise sources.DataError(f"{what}: no usable image in {hr_dir}")
    return pairs
