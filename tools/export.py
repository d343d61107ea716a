"""Exports a trained RNAN as a serialized `jax.export` artifact (StableHLO, parameters included).

    python tools/export.py --checkpoint WORKDIR --output rnan_x4.jaxexport
        [--which auto|latest|best|ema] [--platforms cpu,cuda,tpu] [--fixed_size H,W] [--dtype bfloat16]

The artifact maps lr float32 [B, h, w, 3] in [0, 1] to sr float32 [B, s*h, s*w, 3] (not clipped) with B, h
and w symbolic: one file serves every batch and image size; `--fixed_size` pins h and w for runtimes that
need static shapes. By default it is lowered for cpu, cuda and tpu at once. The line it prints names the
parameters read, as evaluate's report does (`--which auto`: `of --checkpoint RUN --which ema (step 8)`; of a zoo
file what it records: `of --checkpoint zoo:NAME (the run's ema at step 2000)`). Serializing
needs the `flatbuffers` package. `rnan_jax/export.py` (`export_model`, `save`) does the work; its docstring says more
and shows how to load and run the artifact with JAX alone, without rnan_jax.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags

from rnan_jax import cli, env, paths
from rnan_jax.checkpoint import CLI_WHICH, WHICH_HELP, CheckpointError, load_named, named_source, resolve_which
from rnan_jax.export import DEFAULT_PLATFORMS, PLATFORMS, export_model, save


def main(argv: Sequence[str]) -> None:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    fixed = None
    if FLAGS.fixed_size:
        parts = [p.strip() for p in FLAGS.fixed_size.split(",")]
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise app.UsageError(f"--fixed_size must be H,W (positive integers), got {FLAGS.fixed_size!r}")
        fixed = (int(parts[0]), int(parts[1]))
    if not FLAGS.output.strip():  # `--output "$OUT"` with OUT unset: it was "--output  is a folder", and "  " a file
        raise app.UsageError("--output is empty (an unset variable?): name the artifact's file")
    try:  # --output=~/x: no shell expands a ~ after "="; a gs:// URL stays one (and needs gcsfs)
        output = paths.resolve(FLAGS.output)
    except ValueError as e:
        raise app.UsageError(f"--output {e}") from None
    if paths.isdir(output) or FLAGS.output.endswith(("/", os.sep)):  # found before the minutes an export can take
        # (a gs:// folder too: it was after); "new/" made a file named new, and said it wrote it
        raise app.UsageError(f"--output {FLAGS.output} is a folder; give the artifact's file name")
    env.prepare_process()
    try:
        which = resolve_which(FLAGS.checkpoint, FLAGS.which)  # auto: what validation scored
        params, config, named = load_named(FLAGS.checkpoint, which=which)  # and the step read, for the line below
    except CheckpointError as e:
        print(f"export: cannot load --checkpoint: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        exported = export_model(params, config, platforms=FLAGS.platforms, fixed_size=fixed, dtype=FLAGS.dtype)
    except ValueError as e:  # e.g. parameters that do not fit the checkpoint's config
        sys.exit(f"export: cannot export {FLAGS.checkpoint}: {' '.join(str(e).split())[:500]}")
    try:
        size = save(exported, output)
    except OSError as e:
        print(f"export: cannot write --output: {e}", file=sys.stderr)
        sys.exit(2)
    of = named_source(FLAGS.checkpoint, which)
    print(f"wrote {output} ({size / 2**20:.1f} MiB) of {of} ({named.text}): "
          f"x{config.scale}, input {exported.in_avals[0]}, "
          f"output {exported.out_avals[0]}, platforms {', '.join(exported.platforms)}")


def _define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "A training workdir, one checkpoint step's folder, or zoo:NAME (shipped "
                        "weights, e.g. zoo:small_x2) or a zoo file's path.", required=True)
    flags.DEFINE_string("output", None, "Where to write the serialized artifact: a file name or a gs:// URL.",
                        required=True)
    flags.DEFINE_enum("which", "auto", list(CLI_WHICH), WHICH_HELP)
    flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "Platforms to lower for (cpu, cuda, rocm, tpu).")
    flags.register_validator("platforms", lambda values: bool(values) and all(v in PLATFORMS for v in values),
                             f"each value must be one of {', '.join(PLATFORMS)} (NVIDIA GPUs: cuda)")
    flags.DEFINE_string("fixed_size", None, "H,W: export for this LR size only (batch stays symbolic).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the checkpoint's).")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
