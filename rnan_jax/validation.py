"""What a training run validates on and how: full images, upscaled and scored exactly as
`python -m rnan_jax.evaluate` does, against their bicubic upscaling.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import jax
import numpy as np

from rnan_jax import benchmark_sets, data, images, summary, upscalers
from rnan_jax.configs import TrainConfig


# What JAX reports of a compile (jax.monitoring): tracing, lowering, the backend's compile (or its cache's read).
_COMPILE_EVENTS = frozenset(f"/jax/core/compile/{name}_duration"
                            for name in ("jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile"))
_compiling = threading.local()  # .seconds: the compile seconds counted in this thread, None when not counting
_listening = False


def _count_compile(event: str, duration: float, **kwargs: Any) -> None:
    if event in _COMPILE_EVENTS and getattr(_compiling, "seconds", None) is not None:
        _compiling.seconds += duration


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """One set's pairs, their bicubic upscalings and its bicubic PSNR; `prefix` names its scalars."""

    name: str
    prefix: str
    pairs: list[benchmark_sets.Pair]
    bicubic: list[np.ndarray]
    bicubic_psnr: float


def _described(vset: ValidationSet, named: bool) -> str:
    """One set as `Validator.describe` says it: "5 image(s), bicubic PSNR 33.649 dB", after its name if `named`."""
    return f"{vset.name + ' ' if named else ''}{len(vset.pairs)} image(s), bicubic PSNR {vset.bicubic_psnr:.3f} dB"


class Validator:
    """PSNR/SSIM of the model on full validation images against bicubic: `data.validation_images`' pairs
    upscaled by `upscalers.model_upscaler` and `bicubic_upscaler` and scored by `benchmark_sets.score`, the
    pairs, calls and rule of `python -m rnan_jax.evaluate`, so the logged val/psnr is what evaluate prints for
    the same parameters and images (an image too large for the device at once is upscaled in windows, with a
    warning, as there).

    With several benchmark sets (`data.val_set="Set5,Set14"`, as EDSR's --data_test Set5+Set14) the first is
    the run's validation set: its scores are val/psnr, val/ssim and val/bicubic_psnr, which pick the best
    checkpoint; each other set's are val/<set>/psnr, val/<set>/ssim and val/<set>/bicubic_psnr."""

    def __init__(self, cfg: TrainConfig):
        self.sets = []
        for i, name in enumerate(cfg.data.val_sets if cfg.data.val_source == "benchmark" else [""]):
            pairs = data.validation_images(dataclasses.replace(cfg.data, val_set=name) if name else cfg.data)
            bicubic = [upscalers.bicubic_upscaler(p) for p in pairs]  # evaluate's Bicubic row
            psnr = float(np.mean([benchmark_sets.score(b, p)[0] for b, p in zip(bicubic, pairs)]))
            self.sets.append(ValidationSet(name, "val/" if i == 0 else f"val/{name}/", pairs, bicubic, psnr))
        self.config = cfg.model
        self.compile_s = 0.0  # of the latest call: the seconds it spent compiling (`__call__`)

    @property
    def pairs(self) -> list[benchmark_sets.Pair]:
        """The first set's pairs: the run's validation images."""
        return self.sets[0].pairs

    @property
    def bicubic_psnr(self) -> float:
        return self.sets[0].bicubic_psnr

    def describe(self) -> str:
        """What the run validates on, for its log: "5 image(s), bicubic PSNR 33.649 dB" (and per further set)."""
        return "; ".join(_described(s, named=len(self.sets) > 1) for s in self.sets)

    def same_first_set(self, described: str) -> bool:
        """Whether `described`, the `describe()` of the run that chose a best/ checkpoint, begins with this run's
        first set: the PSNRs that pick best/ are then of the same images, whatever further sets either run scores
        (a resumed run that added Set14 to Set5 replaced a better best/ by its next validation)."""
        return described.split("; ")[0] in (_described(self.sets[0], named=False), _described(self.sets[0], named=True))

    @property
    def count(self) -> int:
        """The images of every set: how many times `__call__` asks `stop`."""
        return sum(len(s.pairs) for s in self.sets)

    def __call__(self, params: Any, num_logged: int, stop: Callable[[], bool] | None = None
                 ) -> tuple[dict[str, float], dict[str, np.ndarray]] | None:
        """(scores, strips), or None when `stop()`, asked before each image, said to stop: a validation that is
        not done (its partial scores are no one's), which a stop request no longer waits for (a paper-size model's
        DIV2K or Urban100 validation outlasts a TPU VM's preemption notice, and the steps since the last
        checkpoint were lost). In a run of several processes `stop` must be one decision for all (`preemption.agree`)
        and every process ask it as often (`count`).

        Sets `compile_s` to the seconds this call spent compiling (image sizes not upscaled before, as JAX reports
        them): a cost the next calls do not repeat, which the trainer's ETA leaves out of a validation's (the first
        validation's compile, counted for each one to come, overstated it by hours)."""
        global _listening
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_count_compile)
            _listening = True
        _compiling.seconds = 0.0
        try:
            return self._call(params, num_logged, stop)
        finally:
            self.compile_s, _compiling.seconds = _compiling.seconds, None

    def _call(self, params: Any, num_logged: int, stop: Callable[[], bool] | None
              ) -> tuple[dict[str, float], dict[str, np.ndarray]] | None:
        scores, strips = {}, {}
        # one device's copy of a training run's replicated parameters: with them all, every device upscaled
        # every image (N times the work, and N copies of the memory that a CPU's tile budget counts once)
        params = jax.tree_util.tree_map(_one_copy, params)
        upscale = upscalers.model_upscaler(params, self.config)
        for k, vset in enumerate(self.sets):
            psnrs, ssims = [], []
            for i, (pair, bic) in enumerate(zip(vset.pairs, vset.bicubic)):
                if stop is not None and stop():
                    return None
                sr = upscale(pair)
                psnr, ssim = benchmark_sets.score(sr, pair)
                psnrs.append(psnr)
                ssims.append(ssim)
                if k == 0 and i < num_logged:  # the run's validation set's images only
                    lr = images.as_rgb(pair.lr)  # a gray image as the model saw it, replicated
                    lr_up = np.repeat(np.repeat(lr, pair.scale, 0), pair.scale, 1)
                    strips[f"val/{pair.name} (LR | bicubic | SR | HR)"] = summary.comparison_strip(
                        lr_up, images.as_rgb(bic), sr, images.as_rgb(pair.hr))
            scores.update({f"{vset.prefix}psnr": float(np.mean(psnrs)), f"{vset.prefix}ssim": float(np.mean(ssims)),
                           f"{vset.prefix}bicubic_psnr": vset.bicubic_psnr})
        return scores, strips

    def others_line(self, scores: dict[str, float]) -> str:
        """"; Set14 30.512 dB, SSIM 0.8890 (bicubic 30.224 dB)" for each set after the first ("" for one set)."""
        return "".join(f"; {s.name} {scores[s.prefix + 'psnr']:.3f} dB, SSIM {scores[s.prefix + 'ssim']:.4f} "
                       f"(bicubic {s.bicubic_psnr:.3f} dB)" for s in self.sets[1:])


def _one_copy(x: Any) -> Any:
    """A replicated array's copy on this process's first device holding it; anything else as it is."""
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 and x.is_fully_replicated:
        return x.addressable_shards[0].data
    return x
