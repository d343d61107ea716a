"""The SR benchmark sets on disk: `<data_dir>/benchmark/<name>/HR/*.png`, optionally `LR_bicubic/X<s>/` beside HR.

An HR image is cropped to a multiple of the scale (top-left); its LR image is read from `LR_bicubic/X<s>`
when that folder exists (EDSR's layout, `<stem>x<s>.png` or `<stem>.png`), else made with `bicubic_lr` (also
for a file that folder lacks: `Pair.lr_missing_from` says so). A set can also be given as a folder path.
Grayscale images stay [H, W]; alpha is dropped; 16-bit is scaled to 8 bits (all by `images.decode`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np
from absl import logging

from rnan_jax import degrade, images, metrics
from rnan_jax.metrics import SSIM_WINDOW

STANDARD_SIZES = {"Set5": 5, "Set14": 14, "B100": 100, "Urban100": 100, "Manga109": 109}


LAYOUT = ("a set is <data_dir>/benchmark/<name>/HR/*.png (LR_bicubic/X<s>/ beside HR is optional), or give "
          "the set's folder as a path: one holding HR/, or the HR images themselves")


def is_path(dataset: str) -> bool:
    """Whether a --datasets entry is a folder path (it has a slash or starts with ~ or .) rather than a name."""
    return "/" in dataset or os.sep in dataset or dataset.startswith(("~", "."))


def set_name(dataset: str) -> str:
    """The name a set is reported, saved and looked up in --sr_dir by: the entry itself, or for a path the
    folder's name ('Set5' for '/data/Set5' and for '/data/Set5/HR')."""
    if not is_path(dataset):
        return dataset
    path = os.path.normpath(os.path.abspath(os.path.expanduser(dataset)))
    if os.path.basename(path) == "HR" and not os.path.isdir(os.path.join(path, "HR")):
        path = os.path.dirname(path)
    return os.path.basename(path)


def hr_folder(data_dir: str, dataset: str) -> str:
    """`<data_dir>/benchmark/<dataset>/HR` for a name; for a path, `<path>/HR` when there is one, else the path."""
    if not is_path(dataset):
        return os.path.join(data_dir, "benchmark", dataset, "HR")
    path = os.path.normpath(os.path.abspath(os.path.expanduser(dataset)))
    return os.path.join(path, "HR") if os.path.isdir(os.path.join(path, "HR")) else path


def list_hr(data_dir: str, dataset: str) -> list[str]:
    """Sorted HR files of `dataset` (a name under `data_dir`, or a folder path); raises `images.ImageError`
    naming the folder when missing or empty, and for a set that is not there, the sets that are (for a name
    in the wrong case, the one meant; for a folder beside benchmark/, that folder). `LAYOUT` says the rules."""
    folder = hr_folder(data_dir, dataset)
    if not os.path.isdir(folder):
        where = "no such folder" if is_path(dataset) else f"no such folder; {_sets_there(data_dir, dataset)}"
        raise images.ImageError(f"{folder}: {where}")
    if is_path(dataset) and (error := _lr_folder_error(folder)) is not None:
        raise images.ImageError(error)
    return images.list_images(folder)


def _is_lr_name(name: str) -> bool:
    """Whether a folder name says low resolution: LR_bicubic, DIV2K_valid_LR_bicubic, LR, lr, LRBI, LRbicx4 (one
    of its tokens)."""
    return any(re.fullmatch(r"lr(bi|bd|dn|bic|bicubic)?(x\d+)?", t, re.IGNORECASE)
               for t in re.split(r"[^A-Za-z0-9]+", name))


def _lr_folder_error(folder: str) -> str | None:
    """A message when a set given as a path is an LR folder (`<set>/LR_bicubic/X2`, `DIV2K_valid_LR_bicubic/X4`,
    `<set>/LR`): its images scored as HR gave a number for the wrong images, with no word of it."""
    name, parent = os.path.basename(folder), os.path.dirname(folder)
    if re.fullmatch(r"[Xx]\d+", name) and _is_lr_name(os.path.basename(parent)):
        set_folder = os.path.dirname(parent)
    elif _is_lr_name(name):
        set_folder = parent
    else:
        return None
    hint = (f": give the set's folder, {set_folder}, which holds HR/" if os.path.isdir(os.path.join(set_folder, "HR"))
            else ": give the folder of the HR images")
    return f"{folder}: an LR folder by its name, not the HR images a set is scored against{hint}"


def _sets_there(data_dir: str, dataset: str) -> str:
    root = os.path.join(data_dir, "benchmark")
    there = sorted(n for n in os.listdir(root) if os.path.isdir(hr_folder(data_dir, n))) if os.path.isdir(root) else []
    meant = [n for n in there if n.lower() == dataset.lower()]
    if meant:
        return f"did you mean {meant[0]}?"
    beside = os.path.join(data_dir, dataset)
    if os.path.isdir(beside):
        return f"{beside} is there: give it as a path, --datasets {beside}"
    if not os.path.isdir(root):
        return f"{root}: no such folder (is --data_dir or RNAN_DATA_DIR right?)"
    return f"the sets in {root}: {', '.join(there)}" if there else f"{root} holds no <set>/HR folder"


# Other names of the standard sets: the paper's BSD100, BasicSR's BSDS100
_ALIASES = {"bsd100": "B100", "bsds100": "B100"}


def standard_set(dataset: str) -> str | None:
    """The standard set (a key of STANDARD_SIZES) that a set's name is, in any case or by another name (BSD100 is
    B100), else None. A folder named so was not checked for its images nor given the paper's rows."""
    key = dataset.lower()
    return _ALIASES.get(key) or next((s for s in STANDARD_SIZES if s.lower() == key), None)


def completeness_warning(dataset: str, count: int) -> str | None:
    """A message when a standard set holds fewer (or more) images than its published size, else None."""
    expected = STANDARD_SIZES.get(standard_set(dataset) or "")
    if expected is None or count == expected:
        return None
    return (
        f"{dataset} holds {count} images, the standard set has {expected}: its numbers are not comparable "
        "to published ones"
    )


def image_name(path: str) -> str:
    """File name without folder or extension, e.g. 'baby' for '.../HR/baby.png'."""
    return os.path.splitext(os.path.basename(path))[0]


def lr_folder(hr_path: str, scale: int) -> str | None:
    """`<set>/LR_bicubic/X<scale>` beside the `<set>/HR` folder holding `hr_path`; None when that folder is not
    named HR (a folder of HR images given as a path: an LR_bicubic beside it belongs to something else). A set that
    has `LR_bicubic/x<scale>` (lower case, as --sr_dir also takes) and no `X<scale>` gets that one: it was passed
    over without a word, its LR images made from HR instead."""
    hr_dir = os.path.dirname(os.path.abspath(hr_path))
    if os.path.basename(hr_dir) != "HR":
        return None
    upper, lower = (os.path.join(os.path.dirname(hr_dir), "LR_bicubic", f"{x}{scale}") for x in "Xx")
    return lower if not os.path.isdir(upper) and os.path.isdir(lower) else upper


# The EXIF orientations (1..8) as applied to stored pixels [H, W(, C)] (what `images.decode` does, PIL's
# `ImageOps.exif_transpose`), and each one's inverse.
_ORIENT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}
_UNDO = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


def lr_oriented_as_hr(hr: np.ndarray, hr_orientation: int, lr: np.ndarray, lr_orientation: int,
                      scale: int) -> np.ndarray:
    """A given LR image (decoded: its own EXIF orientation applied) as it lines up with the decoded HR image.

    When the two files' orientation tags differ (a phone photo's HR with a tag, its LR written by a tool that
    ignored the tag, as MATLAB's imread does, and wrote none), the LR's stored pixels may follow the HR's
    stored pixels instead: then they get the HR's orientation. Of the two readings, the one of the size the HR
    needs is taken, and when both have it (a square image, or a flip or a half turn), the one nearer to
    `bicubic_lr` of the HR. With equal tags `lr` is returned as it is."""
    if hr_orientation == lr_orientation:
        return lr
    other = np.ascontiguousarray(_ORIENT[hr_orientation](_ORIENT[_UNDO[lr_orientation]](lr)))
    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    fits = [c for c in (lr, other) if c.shape[:2] == (h, w)]
    if len(fits) < 2:
        return fits[0] if fits else lr  # none: the caller reports the size

    def gray(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float64).mean(axis=-1) if a.ndim == 3 else a.astype(np.float64)

    expected = gray(degrade.bicubic_lr(hr[: scale * h, : scale * w], scale))
    return min(fits, key=lambda c: float(np.abs(gray(c) - expected).mean()))


def min_side(scale: int) -> int:
    """Smallest cropped HR side that can be scored: `scale` shaved from both borders leaves an SSIM window."""
    return 2 * scale + SSIM_WINDOW


@dataclasses.dataclass
class Pair:
    """One benchmark image at one scale.

    `hr`: uint8 [H, W, 3] or [H, W] (gray), cropped to multiples of `scale`. `lr`: uint8 [H/s, W/s(, 3)],
    read from `lr_path` when set, else `bicubic_lr(hr)` computed on first use.
    """

    dataset: str
    name: str
    scale: int
    hr: np.ndarray
    lr_path: str | None = None
    given_lr: np.ndarray | None = dataclasses.field(default=None, repr=False)  # a source's own LR (TFDS)
    lr_missing_from: str | None = None  # an LR_bicubic folder that lacked this image's LR file (LR made instead)
    hr_orientation: int = 1  # the HR file's EXIF orientation tag, to line up an LR file written without it
    lr_error: str | None = None  # the LR_bicubic folder could not be listed: raised (FolderError) when lr is read
    set_names: tuple[str, ...] = ()  # the set's image names, where known (--sr_dir: a_b_EDSR_x4.png is a_b's, not a's)

    @functools.cached_property
    def lr(self) -> np.ndarray:
        if self.lr_error is not None:
            raise FolderError(self.lr_error)
        if self.given_lr is not None:
            return self.given_lr
        if self.lr_path is None:
            return degrade.bicubic_lr(self.hr, self.scale)
        lr = lr_oriented_as_hr(self.hr, self.hr_orientation, images.decode(self.lr_path).pixels,
                               images.exif_orientation(self.lr_path), self.scale)
        h, w = self.hr.shape[0] // self.scale, self.hr.shape[1] // self.scale
        if lr.shape[:2] != (h, w):
            raise images.ImageError(
                f"{self.lr_path}: LR image is {lr.shape[1]}x{lr.shape[0]}, expected {w}x{h} "
                f"(HR {self.hr.shape[1]}x{self.hr.shape[0]} cropped to a multiple of {self.scale}, divided by it)"
            )
        if self.hr.ndim == 2 and lr.ndim == 3:
            return lr[..., 0] if (lr == lr[..., :1]).all() else lr
        return lr

    @property
    def is_gray(self) -> bool:
        return self.hr.ndim == 2


def make_pair(dataset: str, hr_path: str, hr: np.ndarray, scale: int, lr_dir: str | None = None) -> Pair:
    """Crops decoded `hr` for `scale` and finds its LR file (in `lr_dir`, which must then hold it, else in
    the optional `LR_bicubic/` beside HR); raises `images.ImageError` naming a too-small image or, with
    `lr_dir`, a missing LR file (an optional `LR_bicubic/` that cannot be listed: `FolderError` when `lr` is read).
    The pair that evaluation and training validation score alike."""
    h, w = hr.shape[:2]
    if h < scale or w < scale:
        raise images.ImageError(f"{hr_path}: image is {w}x{h}, smaller than the scale x{scale}")
    hr = degrade.modcrop(hr, scale)
    if min(hr.shape[:2]) < min_side(scale):
        raise images.ImageError(
            f"{hr_path}: image is {w}x{h}, too small to score at x{scale} (needs {min_side(scale)} px a side: "
            f"{scale} shaved from each border and an {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window)"
        )
    name = image_name(hr_path)
    if lr_dir is not None:
        return Pair(dataset=dataset, name=name, scale=scale, hr=hr, lr_path=find_lr_file(hr_path, lr_dir, scale),
                    hr_orientation=images.exif_orientation(hr_path))
    folder = lr_folder(hr_path, scale)
    if folder is None or not os.path.isdir(folder):
        return Pair(dataset=dataset, name=name, scale=scale, hr=hr)
    try:
        lr_path = find_lr_file(hr_path, folder, scale, required=False)
    except FolderError as e:  # said when the LR image is read: SR images of --sr_dir are scored without it
        return Pair(dataset=dataset, name=name, scale=scale, hr=hr, lr_error=str(e))
    if lr_path is None:
        logging.info("%s: no LR file for %s, making it with bicubic_lr", folder, name)
    return Pair(dataset=dataset, name=name, scale=scale, hr=hr, lr_path=lr_path,
                lr_missing_from=folder if lr_path is None else None,
                hr_orientation=1 if lr_path is None else images.exif_orientation(hr_path))


class FolderError(images.ImageError):
    """A folder that no image of a set can use (one this user may not list): said once, not once per image."""


def find_lr_file(hr_path: str, lr_dir: str, scale: int, *, required: bool = True) -> str | None:
    """The LR file for `hr_path` in `lr_dir` (EDSR's and DIV2K's naming, any image extension): X{s}/{stem}x{s},
    X{s}/{stem}, {stem}x{s}, {stem}. None when there is none and not `required`, else `images.ImageError`."""
    stem = image_name(hr_path)
    sub = os.path.join(lr_dir, f"X{scale}")
    try:
        path = (images.find_image(sub, (f"{stem}x{scale}", stem))
                or images.find_image(lr_dir, (f"{stem}x{scale}", stem)))
    except OSError as e:  # an LR folder this user may not list: a PermissionError traceback before
        raise FolderError(f"{e.filename or lr_dir}: cannot list the LR folder ({e.strerror or e})") from None
    if path is not None or not required:
        return path
    raise images.ImageError(
        f"{hr_path}: no LR image in {lr_dir} "
        f"(looked for X{scale}/{stem}x{scale}.png, {stem}x{scale}.png, {stem}.png and other extensions)"
    )


def score(sr: np.ndarray, pair: Pair, *, rounded_y: bool = True) -> tuple[float, float]:
    """(PSNR dB, SSIM) of uint8 `sr` against `pair.hr`, `scale` pixels shaved: on Y (MATLAB's rgb2ycbcr,
    rounded unless not `rounded_y`), or on gray values for a gray HR. The one rule of `evaluate` and of
    training validation, so the two print the same numbers for the same parameters."""
    luma = metrics.luminance_pair(sr, pair.hr, pair.scale, rounded_y=rounded_y)
    return metrics.psnr(*luma), metrics.ssim(*luma)
