"""The training config: every key with its default (a ConfigDict), and the frozen dataclass it becomes.

Experiment files (`experiments/*.py`) start from `default_config()` and change what they need; the trainer
converts once, at the edge, with `TrainConfig.from_config`, so a key that an experiment mistypes fails at
`config_flags` (locked) and a value that does not fit fails here with one clear line.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from rnan_jax import data
from rnan_jax.model import DEPTHWISE_IMPLS, RNANConfig
from rnan_jax.step import OptimConfig


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1_000_000
    c.batch_size = 16  # global: split over all devices of all hosts
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000
    c.keep_checkpoints = 3  # the latest few; the best by validation PSNR is kept apart (workdir/best)
    c.init_from = ""  # a checkpoint (workdir or step folder) to copy matching parameters from, e.g. x2 -> x4
    c.num_val_images_logged = 3  # LR/bicubic/SR/HR comparisons written to TensorBoard per validation
    c.model = ml_collections.ConfigDict(dataclasses.asdict(RNANConfig()))
    c.execution = ml_collections.ConfigDict(dict(
        scan_unroll=0,  # 0: the default (CPU: full up to 24 blocks, else rolled; rolled elsewhere); -1: full; n
        depthwise="auto",  # "auto" (backend default), "grouped" (feature_group_count) or "shifted"
        batch_chunks=0,  # 0: the default (2 on a one-device CPU run, else 1); n: gradients of n parts, averaged
        # True: parameters cast to model.dtype once per step (model.cast_params) rather than per block inside
        # the scan; fewer kernels, bfloat16-rounded weight gradients; no effect in float32. Not yet measured.
        cast_params_once=False,
    ))
    # The optimizer, defaults from step.OptimConfig (documented there); total_steps is the run's, above.
    c.optim = ml_collections.ConfigDict(
        {k: v for k, v in dataclasses.asdict(OptimConfig()).items() if k != "total_steps"})
    c.data = data.default_config()
    return c


def _non_negative(key: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{key} must be 0 (the default) or positive, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int
    total_steps: int
    batch_size: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    init_from: str
    num_val_images_logged: int
    model: RNANConfig
    optim: OptimConfig
    data: data.DataConfig
    scan_unroll: int | bool | None
    depthwise: str | None
    batch_chunks: int  # 0: the default
    cast_params_once: bool = False

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> "TrainConfig":
        model = RNANConfig(**{**c.model.to_dict(), "rgb_mean": tuple(c.model.rgb_mean)})
        optim = OptimConfig(**c.optim.to_dict(), total_steps=c.total_steps)
        if optim.schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"optim.schedule must be step, cosine or constant, got {optim.schedule!r}")
        for key in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            if c[key] <= 0:
                raise ValueError(f"{key} must be positive, got {c[key]}")
        unroll = c.execution.scan_unroll
        depthwise = c.execution.depthwise
        if depthwise not in ("auto", *DEPTHWISE_IMPLS):
            raise ValueError(f"execution.depthwise must be auto, grouped or shifted, got {depthwise!r}")
        return cls(seed=c.seed, total_steps=c.total_steps, batch_size=c.batch_size, log_every=c.log_every,
                   eval_every=c.eval_every, checkpoint_every=c.checkpoint_every,
                   keep_checkpoints=c.keep_checkpoints, init_from=c.init_from,
                   num_val_images_logged=c.num_val_images_logged, model=model, optim=optim,
                   data=data.DataConfig.from_config(c.data, scale=model.scale),
                   scan_unroll=None if unroll == 0 else (True if unroll < 0 else unroll),
                   depthwise=None if depthwise == "auto" else depthwise,
                   batch_chunks=_non_negative("execution.batch_chunks", c.execution.batch_chunks),
                   cast_params_once=bool(c.execution.cast_params_once))
