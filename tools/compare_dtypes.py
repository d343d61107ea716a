"""Does bfloat16 cost quality? One experiment trained in float32 and in bfloat16, compared side by side.

    python tools/compare_dtypes.py --config=experiments/demo.py --workdir=/tmp/rnan_dtypes
    python tools/compare_dtypes.py --config=experiments/x2.py --config.total_steps=20000 --workdir=...

Trains the config once per --dtypes value (`model.dtype`: the compute dtype; parameters, loss and optimizer
stay float32) into WORKDIR/<dtype>, resuming what is there, then reads both runs' TensorBoard event files
and prints a markdown table: train loss and validation PSNR per logged step, and the wall-clock time
(`rnan_jax.scalars` reads the event files and makes the table).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rnan_jax import cli

_CONFIG = cli.define_config_file("compare_dtypes", __name__)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent folder of one workdir per dtype.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to compare.")
flags.register_validator("dtypes", lambda values: bool(values) and all(v in ("float32", "bfloat16", "float16")
                                                                       for v in values),
                         "each value must be float32, bfloat16 or float16")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value.strip():  # an unset $WORKDIR: the runs went into ./float32 and ./bfloat16, as train's did
        raise app.UsageError("--workdir is empty: name the runs' parent folder (--workdir=. for the current one)")
    from rnan_jax import configs, env, preemption, trainer
    from rnan_jax.scalars import comparison_table, read_scalars

    try:  # as train does: a key nothing reads stopped every run alike, then an empty table and exit status 0
        configs.check_keys(_CONFIG.value)
        configs.check_nones(_CONFIG.value)
    except ValueError as e:
        sys.exit(f"error: --config {config_flags.get_config_filename(flags.FLAGS['config'])}: {e}")
    configs.normalize_unset(_CONFIG.value)  # as train: --config.init_from=None is unset, in config.json too
    env.prepare_process()
    env.enable_compilation_cache()
    logging.set_verbosity(logging.WARNING)  # the trainer prints its own lines
    runs = {}
    for dtype in _DTYPES.value:
        config = _CONFIG.value.copy_and_resolve_references()
        config.model.dtype = dtype
        workdir = os.path.join(os.path.expanduser(_WORKDIR.value), dtype)  # ~ as train's (read back below)
        print(f"== {dtype}: {workdir}", flush=True)
        try:
            trainer.train_and_evaluate(config, workdir)
        except (ValueError, trainer.TrainingError) as e:
            print(f"{dtype} stopped: {e}", flush=True)
        except preemption.Preempted as e:  # SIGTERM or Ctrl-C, after its checkpoint: out, as train (was a traceback)
            print(f"{dtype} stopped: {e}", flush=True)
            sys.exit(128 + e.signum)
        runs[dtype] = read_scalars(os.path.join(workdir, "tensorboard"))
    print(comparison_table(runs))
    if not any(runs.values()):
        sys.exit("error: no run logged a value to compare (each one's reason is above)")


if __name__ == "__main__":
    cli.run(main, flags_parser=cli.config_flags_parser(_CONFIG))
