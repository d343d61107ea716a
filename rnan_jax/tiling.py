"""How much tiled upscaling differs from whole-image upscaling, and the device memory a whole image needs
(tools/tiling_bound.py prints both; tools/BENCHMARKS.md, "Inference: tiling", has its numbers).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnan_jax import api, degrade, inference, metrics
from rnan_jax.model import RNANConfig


def tiling_rows(params, config: RNANConfig, hr: np.ndarray, tiles: Sequence[int],
                overlaps: Sequence[int]) -> list[dict]:
    """One row per (tile, overlap): PSNRs of tiled against whole output, and of both against `hr` (Y)."""
    lr = degrade.bicubic_lr(hr, config.scale)
    hr = degrade.modcrop(hr, config.scale)
    whole = inference.upscale_image(params, lr.astype(np.float32) / 255, config=config)
    whole_u8 = metrics.quantize(whole)
    rows = []
    for tile in tiles:
        for overlap in overlaps:
            if overlap >= tile:
                continue
            tiled = inference.upscale_image(params, lr.astype(np.float32) / 255, config=config, tile=tile,
                                            overlap=overlap)
            tiled_u8 = metrics.quantize(tiled)
            rows.append(dict(
                lr=f"{lr.shape[1]}x{lr.shape[0]}", tile=tile, overlap=overlap,
                float_psnr=metrics.psnr(tiled, whole, peak=1.0),
                uint8_psnr=metrics.psnr(tiled_u8, whole_u8),
                max_levels=int(np.abs(tiled_u8.astype(int) - whole_u8).max()),
                hr_whole=metrics.psnr_y(whole_u8, hr, config.scale),
                hr_tiled=metrics.psnr_y(tiled_u8, hr, config.scale)))
    return rows


def forward_memory(config: RNANConfig, side: int) -> tuple[int, int, int]:
    """(temp, argument, output) bytes of the x`config.scale` forward pass on one [side, side] LR image, as XLA's
    `memory_analysis()` of the present backend plans it (rolled scan, grouped depthwise convs)."""
    shapes = jax.eval_shape(lambda k: api.init(k, config), jax.random.key(0))
    fn = jax.jit(lambda p, x: api.apply(p, x, config=config, scan_unroll=1, depthwise="grouped"))
    m = fn.lower(shapes, jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)).compile().memory_analysis()
    return m.temp_size_in_bytes, m.argument_size_in_bytes, m.output_size_in_bytes


def largest_fitting(config: RNANConfig, budget: float, step: int = 16) -> int:
    """The largest multiple of `step` whose square LR image's temp + arguments + output fit `budget` bytes;
    0 when not even a `step` x `step` image fits."""
    if sum(forward_memory(config, step)) > budget:
        return 0
    lo, hi = step, step
    while sum(forward_memory(config, hi)) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if sum(forward_memory(config, mid)) <= budget else (lo, mid)
    return lo
