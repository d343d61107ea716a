"""Trained weights shipped with the package, addressed as `zoo:NAME` wherever a checkpoint is accepted.

Each model is one flax msgpack file in this folder, `NAME.msgpack`, holding {"params": the parameter tree,
"config": the RNANConfig fields, "meta": how it was trained and scored}. MODEL_ZOO.md at the repository root
gives every model's recipe and its Table 1 numbers. `tools/make_zoo.py` writes a file from a training workdir
and records its SHA-256 in `sha256.json` beside it, which every read of a zoo model checks: a partial copy, a
damaged install or an edited file would otherwise load (or fail in msgpack's terms) and give wrong outputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
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

# {NAME: the SHA-256 of NAME.msgpack}, for the models in this folder; tools/make_zoo.py records each it writes.
_SHA256_FILE = "sha256.json"
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), _SHA256_FILE), encoding="utf-8") as _f:
    SHA256: dict[str, str] = json.load(_f)


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
    """Writes a zoo file (float32 parameters, the config, `meta`); returns its size in bytes. The config is stored
    with compute dtype float32, whatever the run computed in: a zoo file is for its users, who pass a config with
    dtype="bfloat16" for the faster compute (a bfloat16 run's file made them compute in bfloat16 without a word).
    Raises ValueError, writing nothing, for parameters that do not fit `config` (a file that `read` would refuse)."""
    check_params(params, config)
    config = dataclasses.replace(config, dtype="float32")
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


def _recorded_sha256(path: str) -> tuple[str, str | None]:
    """(model, its recorded SHA-256) when `path` is one of this folder's model files; ("", None) for any other
    file (a copy elsewhere: nothing to check it against)."""
    model = os.path.basename(path)[:-len(_SUFFIX)] if path.endswith(_SUFFIX) else ""
    shipped = os.path.join(os.fspath(importlib.resources.files(__name__)), model + _SUFFIX)
    if model not in SHA256 or os.path.realpath(os.path.expanduser(path)) != os.path.realpath(shipped):
        return "", None
    return model, SHA256[model]


def read(path: str) -> tuple[dict, RNANConfig, dict]:
    """(params, RNANConfig, meta) from a zoo file. One of this folder's files must have the SHA-256 that SHA256
    records for it, or ZooError says the file is damaged."""
    model, sha256 = _recorded_sha256(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else ("", None)
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ZooError(f"{path}: no such file") from None
    except (OSError, TypeError) as e:
        raise ZooError(f"{path}: not a readable zoo file ({type(e).__name__}: {e})") from None
    if sha256 is not None and (got := hashlib.sha256(data).hexdigest()) != sha256:
        raise ZooError(f"{path}: damaged file (a partial copy, a corrupted install or an edited file): its SHA-256 "
                       f"is {got[:12]}..., {PREFIX}{model}'s is {sha256[:12]}...; reinstall rnan_jax, or in a git "
                       f"checkout run `git checkout -- rnan_jax/zoo/{model}{_SUFFIX}`")
    try:
        record = serialization.msgpack_restore(data)
        # RNANConfig makes rgb_mean a tuple of floats itself; float32 compute, as `write` stores it now (a file
        # written from a bfloat16 run before that holds its dtype)
        config = RNANConfig(**{**record["config"], "dtype": "float32"})
        check_params(record["params"], config, what="parameters that do not fit its config")
        meta = dict(record.get("meta") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ZooError(f"{path}: not a readable zoo file ({type(e).__name__}: {e})") from None
    return record["params"], config, meta


def load(name: str) -> tuple[dict, RNANConfig]:
    """(params, RNANConfig) of zoo model `name` ("zoo:small_x2" or "small_x2"), its SHA-256 checked."""
    params, config, _ = read(path_of(name))  # a shipped file: read checks it
    return params, config


def meta(name: str) -> dict:
    return read(path_of(name))[2]


def record_sha256(name: str, path: str) -> str:
    """Records the SHA-256 of zoo file `path` as model `name`'s in the sha256.json beside it (rewritten whole;
    SHA256 too when that is this package's folder); returns that file. Raises OSError where it cannot be read or
    written, ValueError where it holds something else than a JSON object."""
    with open(path, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    folder = os.path.dirname(os.path.abspath(path))
    target = os.path.join(folder, _SHA256_FILE)
    recorded: dict = {}
    if os.path.exists(target):
        with open(target, encoding="utf-8") as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):  # json's own errors are ValueErrors too
            raise ValueError(f"{target}: not a JSON object of model names and SHA-256s")
    recorded[name] = sha256
    text = json.dumps(recorded, indent=1, sort_keys=True) + "\n"
    paths.write_atomically(target, lambda f: f.write(text.encode("utf-8")))
    if os.path.realpath(folder) == os.path.realpath(os.fspath(importlib.resources.files(__name__))):
        SHA256[name] = sha256
    return target
