"""Where things live on this machine: the data folder and JAX's persistent compilation cache."""
from __future__ import annotations

import os

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data_dir() -> str:
    """`$RNAN_DATA_DIR`, else `../shared/data` beside the repository root (layout of that folder)."""
    return os.environ.get("RNAN_DATA_DIR") or os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data"))


def enable_compilation_cache(cache_dir: str | None = None, *, safe: bool = True) -> str | None:
    """Turns on JAX's persistent compilation cache (default `$RNAN_JAX_CACHE` or ~/.cache/rnan_jax/xla).

    Called by the command-line entry points, never at import, so that importing rnan_jax changes no setting.
    `safe=False` (a CPU program that XLA:CPU cannot reload: the fully unrolled paper-size network, whose cached
    executable crashed the process that loaded it with jax 0.10.2) leaves it off and returns None.
    """
    import jax

    if not safe:
        return None

    cache_dir = cache_dir or os.environ.get("RNAN_JAX_CACHE") or os.path.expanduser("~/.cache/rnan_jax/xla")
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


def quiet_logging() -> None:
    """For the command-line entry points: library log lines (orbax's INFO, JAX's TPU-backend probe) are hidden
    unless the user passed --verbosity; warnings and errors still show."""
    from absl import flags, logging

    if not ("verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present):
        logging.set_verbosity(logging.WARNING)
