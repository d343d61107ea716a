"""Trained weights shipped with the package, addressed as `zoo:NAME` wherever a checkpoint is accepted.

Each model is one flax msgpack file in this folder, `NAME.msgpack`, holding {"params": the parameter tree,
"config": the RNANConfig fields, "meta": how it was trained and scored}. MODEL_ZOO.md at the repository root
gives every model's recipe and its Table 1 numbers. `tools/make_zoo.py` writes a file from a training workdir.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from typing import Any

import numpy as np
from flax import serialization

from rnan_jax import paths
from rnan_jax.api import check_params
from rnan_jax.model import RNANConfig

PREFIX = "zoo:"
_SUFFIX = ".msgpack"


class ZooError(ValueError):
    """An unknown zoo name or an unreadable zoo file; the message names the models that exist."""


def is_zoo(path: Any) -> bool:
    """Whether `path` names zoo weights: "zoo:NAME", or a zoo-format file anywhere ("weights/NAME.msgpack",
    what tools/make_zoo.py writes), which `checkpoint.load` then reads as the zoo's own."""
    return isinstance(path, str) and (path.startswith(PREFIX) or path.endswith(_SUFFIX))


def names() -> list[str]:
    """The models shipped with this installation, e.g. ["small_x2"]."""
    folder = importlib.resources.files(__name__)
    return sorted(p.name[:-len(_SUFFIX)] for p in folder.iterdir() if p.name.endswith(_SUFFIX))


def path_of(name: str) -> str:
    """The file of zoo model `name` ("small_x2" or "zoo:small_x2"; a path ending in .msgpack is itself)."""
    if not name.startswith(PREFIX) and name.endswith(_SUFFIX):
        return os.path.expanduser(name)  # --checkpoint=~/m.msgpack: no shell expands a ~ after "="
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    available = names()
    if name not in available:
        raise ZooError(f"{PREFIX}{name}: no such model in the zoo (available: "
                       f"{', '.join(PREFIX + n for n in available) or 'none'})")
    return os.fspath(importlib.resources.files(__name__) / (name + _SUFFIX))


def write(path: str, params: Any, config: RNANConfig, meta: dict | None = None) -> int:
    """Writes a zoo file (float32 parameters, the config, `meta`); returns its size in bytes. Raises ValueError,
    writing nothing, for parameters that do not fit `config` (a file that `read` would refuse)."""
    check_params(params, config)
    data = serialization.msgpack_serialize({"params": _to_numpy(params), "config": _plain(dataclasses.asdict(config)),
                                            "meta": _plain(meta or {})})
    paths.write_atomically(os.path.expanduser(path), lambda f: f.write(data))
    return len(data)


def _plain(value: Any) -> Any:
    """JSON-like values (msgpack stores lists, not tuples)."""
    return json.loads(json.dumps(value))


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def read(path: str) -> tuple[dict, RNANConfig, dict]:
    """(params, RNANConfig, meta) from a zoo file."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            record = serialization.msgpack_restore(f.read())
        config = RNANConfig(**record["config"])  # RNANConfig makes rgb_mean a tuple of floats itself
        check_params(record["params"], config, what="parameters that do not fit its config")
        meta = dict(record.get("meta") or {})
    except FileNotFoundError:
        raise ZooError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ZooError(f"{path}: not a readable zoo file ({type(e).__name__}: {e})") from None
    return record["params"], config, meta


def load(name: str) -> tuple[dict, RNANConfig]:
    """(params, RNANConfig) of zoo model `name` ("zoo:small_x2" or "small_x2")."""
    params, config, _ = read(path_of(name))
    return params, config


def meta(name: str) -> dict:
    return read(path_of(name))[2]
