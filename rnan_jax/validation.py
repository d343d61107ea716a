"""What a training run validates on and how: full images, upscaled and scored exactly as
`python -m rnan_jax.evaluate` does, against their bicubic upscaling.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rnan_jax import benchmark_sets, data, images, summary, upscalers
from rnan_jax.configs import TrainConfig


class Validator:
    """PSNR/SSIM of the model on full validation images against bicubic: `data.validation_images`' pairs
    upscaled by `upscalers.model_upscaler` and `bicubic_upscaler` and scored by `benchmark_sets.score`, the
    pairs, calls and rule of `python -m rnan_jax.evaluate`, so the logged val/psnr is what evaluate prints for
    the same parameters and images (an image too large for the device at once is upscaled in windows, with a
    warning, as there)."""

    def __init__(self, cfg: TrainConfig):
        self.pairs = data.validation_images(cfg.data)
        self.bicubic = [upscalers.bicubic_upscaler(p) for p in self.pairs]  # evaluate's Bicubic row
        self.bicubic_psnr = float(np.mean([benchmark_sets.score(b, p)[0] for b, p in zip(self.bicubic, self.pairs)]))
        self.config = cfg.model

    def __call__(self, params: Any, num_logged: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        psnrs, ssims, strips = [], [], {}
        for i, (pair, bic) in enumerate(zip(self.pairs, self.bicubic)):
            lr = images.as_rgb(pair.lr)  # a gray image goes in replicated, as evaluate feeds it
            sr = upscalers.model_upscaler(params, self.config)(pair)
            psnr, ssim = benchmark_sets.score(sr, pair)
            psnrs.append(psnr)
            ssims.append(ssim)
            if i < num_logged:
                lr_up = np.repeat(np.repeat(lr, pair.scale, 0), pair.scale, 1)
                strips[f"val/{pair.name} (LR | bicubic | SR | HR)"] = summary.comparison_strip(
                    lr_up, images.as_rgb(bic), sr, images.as_rgb(pair.hr))
        return {"val/psnr": float(np.mean(psnrs)), "val/ssim": float(np.mean(ssims)),
                "val/bicubic_psnr": self.bicubic_psnr}, strips
