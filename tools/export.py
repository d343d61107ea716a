"""Exports a trained RNAN as a serialized `jax.export` artifact (StableHLO, parameters included).

    python tools/export.py --checkpoint WORKDIR --output rnan_x4.jaxexport
        [--which latest|best|ema] [--platforms cpu,cuda,tpu] [--fixed_size H,W] [--dtype bfloat16]

The artifact maps lr float32 [B, h, w, 3] in [0, 1] to sr float32 [B, s*h, s*w, 3] (not clipped) with B, h
and w symbolic: one file serves every batch and image size (each new shape is compiled when first called).
The whole network exports with symbolic spatial dimensions, the GC block's softmax over h*w positions and
the pixel shuffle's reshapes included (checked with jax 0.10.2); `--fixed_size` pins h and w for runtimes
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

import os
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import app, flags

from rnan_jax import api, env
from rnan_jax.checkpoint import WHICH, CheckpointError, load
from rnan_jax.model import RNANConfig

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def export_model(params: Mapping[str, Any], config: RNANConfig | None = None, *,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS, fixed_size: tuple[int, int] | None = None,
                 dtype: str | None = None, scan_unroll: int | bool = 1,
                 depthwise: str = "grouped") -> jax.export.Exported:
    """`lr [B, h, w, 3] -> apply(params, lr)` exported with `params` as constants; B symbolic, and h, w too
    unless `fixed_size` = (h, w). dtype, scan_unroll, depthwise: as `rnan_jax.apply`."""
    config = config or api.infer_config(params)
    params = jax.tree_util.tree_map(jnp.asarray, params)

    def upscale(lr: jax.Array) -> jax.Array:
        return api.apply(params, lr, config=config, dtype=dtype, scan_unroll=scan_unroll, depthwise=depthwise)

    if fixed_size is None:
        shape = jax.export.symbolic_shape("b, h, w, 3")
    else:
        shape = (*jax.export.symbolic_shape("b"), *fixed_size, 3)
    return jax.export.export(jax.jit(upscale), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct(shape, jnp.float32))


def save(exported: jax.export.Exported, path: str) -> int:
    """Writes the serialized artifact to `path`; returns its size in bytes."""
    blob = exported.serialize()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)
    return len(blob)


def main(argv: Sequence[str]) -> None:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    env.quiet_logging()
    try:
        params, config = load(FLAGS.checkpoint, which=FLAGS.which)
    except CheckpointError as e:
        print(f"export: cannot load --checkpoint: {e}", file=sys.stderr)
        sys.exit(2)
    fixed = None
    if FLAGS.fixed_size:
        parts = [p.strip() for p in FLAGS.fixed_size.split(",")]
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise app.UsageError(f"--fixed_size must be H,W (positive integers), got {FLAGS.fixed_size!r}")
        fixed = (int(parts[0]), int(parts[1]))
    exported = export_model(params, config, platforms=FLAGS.platforms, fixed_size=fixed, dtype=FLAGS.dtype)
    size = save(exported, FLAGS.output)
    print(f"wrote {FLAGS.output} ({size / 2**20:.1f} MiB): x{config.scale}, input {exported.in_avals[0]}, "
          f"output {exported.out_avals[0]}, platforms {', '.join(exported.platforms)}")


def _define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "A training workdir or one checkpoint step's folder.", required=True)
    flags.DEFINE_string("output", None, "Where to write the serialized artifact.", required=True)
    flags.DEFINE_enum("which", "latest", list(WHICH), "Which parameters of --checkpoint.")
    flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "Platforms to lower for (cpu, cuda, rocm, tpu).")
    flags.DEFINE_string("fixed_size", None, "H,W: export for this LR size only (batch stays symbolic).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the checkpoint's).")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
