"""Process settings for the command-line entry points: the data folder, JAX's persistent compilation cache,
logging, and how host memory freed by XLA is kept for reuse."""
from __future__ import annotations

import ctypes
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data_dir() -> str:
    """`$RNAN_DATA_DIR`, else `../shared/data` beside the repository root (layout of that folder)."""
    return os.environ.get("RNAN_DATA_DIR") or os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data"))


def cache_folder(name: str, variable: str) -> str:
    """`$variable`, else ~/.cache/rnan_jax/<name>: where rnan_jax keeps what it makes once and reuses (the XLA
    compilation cache, decoded training images, the native kernel's build), one folder per kind."""
    return os.environ.get(variable) or os.path.expanduser(os.path.join("~/.cache/rnan_jax", name))


def enable_compilation_cache(cache_dir: str | None = None, *, safe: bool = True) -> str | None:
    """Turns on JAX's persistent compilation cache (default `$RNAN_JAX_CACHE` or ~/.cache/rnan_jax/xla).

    Called by the command-line entry points, never at import, so that importing rnan_jax changes no setting.
    `safe=False` (a CPU program that XLA:CPU cannot reload: the fully unrolled paper-size network, whose cached
    executable crashed the process that loaded it with jax 0.10.2) leaves it off and returns None.
    """
    import jax

    if not safe:
        return None

    folder = cache_dir or cache_folder("xla", "RNAN_JAX_CACHE")
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def prepare_process() -> None:
    """What every command-line entry point does first, before JAX starts its backend: `reuse_freed_memory()`
    and `quiet_logging()`."""
    reuse_freed_memory()
    quiet_logging()


def quiet_logging() -> None:
    """For the command-line entry points: library log lines (orbax's INFO, JAX's TPU-backend probe) are hidden
    unless the user passed --verbosity; warnings and errors still show."""
    from absl import flags, logging

    if not ("verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present):
        logging.set_verbosity(logging.WARNING)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOC_ENV = "RNAN_JAX_MALLOC"


def reuse_freed_memory() -> bool:
    """Makes glibc keep the memory that XLA frees, so the next step reuses it instead of faulting in new pages.

    Every execution of a compiled XLA:CPU program allocates its temporary buffer afresh (254 MiB for the small
    model's train step at batch 16). glibc serves an allocation that large with a fresh mmap (a thread's own
    arena cannot hold it) and unmaps it when freed, so each step faulted in about 66,000 new pages: 90 ms of
    kernel time per step, a third of the step on one core (tools/BENCHMARKS.md, "CPU train step against the
    PyTorch peer"). Here: one malloc arena, no mmap, no trimming, so a freed buffer is reused; the process keeps
    its peak heap until it exits, which is what a training or evaluation process wants.

    Takes effect only for threads that have not allocated yet, so the entry points call it before JAX starts
    its backend; later it changes nothing and returns False, as it does off glibc (macOS, musl) and with
    `RNAN_JAX_MALLOC=system` in the environment. Returns whether the settings were applied.
    """
    if os.environ.get(MALLOC_ENV, "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized():
                return False
        except (ImportError, AttributeError):
            pass
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # glibc only
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
