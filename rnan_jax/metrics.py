"""PSNR and SSIM on the luminance channel, with the conventions that make the field's tables comparable.

Both metrics compare uint8 images: a float SR output is first quantized (`quantize`). A colour reference is
compared on Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 (MATLAB `rgb2ycbcr` on uint8, rounded to an
integer by default as MATLAB's uint8 output is; `rounded_y=False` keeps it fractional, as RCAN's script
does). A grayscale reference [H, W] is compared on its gray values, and an RGB output is reduced to gray as
round(0.299 R + 0.587 G + 0.114 B) for it. `shave` pixels are dropped from every border (the field uses the
scale). SSIM is Wang et al.'s reference: Gaussian window 11 / sigma 1.5, K1 0.01, K2 0.03, L 255, 'valid'.
Identical images give a PSNR of `math.inf`.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from rnan_jax.degrade import round_half_up

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_K1, _K2, _PEAK = 0.01, 0.03, 255.0


def quantize(sr: ArrayLike) -> np.ndarray:
    """Float image in [0, 1] (any shape, numpy or jax) -> uint8: clip to [0, 1], x255, round."""
    kind = np.asarray(sr).dtype
    if np.issubdtype(kind, np.integer) or np.issubdtype(kind, np.bool_):  # uint8 came back as 0 or 255
        raise TypeError(f"quantize takes a float image in [0, 1], got {kind} (an integer image is quantized already)")
    x = np.asarray(sr, dtype=np.float64)
    if np.isnan(x).any():  # cast to uint8, a NaN was a black pixel (0): a diverged model's output scored as a number
        raise ValueError(f"the image holds {int(np.isnan(x).sum())} NaN value(s); it has no uint8 pixels to score")
    x = np.clip(x, 0.0, 1.0) * 255.0
    return round_half_up(x).astype(np.uint8)


def _integer_weighted_sum(rgb: np.ndarray, weights: tuple[int, int, int]) -> np.ndarray:
    x = np.asarray(rgb).astype(np.int64)
    return weights[0] * x[..., 0] + weights[1] * x[..., 1] + weights[2] * x[..., 2]


def rgb_to_y(rgb: np.ndarray, *, rounded: bool = True) -> np.ndarray:
    """uint8 [..., 3] -> Y float64 [...] in [16, 235]: MATLAB `rgb2ycbcr`'s Y, rounded unless `rounded=False`.

    Computed in integers (Y * 255000 is one), so that the rounding of exact halves does not depend on float
    evaluation order.
    """
    n = 16 * 255000 + _integer_weighted_sum(rgb, (65481, 128553, 24966))
    if rounded:
        return ((2 * n + 255000) // 510000).astype(np.float64)
    return n / 255000.0


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> uint8 [...]: round(0.299 R + 0.587 G + 0.114 B) (halves up), for grayscale references."""
    n = _integer_weighted_sum(rgb, (299, 587, 114))
    return ((2 * n + 1000) // 2000).astype(np.uint8)


def luminance_pair(
    sr: np.ndarray, hr: np.ndarray, shave: int, *, rounded_y: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The two float64 [H - 2 shave, W - 2 shave] planes that PSNR and SSIM compare.

    `sr` and `hr` are uint8 [H, W, 3] or [H, W] ([H, W, 1] is gray too) of the same height and width. A gray `hr`
    is compared on gray values (an RGB `sr` reduced by `rgb_to_gray`); an RGB `hr` on Y (a gray `sr` replicated to
    RGB first)."""
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.dtype != np.uint8 or hr.dtype != np.uint8:
        raise TypeError(f"metrics compare uint8 images (quantize float outputs first), got {sr.dtype} and {hr.dtype}")
    # [H, W, 1] (a gray image with its channel axis, as from a model or torch) is gray: it was an IndexError
    sr, hr = (x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x for x in (sr, hr))
    for x in (sr, hr):
        if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] != 3):
            raise ValueError(f"metrics compare [H, W, 3] or gray [H, W] (or [H, W, 1]) images, got SR {sr.shape} "
                             f"and HR {hr.shape}")
    if sr.shape[:2] != hr.shape[:2]:
        raise ValueError(f"SR {sr.shape[:2]} and HR {hr.shape[:2]} differ in size")
    if hr.ndim == 2:
        a = rgb_to_gray(sr) if sr.ndim == 3 else sr
        b = hr
        a, b = a.astype(np.float64), b.astype(np.float64)
    else:
        if sr.ndim == 2:
            sr = np.repeat(sr[..., None], 3, axis=-1)
        a, b = rgb_to_y(sr, rounded=rounded_y), rgb_to_y(hr, rounded=rounded_y)
    if shave:
        if min(a.shape) <= 2 * shave:
            raise ValueError(f"image {hr.shape[:2]} is too small to shave {shave} pixels from each border")
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, peak: float = _PEAK) -> float:
    """PSNR in dB of two same-shaped arrays on a 0..peak scale; `math.inf` when they are identical."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:  # broadcast, [H, W] against [H, W, 1] was the mean over [H, H, W] pairs: a wrong number
        raise ValueError(f"psnr compares two same-shaped arrays, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(peak * peak / mse))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D taps whose outer product is MATLAB's fspecial('gaussian', size, sigma) (normalized)."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r * r) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation keeping only 'valid' positions: [H, W] -> [H - k + 1, W - k + 1]."""
    r = len(taps) // 2
    x = ndimage.correlate1d(x, taps, axis=0, mode="constant")[r:-r]
    return ndimage.correlate1d(x, taps, axis=1, mode="constant")[:, r:-r]


def ssim(a: np.ndarray, b: np.ndarray, peak: float = _PEAK) -> float:
    """Wang et al.'s SSIM (Gaussian 11 / 1.5, 'valid', mean of the map) of two 2-D arrays on a 0..peak scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"ssim compares two same-shaped 2-D arrays, got {a.shape} and {b.shape}")
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (after shaving), got {a.shape}")
    c1, c2 = (_K1 * peak) ** 2, (_K2 * peak) ** 2
    g = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = _filter_valid(a * a, g) - mu_aa
    var_b = _filter_valid(b * b, g) - mu_bb
    cov = _filter_valid(a * b, g) - mu_ab
    ssim_map = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int, *, rounded_y: bool = True) -> float:
    """PSNR (dB, peak 255) of uint8 `sr` against uint8 `hr` on Y (gray for gray `hr`), `shave` px dropped."""
    return psnr(*luminance_pair(sr, hr, shave, rounded_y=rounded_y))


def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int, *, rounded_y: bool = True) -> float:
    """SSIM of uint8 `sr` against uint8 `hr` on Y (gray for gray `hr`), `shave` px dropped."""
    return ssim(*luminance_pair(sr, hr, shave, rounded_y=rounded_y))
