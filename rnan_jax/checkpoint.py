"""The checkpoint format (orbax) and `load(path) -> (params, RNANConfig)`.

A training workdir holds:
  checkpoints/<step>/  items params, ema (when EMA is on), opt (step + optimizer state), data (the grain
                       iterator), meta (JSON: model_config, step, metrics); the latest few are kept;
  best/<step>/         items params, ema, meta of the checkpoint with the best validation PSNR;
  config.json, git_revision.txt  the resolved config and the code's revision.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from rnan_jax import zoo
from rnan_jax.model import RNANConfig

CHECKPOINTS, BEST = "checkpoints", "best"
WHICH = ("latest", "best", "ema")


class CheckpointError(ValueError):
    """A path that holds no usable rnan_jax checkpoint; the message names it."""


def manager(directory: str, *, max_to_keep: int | None = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` (created if missing), saving asynchronously."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def meta_for(config: RNANConfig, step: int, **metrics: Any) -> dict:
    """The JSON record stored with every checkpoint."""
    return {"model_config": dataclasses.asdict(config), "step": int(step), **metrics}


def config_from_meta(meta: dict) -> RNANConfig:
    fields = dict(meta["model_config"])
    fields["rgb_mean"] = tuple(fields["rgb_mean"])
    return RNANConfig(**fields)


def _single_device_target(item_dir: str) -> Any:
    """Abstract arrays for restoring an item onto one local device, whatever topology saved it."""
    tree = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


def _locate(path: str, which: str) -> tuple[str, int]:
    """(manager directory, step) of the checkpoint that `path` and `which` name."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    if os.path.isdir(os.path.join(path, "params")):  # one step's folder
        step_name = os.path.basename(path)
        if not step_name.isdigit():
            raise CheckpointError(f"{path}: a checkpoint step folder must be named by its step number")
        return os.path.dirname(path), int(step_name)
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):  # a training workdir
        path = os.path.join(path, BEST if which == "best" else CHECKPOINTS)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no best checkpoint yet (it is written after the first validation)")
    steps = ocp.utils.checkpoint_steps(path) if os.path.isdir(path) else []
    steps = [s for s in steps if os.path.isdir(os.path.join(path, str(s), "params"))]
    if not steps:
        raise CheckpointError(f"{path}: not an rnan_jax checkpoint (expected a training workdir, its "
                              f"{CHECKPOINTS}/ or {BEST}/ folder, or one step's folder holding params/)")
    return path, max(steps)


def load(path: str, *, which: str = "latest") -> tuple[dict, RNANConfig]:
    """Parameters and architecture from a training workdir, one step's checkpoint folder, or a model of the
    package's zoo ("zoo:small_x2", see MODEL_ZOO.md).

    which: "latest" (the newest checkpoint's parameters), "best" (best validation PSNR), or "ema" (the
    newest checkpoint's exponential moving average of the parameters). Raises `CheckpointError`.
    """
    if which not in WHICH:
        raise CheckpointError(f"which must be one of {WHICH}, got {which!r}")
    if zoo.is_zoo(path):  # shipped weights: one set of parameters, `which` does not apply
        try:
            return zoo.load(path)
        except zoo.ZooError as e:
            raise CheckpointError(str(e)) from None
    directory, step = _locate(path, which)
    item = "ema" if which == "ema" else "params"
    item_dir = os.path.join(directory, str(step), item)
    if not os.path.isdir(item_dir):
        raise CheckpointError(f"{os.path.dirname(item_dir)}: holds no {item} (was the run trained with EMA?)")
    restored = ocp.CheckpointManager(directory).restore(step, args=ocp.args.Composite(**{
        item: ocp.args.StandardRestore(_single_device_target(item_dir)), "meta": ocp.args.JsonRestore()}))
    return restored[item], config_from_meta(restored["meta"])
