"""A trained RNAN as a serialized `jax.export` artifact (StableHLO, parameters included).

    from rnan_jax import export, load
    params, config = load("runs/x4")
    export.save(export.export_model(params, config), "rnan_x4.jaxexport")

(`python tools/export.py --checkpoint WORKDIR --output rnan_x4.jaxexport` does the same from the command line.)

The artifact maps lr float32 [B, h, w, 3] in [0, 1] to sr float32 [B, s*h, s*w, 3] (not clipped) with B, h
and w symbolic: one file serves every batch and image size (each new shape is compiled when first called).
The whole network exports with symbolic spatial dimensions, the GC block's softmax over h*w positions and
the pixel shuffle's reshapes included (checked with jax 0.10.2); `fixed_size` pins h and w for runtimes
that need static shapes. By default it is lowered for cpu, cuda and tpu at once (the caller's platform is
picked when it is called), with a rolled scan and `feature_group_count` depthwise convolutions, the compact
accelerator choice. Serializing needs the `flatbuffers` package.

Loading and running it needs only JAX, not rnan_jax:

    import jax
    import numpy as np

    with open("rnan_x4.jaxexport", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    lr = np.random.rand(1, 48, 64, 3).astype(np.float32)  # [B, h, w, 3], RGB in [0, 1]
    sr = exported.call(lr)                                 # [B, 4h, 4w, 3] float32, clip before saving
    upscale = jax.jit(exported.call)                       # compiles once per input shape
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from rnan_jax import api, native, paths
from rnan_jax.model import RNANConfig

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_model(params: Mapping[str, Any], config: RNANConfig | None = None, *,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS, fixed_size: tuple[int, int] | None = None,
                 dtype: str | None = None, scan_unroll: int | bool = 1,
                 depthwise: str = "grouped") -> jax.export.Exported:
    """`lr [B, h, w, 3] -> apply(params, lr)` exported with `params` as constants; B symbolic, and h, w too
    unless `fixed_size` = (h, w). dtype, scan_unroll, depthwise: as `rnan_jax.apply`. Raises ValueError for
    an unknown platform, a non-positive size or parameters that do not fit `config`."""
    if isinstance(platforms, str):  # "cpu" or "cpu,cuda", as --platforms takes them; not the letters c, p, u
        platforms = [p.strip() for p in platforms.split(",") if p.strip()]
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ValueError(f"platforms must be some of {', '.join(PLATFORMS)}, got {', '.join(platforms) or 'none'}"
                         + (" (NVIDIA GPUs are 'cuda')" if "gpu" in unknown else ""))
    platforms = tuple(dict.fromkeys(platforms))  # "cpu,cpu" is cpu once, not a lowering the artifact lists twice
    if fixed_size is not None and (len(fixed_size) != 2 or not all(isinstance(v, numbers.Integral) and v >= 1
                                                                  for v in fixed_size)):
        raise ValueError(f"fixed_size must be (h, w), both positive integers, got {fixed_size}")
    if config is None:
        config = api.infer_config(params)
    else:
        api.check_params(params, config)
    # host arrays: constants of no device (parameters replicated over a mesh of explicit axes, as jax.make_mesh
    # makes it, failed the export: "Length of device assignment 1 is not equal to the size of the mesh")
    params = jax.tree_util.tree_map(np.asarray, params)

    def upscale(lr: jax.Array) -> jax.Array:
        return api.apply(params, lr, config=config, dtype=dtype, scan_unroll=scan_unroll, depthwise=depthwise)

    if fixed_size is None:
        shape = jax.export.symbolic_shape("b, h, w, 3")
    else:
        shape = (*jax.export.symbolic_shape("b"), *fixed_size, 3)
    with native.disabled():  # XLA's convolutions: jax.export refuses the native kernels' custom calls
        return jax.export.export(jax.jit(upscale), platforms=platforms)(
            jax.ShapeDtypeStruct(shape, jnp.float32))


def save(exported: jax.export.Exported, path: str) -> int:
    """Writes the serialized artifact to `path`: a local file (~ expanded; its folder made if missing; a file
    there replaced only once the new one is complete) or a gs:// URL. Returns its size in bytes. Raises OSError
    naming the path, ValueError for a gs:// URL that nothing installed can reach."""
    path = paths.resolve(path)
    if paths.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder (give a file name, e.g. {os.path.join(path, 'rnan.jaxexport')})")
    blob = exported.serialize()
    if paths.is_url(path):  # an object appears only once it is whole
        epath.Path(path).write_bytes(blob)
    else:
        paths.write_atomically(path, lambda f: f.write(blob))
    return len(blob)
