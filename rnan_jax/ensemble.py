"""Geometric self-ensemble ("RNAN+"): average an SR function's outputs over the 8 flips/rotations of its input."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRANSFORMS = 8
_SPATIAL = (-3, -2)  # height, width of [B, h, w, C] and [h, w, C]


def _xp(x):
    # Tracers are jax.Array too, so the ensemble can also run inside jit.
    return jnp if isinstance(x, jax.Array) else np


def transform(x, index: int):
    """The `index`-th (0..7) of the dihedral transforms: rot90 by `index % 4` of x, flipped along width first
    when `index >= 4`. `x` is [B, h, w, C] or [h, w, C], numpy or jax."""
    xp = _xp(x)
    if index >= 4:
        x = xp.flip(x, axis=-2)
    return xp.rot90(x, k=index % 4, axes=_SPATIAL)


def inverse_transform(y, index: int):
    """Undoes `transform(., index)`: `inverse_transform(transform(x, i), i) == x` for every shape and i."""
    xp = _xp(y)
    y = xp.rot90(y, k=-(index % 4), axes=_SPATIAL)
    if index >= 4:
        y = xp.flip(y, axis=-2)
    return y


def self_ensemble(fn: Callable, lr):
    """Mean over the 8 transforms t of t^-1(fn(t(lr))), accumulated in float32 (float64 for float64 outputs).

    `fn` maps lr [B, h, w, C] or [h, w, C] to sr [B, s*h, s*w, C'] or [s*h, s*w, C'] and must accept both
    orientations (h, w) and (w, h). Works with numpy or jax arrays (the result follows `fn`'s output type).
    """
    total = None
    for i in range(NUM_TRANSFORMS):
        out = inverse_transform(fn(transform(lr, i)), i)
        xp = _xp(out)
        out = out.astype(xp.result_type(out.dtype, xp.float32))
        total = out if total is None else total + out
    return total / NUM_TRANSFORMS
