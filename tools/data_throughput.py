"""Patches per second of the training input pipeline with N grain worker processes, printed.

    python tools/data_throughput.py --source=folder --scale=4 --workers=0,1,2
    python tools/data_throughput.py --source=demo --scale=2 --batches=100

`--source=folder` defaults to ../shared/data/train/{T91,BSD200} (LR made with degrade.bicubic_lr, cached
under --cache_dir).
For each worker count it prints the start-up time (building the source, starting the workers, first batch)
and the steady rate over --batches batches after --warmup (median of --repeats runs). It also prints what
converting a batch to float32 on the host would cost, the alternative to shipping uint8 and converting on the device.
The timing is `rnan_jax.bench.data_throughput`; this file holds the flags and prints the lines.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from absl import flags
import numpy as np

from rnan_jax import cli, data
from rnan_jax.bench import data_throughput
from rnan_jax.env import default_data_dir

_SOURCE = flags.DEFINE_enum("source", "folder", data.SOURCES, "Training source.")
_HR_DIRS = flags.DEFINE_string("hr_dirs", "", "Comma-separated HR folders ('' = T91,BSD200 in the data folder).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data_dir for --source=tfds.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Cache of decoded images ('' = the default).")
_SCALE = flags.DEFINE_enum("scale", "4", ["2", "3", "4"], "Upscaling factor.")
_PATCH = flags.DEFINE_integer("patch_size", 48, "LR patch side.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Patches per batch.", lower_bound=1)
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to measure.")
cli.require_ints("workers", minimum=0)
_READ_THREADS = flags.DEFINE_integer("read_threads", 4, "grain ReadOptions.num_threads per process.", lower_bound=1)
_BATCHES = flags.DEFINE_integer("batches", 200, "Batches timed per worker count.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 10, "Batches read before timing.", lower_bound=0)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per worker count; the median rate is printed with the range.",
                                lower_bound=1)


def main(argv):
    del argv
    logging.getLogger("rnan_jax").setLevel(logging.ERROR)  # the per-file skip lines are not the point here
    hr_dirs = _HR_DIRS.value or ",".join(os.path.join(default_data_dir(), "train", d) for d in ("T91", "BSD200"))
    base = {"source": _SOURCE.value, "hr_dirs": hr_dirs if _SOURCE.value == "folder" else "",
            "tfds_data_dir": _TFDS_DATA_DIR.value, "cache_dir": _CACHE_DIR.value, "patch_size": _PATCH.value,
            "read_threads": _READ_THREADS.value, "val_source": "demo"}
    try:
        cfg = data.DataConfig.from_config(base, scale=int(_SCALE.value))
        start = time.perf_counter()
        pairs = data.training_pairs(cfg)  # fills the cache, so the timings below are of a warm start
    except ValueError as e:  # DataError and config errors name what is wrong
        sys.exit(f"error: {e}")
    print(f"source={cfg.source} x{cfg.scale} images={len(pairs)} patch={cfg.patch_size} "
          f"batch={_BATCH.value} read_threads={cfg.read_threads} cpus={os.cpu_count()} "
          f"(source ready in {time.perf_counter() - start:.1f} s)")
    for workers in (int(w) for w in _WORKERS.value):
        cfg = data.DataConfig.from_config({**base, "num_workers": workers}, scale=int(_SCALE.value))
        runs = [data_throughput(cfg, _BATCHES.value, _WARMUP.value, _BATCH.value) for _ in range(_REPEATS.value)]
        rates = sorted(rate for _, rate in runs)
        rate = float(np.median(rates))
        print(f"workers={workers}: first batch after {np.median([f for f, _ in runs]):.2f} s, {rate:.0f} patches/s "
              f"({rate / _BATCH.value:.1f} batches/s; runs {rates[0]:.0f}..{rates[-1]:.0f})")

    cfg = data.DataConfig.from_config(base, scale=int(_SCALE.value))
    batch = next(data.train_iterator(cfg, global_batch_size=_BATCH.value, seed=0, process_index=0, process_count=1))
    start = time.perf_counter()
    for _ in range(20):
        {k: v.astype(np.float32) / 255.0 for k, v in batch.items()}
    convert_ms = (time.perf_counter() - start) / 20 * 1e3
    nbytes = sum(v.nbytes for v in batch.values())
    print(f"one batch: {nbytes / 2**20:.2f} MiB as uint8, {4 * nbytes / 2**20:.2f} MiB as float32; "
          f"host uint8 -> float32 conversion {convert_ms:.2f} ms per batch")


if __name__ == "__main__":
    cli.run(main)
