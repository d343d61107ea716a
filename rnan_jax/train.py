"""python -m rnan_jax.train --config experiments/x4.py --workdir DIR [--config.optim.lr=2e-4 ...]

Trains RNAN, resuming from the latest checkpoint in --workdir. Multi-host (TPU pods, several GPU hosts):
add --distributed (and, off TPU, --coordinator_address, --num_processes, --process_id).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and the config go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (off TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (off TPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (off TPU).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax

    from rnan_jax import env, trainer

    if _DISTRIBUTED.value:
        if jax.config.jax_platforms == "cpu" or (_NUM_PROCESSES.value and not jax.config.jax_platforms):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    env.enable_compilation_cache()
    logging.set_verbosity(logging.WARNING)  # the trainer prints its own lines; keep library chatter out
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except trainer.Preempted as e:
        print(e, flush=True)
        sys.exit(143)  # 128 + SIGTERM, as if the signal had ended the process
    except (ValueError, trainer.TrainingError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
