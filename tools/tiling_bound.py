"""How much tiled upscaling differs from whole-image upscaling, and how much device memory tiling saves.

    python tools/tiling_bound.py [--checkpoint workdirs/demo] [--images Set14/baboon,Urban100/img_001]
        [--tiles 64,128,256] [--overlaps 8,32] [--sets Set14,Urban100] [--per_set 10] [--scan_tile 256]
        [--sizes 64,128,256,512,1024] [--budget_gib 16]

Part 1 upscales the bicubic LR images of benchmark HR images whole and in tiles, for each tile and
overlap, and prints the PSNR of tiled against whole-image output (float output, peak 1; uint8 output, peak
255, with the largest difference in grey levels) and the Y-PSNR of both against HR (what tiling changes in
a benchmark number); then, at `--scan_tile` and the default overlap, the three worst of the first
`--per_set` images of each of `--sets`. The weights are the checkpoint's (default: the demo run), or, when
the demo run is not there and no --checkpoint is given, init weights of the demo's architecture (the output says
which); a --checkpoint given that cannot be read is an error.
Part 2 compiles the paper's default x4 model (17.3 M parameters; rolled scans and grouped depthwise convs,
the accelerator settings) with `jax.jit(...).lower(...).compile()` for square LR inputs and prints XLA's
`memory_analysis()`: temporaries, arguments (the parameters) and output; and the largest square LR image
that fits `--budget_gib` whole. A tiled run needs the memory of one tile, whatever the image size. These
are the buffer assignments of the backend that runs the script; another backend's differ somewhat.
The measuring is `rnan_jax.tiling`; this file holds the flags and prints the tables.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
import numpy as np
from absl import flags

from rnan_jax import api, cli, images, inference
from rnan_jax.checkpoint import CLI_WHICH, WHICH_HELP, CheckpointError, load, resolve_which
from rnan_jax.env import default_data_dir, prepare_process
from rnan_jax.model import RNANConfig
from rnan_jax.tiling import forward_memory, largest_fitting, tiling_rows

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo run's architecture (experiments' demo config), for init weights when its checkpoint is missing.
DEMO = RNANConfig(scale=2, features=32, num_groups=2, num_blocks=3)


def _ints(values: Sequence[str]) -> list[int]:
    return [int(v) for v in values]


def _hr(data_dir: str, name: str) -> np.ndarray:
    """The HR image <set>/<name> (name without or with its extension: a set's HR files may be .png, .bmp, ...)."""
    dataset, stem = name.split("/")
    folder = os.path.join(data_dir, "benchmark", dataset, "HR")
    path = os.path.join(folder, stem)
    if not os.path.isfile(path):  # only "Set5/baby" was read, as Set5/HR/baby.png
        path = images.find_image(folder, (stem,)) or os.path.join(folder, f"{stem}.png")
    return images.read_rgb(path)


def _print_rows(name: str, rows: list[dict]) -> None:
    for r in rows:
        print(f"| {name} | {r['lr']} | {r['tile']} | {r['overlap']} | {r['float_psnr']:.1f} | "
              f"{r['uint8_psnr']:.1f} | {r['max_levels']} | {r['hr_whole']:.4f} / {r['hr_tiled']:.4f} |", flush=True)


def main(argv: Sequence[str]) -> None:
    prepare_process()  # orbax's INFO lines of the checkpoint's loading hidden (--verbosity 0 shows them), as evaluate
    try:
        _report(flags.FLAGS)
    except images.ImageError as e:  # a benchmark image or set that is not there
        sys.exit(f"tiling_bound: {e} (see --data_dir, --images, --sets)")
    except BrokenPipeError:  # `| head`: the reader took what it wanted (was a traceback); stdout to /dev/null, so
        # that the exit's flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _report(FLAGS: flags.FlagValues) -> None:
    try:
        which = resolve_which(FLAGS.checkpoint, FLAGS.which)  # auto: what validation scored
        params, config = load(FLAGS.checkpoint, which=which)
        source = f"{FLAGS.checkpoint} ({which})"
    except CheckpointError as e:
        if FLAGS["checkpoint"].present or FLAGS["which"].present:  # asked for: not init weights of another model
            sys.exit(f"tiling_bound: --checkpoint: {e}")
        config = DEMO
        params = api.init(jax.random.key(0), config)
        source = f"INIT WEIGHTS of the demo architecture (no checkpoint: {e})"
    header = ("| image | LR (w x h) | tile | overlap | PSNR tiled vs whole, float (dB) | same, uint8 (dB) | "
              "max diff (levels) | Y-PSNR vs HR whole / tiled (dB) |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"## Tiled vs whole-image output, x{config.scale} model from {source}\n\n{header}")
    data_dir = default_data_dir(FLAGS.data_dir)
    for name in FLAGS.images:
        rows = tiling_rows(params, config, _hr(data_dir, name), _ints(FLAGS.tiles), _ints(FLAGS.overlaps))
        _print_rows(name, rows)

    # upscale_image's default for this tile (half the tile below 64: DEFAULT_OVERLAP left no row to scan)
    tile, overlap = FLAGS.scan_tile, inference.default_overlap(FLAGS.scan_tile)
    print(f"\n## At tile {tile}, overlap {overlap} (the default overlap): the worst images of\n")
    for dataset in FLAGS.sets:
        folder = os.path.join(data_dir, "benchmark", dataset, "HR")
        files = images.list_images(folder)[:FLAGS.per_set]
        rows = [(f"{dataset}/{os.path.splitext(os.path.basename(f))[0]}", r) for f in files
                for r in tiling_rows(params, config, images.read_rgb(f), [tile], [overlap])]
        tiled = [(n, r) for n, r in rows if r["uint8_psnr"] != float("inf")]
        print(f"{dataset}, first {len(rows)} images, of which {len(rows) - len(tiled)} came out identical "
              f"(they fit one tile, or tiling changed no pixel):\n\n{header}")
        for n, r in sorted(tiled, key=lambda nr: nr[1]["uint8_psnr"])[:3]:
            _print_rows(n, [r])
        print()

    x4 = RNANConfig(scale=4)
    print(f"## Device memory of the default x4 model's forward pass (XLA {jax.default_backend()} "
          f"memory_analysis, float32, batch 1)\n")
    print("| LR side (square) | temp (MiB) | arguments (MiB) | output (MiB) | total (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for side in _ints(FLAGS.sizes):
        temp, args, out = forward_memory(x4, side)
        print(f"| {side} | {temp / 2**20:.0f} | {args / 2**20:.0f} | {out / 2**20:.0f} | "
              f"{(temp + args + out) / 2**20:.0f} |", flush=True)
    budget = FLAGS.budget_gib * 2**30
    side = largest_fitting(x4, budget)
    whole = f"{side} x {side} (output {4 * side} x {4 * side})" if side else "none (not even a 16 x 16 image)"
    print(f"\nLargest square LR image processed whole within {FLAGS.budget_gib:g} GiB: {whole}; tiled, any size "
          "fits, at the memory of one tile above.")


def _define_flags() -> None:
    flags.DEFINE_string("checkpoint", os.path.join(_REPO, "workdirs", "demo"), "Weights for part 1.")
    flags.DEFINE_enum("which", "auto", list(CLI_WHICH), WHICH_HELP)
    flags.DEFINE_string("data_dir", None, "Folder holding benchmark/<set>/HR (default: the shared data).")
    flags.DEFINE_list("images", ["Set14/baboon", "Set14/comic", "Urban100/img_001", "Urban100/img_004"],
                      "Benchmark images as <set>/<name>.")
    flags.DEFINE_list("tiles", ["64", "128", "256"], "LR tile sides.")
    flags.DEFINE_list("overlaps", ["8", "32"], "LR overlaps.")
    flags.DEFINE_list("sets", ["Set14", "Urban100"], "Benchmark sets scanned at --scan_tile.")
    flags.DEFINE_integer("per_set", 10, "Images of each of --sets scanned at --scan_tile.")
    flags.DEFINE_integer("scan_tile", 256, "Tile side for the scan over --sets (overlap: the default).")
    flags.DEFINE_list("sizes", ["64", "128", "256", "512", "1024"], "Square LR sides for part 2.")
    flags.DEFINE_float("budget_gib", 16.0, "Device memory budget for part 2 (GiB).")
    cli.require_ints("tiles")
    cli.require_ints("overlaps", minimum=0)
    cli.require_ints("sizes")
    flags.register_validator("per_set", lambda v: v >= 0, "must be at least 0")
    flags.register_validator("images", lambda names: all(n.count("/") == 1 and all(n.split("/")) for n in names),
                             "each value must be <set>/<name>, e.g. Set14/baboon")
    flags.register_validator("scan_tile", lambda v: v >= 1, "must be at least 1")
    # inf (or nan) let part 2 double the image side for ever
    flags.register_validator("budget_gib", lambda v: 0 < v < float("inf"), "must be a positive finite number")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
