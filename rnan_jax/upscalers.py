"""The upscalers that `evaluate` scores and `figures` compares: each maps a `benchmark_sets.Pair` to its SR image
(uint8, the size of the cropped HR image): MATLAB bicubic, a trained model (`inference.upscale_image`, the call
training's validation makes too), or another method's saved images (`--sr_dir`: our layout, EDSR-PyTorch's and
BasicSR's).
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rnan_jax import benchmark_sets, degrade, images, inference
from rnan_jax.benchmark_sets import Pair
from rnan_jax.model import RNANConfig

# Maps a Pair to its SR image: uint8 [H, W, 3] or [H, W], the size of `pair.hr`.
Upscaler = Callable[[Pair], np.ndarray]


class MissingFolderError(images.ImageError):
    """An upscaler's whole folder for one (dataset, scale) is missing: reported once, not per image."""


def bicubic_upscaler(pair: Pair) -> np.ndarray:
    """The Bicubic baseline: MATLAB `imresize(lr, scale, 'bicubic')`, uint8."""
    return degrade.imresize(pair.lr, pair.scale)


def sr_file_stems(name: str, scale: int) -> tuple[str, ...]:
    """The names an SR image of HR image `name` may have in `--sr_dir` (any image extension): the HR file's,
    EDSR-PyTorch's `--save_results` name, and `<name>x<s>`, `<name>_x<s>`, in that order of preference."""
    return (name, f"{name}_x{scale}_SR", f"{name}x{scale}", f"{name}_x{scale}")


# A scale in a file name: x4, X4, SRx4, BIX4, x4plus (a digit next to it makes it another number)
_SCALE_IN_NAME = re.compile(r"(?<![0-9])[xX]([0-9]+)(?![0-9])")
# Name tokens of the images saved beside the SR ones (EDSR's `--save_gt` `<name>_x<s>_LR`/`_HR`, an LQ or GT copy)
_NOT_SR = frozenset({"lr", "hr", "gt", "lq"})


def _scales_named(text: str) -> set[int]:
    return {int(s) for s in _SCALE_IN_NAME.findall(text)}


def _not_sr(text: str) -> bool:
    return any(t.lower() in _NOT_SR for t in re.split(r"[^A-Za-z0-9]+", text))


def _set_folders(sr_dir: str, dataset: str) -> list[str]:
    """The folders of `sr_dir` that may hold SR images of `dataset`: `<dataset>` and EDSR-PyTorch's
    `results-<dataset>`, also by the set's other names (B100, BSD100, BSDS100; a standard set in any case)."""
    standard = benchmark_sets.standard_set(dataset)
    try:
        entries = sorted(os.listdir(sr_dir))
    except OSError:
        entries = []
    found = []
    for results in (False, True):
        for entry in [dataset] + [e for e in entries if e != dataset]:
            if results != entry.startswith("results-"):
                continue
            name = entry[len("results-"):] if results else entry
            if (name == dataset or (standard is not None and benchmark_sets.standard_set(name) == standard)) \
                    and os.path.isdir(os.path.join(sr_dir, entry)) and entry not in found:
                found.append(entry)
    return _distinct([os.path.join(sr_dir, e) for e in found])


def _distinct(folders: list[str]) -> list[str]:
    """`folders` that exist, each folder once (x2 and X2, Set5 and set5 are one on a case-insensitive disk)."""
    seen, out = set(), []
    for f in folders:
        try:
            st = os.stat(f)
        except OSError:
            continue
        if os.path.isdir(f) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(f)
    return out


def _image_stems(folder: str) -> dict[str, str]:
    """Stem -> path of the image files in `folder` (the first of a stem's files in name order)."""
    by_stem: dict[str, str] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return by_stem
    for f in names:
        if f.lower().endswith(images.IMAGE_EXTENSIONS) and not os.path.isdir(os.path.join(folder, f)):
            by_stem.setdefault(os.path.splitext(f)[0], os.path.join(folder, f))
    return by_stem


def _suffixed(folder: str, name: str, scale: int, *, scale_in_folder: bool, others: Sequence[str] = ()) -> list[str]:
    """Files `<name>_<suffix>.*` (BasicSR's `<LQ name>_<val.suffix or experiment name>`; also after an LQ name
    `<name>x<s>`) in `folder`: in a scale's own folder, a suffix that names no other scale; in a set's folder
    (`scale_in_folder` false), one that names this scale and no other. Never an LR, HR, GT or LQ copy, nor the file
    of a longer image name of `others` (the set's names): `a_b_EDSR_x4.png` is image a_b's, not a's."""
    longer = [o for o in others if len(o) > len(name)]
    found = []
    for stem, path in _image_stems(folder).items():
        if any(stem == o or stem.startswith((f"{o}_", f"{o}x{scale}")) for o in longer):
            continue
        for prefix in (f"{name}_", f"{name}x{scale}_"):
            if not stem.startswith(prefix) or len(stem) == len(prefix):
                continue
            suffix = stem[len(prefix):]
            named = _scales_named(suffix) | ({scale} if prefix != f"{name}_" else set())
            if _not_sr(suffix) or not named <= {scale} or (not scale_in_folder and named != {scale}):
                continue
            found.append(path)
            break
    return found


# BasicSR's test sets (Set5/GTmod12, ...) crop HR to a multiple of 12 before making LR: their SR images are that size
GT_MOD = 12


def gt_mod_shape(pair: Pair) -> tuple[int, int] | None:
    """(H, W) of `pair.hr` cropped to a multiple of `GT_MOD` at its top-left (BasicSR's `mod_crop`, what its SR images
    of a GTmod12 set measure) when that is another size that can be scored at the pair's scale, else None."""
    h, w = pair.hr.shape[0] // GT_MOD * GT_MOD, pair.hr.shape[1] // GT_MOD * GT_MOD
    if GT_MOD % pair.scale or (h, w) == pair.hr.shape[:2] or min(h, w) < benchmark_sets.min_side(pair.scale):
        return None
    return h, w


def _says_scale(folder: str, scale: int) -> bool:
    """Whether a set folder holds an SR image whose name says `scale` (and no other)."""
    return any(_scales_named(stem) == {scale} and not _not_sr(stem) for stem in _image_stems(folder))


def sr_dir_upscaler(sr_dir: str) -> Upscaler:
    """Reads another method's SR image of a `Pair`, in this order: `<sr_dir>/<dataset>/x<scale>/<name>.*` (or
    `X<scale>`; names as `sr_file_stems`); in `<sr_dir>/<dataset>/` or EDSR-PyTorch's `<sr_dir>/results-<dataset>/`,
    a name of `sr_file_stems` that says the scale (EDSR's `<name>_x<s>_SR.png`); then `<name>_<suffix>.*`
    (BasicSR's `<dataset>/<name>_<suffix>.png`, RCAN's `<dataset>/x<s>/<name>_RCAN_x<s>.png`), in a scale folder
    with a suffix that names no other scale, in a set folder with one that names this scale (BasicSR's
    experiment names do: EDSR_Mx4_...): a file that could be another scale's is never taken. The set's folder may
    have its other names (B100, BSD100, BSDS100). Two files that fit are refused, naming both; a file that is not
    the size of the cropped HR image is refused, naming the file, unless it is the size of HR cropped to a multiple
    of 12 (`gt_mod_shape`: BasicSR's GTmod12 sets), which `evaluate` scores against HR cropped so."""

    def read(path: str, pair: Pair) -> np.ndarray:
        sr = images.decode(path).pixels
        if sr.shape[:2] != pair.hr.shape[:2] and sr.shape[:2] != gt_mod_shape(pair):
            h, w = pair.hr.shape[:2]
            raise images.ImageError(
                f"{path}: SR image is {sr.shape[1]}x{sr.shape[0]}, expected {w}x{h} (the HR image cropped "
                f"to a multiple of {pair.scale}, top-left)")
        return sr

    def upscale(pair: Pair) -> np.ndarray:
        set_folders = _set_folders(sr_dir, pair.dataset)
        folders = _distinct([os.path.join(f, f"{x}{pair.scale}") for f in set_folders for x in ("x", "X")])
        stems = sr_file_stems(pair.name, pair.scale)
        for folder in folders:
            if (path := images.find_image(folder, stems)) is not None:
                return read(path, pair)
        for folder in set_folders:  # no scale folder between: only a name that says the scale
            if (path := images.find_image(folder, stems[1:])) is not None:
                return read(path, pair)
        others = pair.set_names
        for candidates in ([p for f in folders for p in _suffixed(f, pair.name, pair.scale, scale_in_folder=True,
                                                                  others=others)],
                           [p for f in set_folders for p in _suffixed(f, pair.name, pair.scale, scale_in_folder=False,
                                                                      others=others)]):
            if len(candidates) == 1:
                return read(candidates[0], pair)
            if candidates:
                raise images.ImageError(f"{len(candidates)} files could be the x{pair.scale} SR image of {pair.name}"
                                        f" ({', '.join(candidates)}): keep one method's images in --sr_dir")
        flat = [f for f in set_folders if _says_scale(f, pair.scale)]
        if not folders and not flat:
            expected = os.path.join(sr_dir, pair.dataset, f"x{pair.scale}")
            unscaled = [(f, p) for f in set_folders for stem, p in _image_stems(f).items()
                        if not _scales_named(stem) and not _not_sr(stem)]
            hint = (f"; {unscaled[0][0]} holds {len(unscaled)} image(s) whose names say no scale (e.g. "
                    f"{os.path.basename(unscaled[0][1])}): if they are x{pair.scale}'s, put them in "
                    f"{os.path.join(unscaled[0][0], f'x{pair.scale}')}" if unscaled else "")
            where = f"{expected}: no such folder (no SR images of {pair.dataset} at x{pair.scale}"
            if set_folders and set_folders[0] != os.path.join(sr_dir, pair.dataset):  # results-BSD100, BSDS100:
                # the folder the user has is named, not a <dataset>/x<scale> that is not there
                where = (f"{set_folders[0]}: no SR images of {pair.dataset} at x{pair.scale} there (no "
                         f"x{pair.scale} folder, no file name saying x{pair.scale}")
            raise MissingFolderError(
                f"{where}; expected "
                f"{sr_dir}/<dataset>/x<scale>/<HR file name>, or EDSR's {sr_dir}/results-<dataset>/"
                f"<name>_x<scale>_SR.png, or BasicSR's {sr_dir}/<dataset>/<name>_<suffix naming x<scale>>.png"
                f"{hint})")
        if folders:
            raise images.ImageError(f"{folders[0]}: no SR image of {pair.name} (looked for "
                                    f"{', '.join(s + '.*' for s in stems)})")
        raise images.ImageError(f"{flat[0]}: no SR image of {pair.name} at x{pair.scale} (looked for "
                                f"{', '.join(s + '.*' for s in stems[1:])}, {pair.name}_<suffix naming "
                                f"x{pair.scale}>.*)")

    return upscale


def model_upscaler(params: Mapping[str, Any], config: RNANConfig, *, self_ensemble: bool = False) -> Upscaler:
    """The model on one image at a time, through `inference.upscale_image` (whole image, compiled once per
    distinct LR size): the LR image as RGB (gray replicated), the output quantized to uint8 RGB."""

    def upscale(pair: Pair) -> np.ndarray:
        return inference.upscale_image(params, images.as_rgb(pair.lr), config=config, self_ensemble=self_ensemble)

    return upscale
