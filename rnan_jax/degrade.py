"""MATLAB-compatible bicubic resizing: how the field makes LR images and the Bicubic baseline.

`imresize` follows MATLAB's `imresize(image, scale, 'bicubic')` (cubic kernel a = -0.5, the kernel stretched
by 1/scale when downscaling so that it antialiases, symmetric border mirroring, output size
ceil(in * scale)). Each axis is resized by an explicit float64 weight matrix (stored sparse: at most
4 * scale + 2 nonzeros a row), so an image is two sparse-dense matrix products.
`jax.image.resize` differs at the borders and does not stand in for it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy import sparse


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's `cubic`), support [-2, 2]."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


def output_length(in_length: int, scale: float) -> int:
    """ceil(in_length * scale) of the plain float64 product, as MATLAB's `ceil(scale .* size)`.

    Float noise is kept, as MATLAB keeps it: 50 * 1.1 = 55.00000000000001 gives 56. The paper's sizes
    (n * (1/s) and n * s for s = 2, 3, 4) come out exact: ceil(n / s) and n * s.
    """
    return max(1, math.ceil(in_length * scale))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_length: int, out_length: int, scale: float, antialias: bool = True) -> np.ndarray:
    """The [out_length, in_length] float64 matrix that resizes one axis as MATLAB's `contributions` does.

    Output sample x (1-based) sits at input coordinate u = x / scale + (1 - 1 / scale) / 2; its weights are
    the cubic kernel at the distances to the nearby input samples (kernel widened by 1/scale when
    downscaling with antialias), normalized to sum to 1; samples beyond the border are mirrored
    symmetrically (..., 2, 1, 1, 2, ..., n, n, n-1, ...). Rows sum to 1. Read-only (cached).
    """
    kernel_width = 4.0
    if scale < 1 and antialias:
        kernel = lambda d: scale * _cubic(scale * d)  # noqa: E731
        kernel_width /= scale
    else:
        kernel = _cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    weights = kernel(u[:, None] - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    columns = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps), columns.ravel()), weights.ravel())
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=64)
def _sparse_resize_matrix(in_length: int, out_length: int, scale: float, antialias: bool) -> sparse.csr_array:
    # From a dense matrix of its own, not resize_matrix's cached one: those, out * in * 8 bytes each (128 MB for
    # 2000 -> 8000), stayed in memory for every image size resized, up to 64 of them.
    return sparse.csr_array(resize_matrix.__wrapped__(in_length, out_length, scale, antialias))


def _resize_axis(x: np.ndarray, matrix: sparse.csr_array, axis: int) -> np.ndarray:
    """Applies [out, in] `matrix` along `axis` of float64 `x`."""
    x = np.moveaxis(x, axis, 0)
    rest = x.shape[1:]
    out = matrix @ np.ascontiguousarray(x).reshape(x.shape[0], -1)
    return np.moveaxis(out.reshape((matrix.shape[0],) + rest), 0, axis)


def round_half_up(x: np.ndarray) -> np.ndarray:
    # MATLAB rounds halves away from zero; np.rint would round them to even.
    return np.floor(x + 0.5)


def imresize(image: np.ndarray, scale: float, *, antialias: bool = True) -> np.ndarray:
    """MATLAB `imresize(image, scale, 'bicubic')` of an [H, W] or [H, W, C] image.

    Output [ceil(H * scale), ceil(W * scale), (C)]. uint8 input gives uint8 output (rounded half away from
    zero, clipped to 0..255); float input gives float64 output, neither rounded nor clipped. The
    intermediate between the two axes stays in float64.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"imresize expects [H, W] or [H, W, C], got shape {image.shape}")
    if 0 in image.shape[:2]:  # it was an IndexError (index 0 is out of bounds for axis 0 with size 0)
        raise ValueError(f"imresize: the image has no pixels, shape {image.shape}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    h, w = image.shape[:2]
    rows = _sparse_resize_matrix(h, output_length(h, scale), float(scale), antialias)
    cols = _sparse_resize_matrix(w, output_length(w, scale), float(scale), antialias)
    out = _resize_axis(_resize_axis(image.astype(np.float64), rows, 0), cols, 1)
    if image.dtype == np.uint8:
        return np.clip(round_half_up(out), 0, 255).astype(np.uint8)
    return out


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """Top-left crop of [H, W, ...] to [H - H % scale, W - W % scale, ...]."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The field's LR image: `imresize(modcrop(hr, scale), 1 / scale)`; uint8 [H, W(, C)] -> [H/s, W/s(, C)]."""
    h, w = hr.shape[:2]
    if h < scale or w < scale:  # cropped to nothing: it was an IndexError from imresize
        raise ValueError(f"bicubic_lr: image is {w}x{h}, smaller than the scale x{scale}")
    return imresize(modcrop(hr, scale), 1.0 / scale)
