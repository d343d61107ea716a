"""python -m rnan_jax.train --config experiments/x4.py --workdir DIR [--config.optim.lr=2e-4 ...]

Trains RNAN, resuming from the latest checkpoint in --workdir. Multi-host (TPU pods, several GPU hosts):
add --distributed (and, off TPU, --coordinator_address, --num_processes, --process_id).
"""
import os
import re
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from rnan_jax import cli

_CONFIG = cli.define_config_file("train", __name__)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and the config go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (off TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (off TPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (off TPU).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds --distributed waits for every "
                                            "process to join before it stops with one line.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config (every key --config.KEY= can set), "
                             "the parameter count and the devices, then exit without reading data or writing.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value.strip():  # an unset $WORKDIR: the run went into the current folder
        raise app.UsageError("--workdir is empty: name the run's folder (--workdir=. for the current one)")
    import jax

    from rnan_jax import api, configs, env, paths, preemption, trainer

    try:
        configs.check_keys(_CONFIG.value)
        configs.check_nones(_CONFIG.value)  # before the keys are read below: model.num_blocks = None was a traceback
    except ValueError as e:
        sys.exit(f"error: --config {config_flags.get_config_filename(flags.FLAGS['config'])}: {e}")
    configs.normalize_lists(_CONFIG.value)  # --config.data.hr_dirs=['/a','/b'] is "/a,/b", in config.json too
    configs.normalize_unset(_CONFIG.value)  # --config.init_from=None is unset, "", not a checkpoint ./None

    host_flags = [f"--{f.name}" for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID) if f.value is not None]
    if host_flags and not _DISTRIBUTED.value:  # they were silently ignored: N processes each trained alone
        raise app.UsageError(f"{' and '.join(host_flags)} without --distributed: add it (a multi-host run)")
    env.prepare_process()  # before JAX starts; the trainer prints its own lines, so library chatter stays out
    if _DISTRIBUTED.value:
        if jax.config.jax_platforms == "cpu" or (_NUM_PROCESSES.value and not jax.config.jax_platforms):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            env.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                       timeout_s=_DISTRIBUTED_TIMEOUT.value)
        except ValueError as e:
            sys.exit(f"error: {e}")
    if (problem := env.backend_problem()) is not None:  # JAX_PLATFORMS=cuda on a CPU-only machine: was a traceback
        sys.exit(f"error: {problem}")
    model = _CONFIG.value.model
    full_unroll = _CONFIG.value.execution.scan_unroll < 0
    big = model.num_groups * model.num_blocks > api.CPU_FULL_UNROLL_MAX_BLOCKS
    try:
        if _DRY_RUN.value:  # the workdir as the run resolves it: --workdir=~/run is $HOME/run, not ./~/run
            print(trainer.dry_run(_CONFIG.value, paths.resolve(_WORKDIR.value)))
            return
        safe = not (jax.default_backend() == "cpu" and full_unroll and big)
        if env.enable_compilation_cache(safe=safe) is None and not safe:
            print("note: the persistent compilation cache is off for this run (XLA:CPU cannot reload a fully "
                  "unrolled network of this depth)", flush=True)
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except preemption.Preempted as e:
        print(e, flush=True)
        # its checkpoint is saved: a Ctrl-C while the interpreter exits ends it at once, where it printed JAX's
        # traceback from its exit callbacks ("Exception ignored in atexit callback ... KeyboardInterrupt")
        status = 128 + e.signum  # 143 (SIGTERM) or 130 (Ctrl-C), as if the signal had ended the process
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(status))
        sys.exit(status)
    except (ValueError, trainer.TrainingError, OSError, jax.errors.JaxRuntimeError) as e:
        if jax.process_count() > 1:
            _exit_now(e)
        if isinstance(e, jax.errors.JaxRuntimeError):
            raise
        sys.exit(f"error: {e}")


_RUNTIME_STATUS = re.compile(r"(UNKNOWN|UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED|ABORTED|CANCELLED): ")


def _exit_now(error: BaseException) -> None:
    """A multi-process run's error in one line, then out at once: `sys.exit` ran jax.distributed.shutdown, which
    waits for every process; one that had died (the usual cause of a failed collective, which JAX raises as a
    JaxRuntimeError or a ValueError) was waited for until its heartbeat timed out, 90 s, and then the process
    aborted with a C++ stack trace (status 134) under the Python traceback."""
    import jax

    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, jax.errors.JaxRuntimeError) or _RUNTIME_STATUS.match(text):
        text += (" (a collective with the other processes failed: did one of them stop? The latest complete "
                 "checkpoint is kept; rerun every process to resume from it)")
    sys.stdout.flush()
    print(f"error: {text}", file=sys.stderr, flush=True)
    os._exit(1)


parse_flags = cli.config_flags_parser(_CONFIG)


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags)
