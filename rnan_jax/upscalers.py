"""The upscalers that `evaluate` scores and `figures` compares: each maps a `benchmark_sets.Pair` to its SR image
(uint8, the size of the cropped HR image): MATLAB bicubic, a trained model (`inference.upscale_image`, the call
training's validation makes too), or another method's saved images (`--sr_dir`, EDSR-PyTorch's names included).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from rnan_jax import degrade, images, inference
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


def sr_dir_upscaler(sr_dir: str) -> Upscaler:
    """Reads another method's SR image `<sr_dir>/<dataset>/x<scale>/<name>.*` (or `X<scale>`; names as
    `sr_file_stems`); a file that is not the size of the cropped HR image is refused, naming the file."""

    def upscale(pair: Pair) -> np.ndarray:
        folders = [os.path.join(sr_dir, pair.dataset, f"{x}{pair.scale}") for x in ("x", "X")]
        if not any(os.path.isdir(f) for f in folders):
            raise MissingFolderError(f"{folders[0]}: no such folder (no SR images of {pair.dataset} at "
                                     f"x{pair.scale}; expected {sr_dir}/<dataset>/x<scale>/<HR file name>)")
        stems = sr_file_stems(pair.name, pair.scale)
        for folder in folders:
            if (path := images.find_image(folder, stems)) is not None:
                sr = images.decode(path).pixels
                if sr.shape[:2] != pair.hr.shape[:2]:
                    h, w = pair.hr.shape[:2]
                    raise images.ImageError(
                        f"{path}: SR image is {sr.shape[1]}x{sr.shape[0]}, expected {w}x{h} (the HR image cropped "
                        f"to a multiple of {pair.scale}, top-left)")
                return sr
        folder = next(f for f in folders if os.path.isdir(f))
        raise images.ImageError(f"{folder}: no SR image of {pair.name} (looked for "
                                f"{', '.join(s + '.*' for s in stems)})")

    return upscale


def model_upscaler(params: Mapping[str, Any], config: RNANConfig, *, self_ensemble: bool = False) -> Upscaler:
    """The model on one image at a time, through `inference.upscale_image` (whole image, compiled once per
    distinct LR size): the LR image as RGB (gray replicated), the output quantized to uint8 RGB."""

    def upscale(pair: Pair) -> np.ndarray:
        return inference.upscale_image(params, images.as_rgb(pair.lr), config=config, self_ensemble=self_ensemble)

    return upscale
