"""Process settings for the command-line entry points: the data folder, JAX's persistent compilation cache,
logging, how host memory freed by XLA is kept for reuse, and joining the other processes of a multi-host run."""
from __future__ import annotations

import ctypes
import os
import sys
import threading

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data_dir(given: str | None = None) -> str:
    """`given` (a --data_dir flag's value) if set, else `$RNAN_DATA_DIR`, else `../shared/data` beside the repository
    root (layout of that folder); `~` expanded (no shell expands the one in "--data_dir=~/data")."""
    return os.path.expanduser(given or os.environ.get("RNAN_DATA_DIR")
                              or os.path.normpath(os.path.join(_REPO_ROOT, "..", "shared", "data")))


def cache_folder(name: str, variable: str) -> str:
    """`$variable`, else ~/.cache/rnan_jax/<name> ($XDG_CACHE_HOME/rnan_jax/<name> where that is set): where
    rnan_jax keeps what it makes once and reuses (the XLA compilation cache, decoded training images, the native
    kernel's build), one folder per kind. A `~` in the variable is expanded (a quoted "~/cache" made a folder named
    "~" in the current one). A process without a home folder (HOME unset or empty and a user id that
    /etc/passwd does not know: a container run with --user) keeps them in a folder of its user's under the
    temporary folder: ~/.cache stayed unexpanded, and each run made ./~/.cache/rnan_jax in the current folder."""
    if os.environ.get(variable):
        return os.path.expanduser(os.environ[variable])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is ignored
        return os.path.join(xdg, "rnan_jax", name)
    home = os.environ.get("HOME") or _passwd_home()
    return os.path.join(os.path.join(home, ".cache") if home else _private_temp_folder(), "rnan_jax", name)


def _passwd_home() -> str | None:
    """The user's home folder as /etc/passwd gives it (what `~` means with HOME unset), else None."""
    try:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError, AttributeError):  # off POSIX, or a user id without an entry
        home = os.path.expanduser("~")
    return home if os.path.isabs(home) else None


_PRIVATE: list[str] = []


def _private_temp_folder() -> str:
    """<temp>/rnan_jax-<uid>, created mode 0700 and checked to be this user's alone (what is loaded from it, the
    native kernels' library, must be no one else's); a fresh mkdtemp folder where that name is taken."""
    if not _PRIVATE:
        import stat
        import tempfile

        folder = os.path.join(tempfile.gettempdir(), f"rnan_jax-{os.getuid()}")
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            st = os.lstat(folder)
            if not (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077):
                folder = tempfile.mkdtemp(prefix="rnan_jax-")
        except OSError:
            folder = tempfile.mkdtemp(prefix="rnan_jax-")
        _PRIVATE.append(folder)
    return _PRIVATE[0]


def enable_compilation_cache(cache_dir: str | None = None, *, safe: bool = True) -> str | None:
    """Turns on JAX's persistent compilation cache (default `$RNAN_JAX_CACHE` or ~/.cache/rnan_jax/xla).

    Called by the command-line entry points, never at import, so that importing rnan_jax changes no setting.
    `safe=False` (a CPU program that XLA:CPU cannot reload: the fully unrolled paper-size network, whose cached
    executable crashed the process that loaded it with jax 0.10.2) leaves it off and returns None, as does a
    local folder that cannot be written (with a note on stderr).
    """
    import jax

    if not safe:
        return None

    folder = cache_dir or cache_folder("xla", "RNAN_JAX_CACHE")
    if "://" not in folder:  # a gs:// cache (shared by a pod's hosts) is JAX's to create; os.makedirs made "gs:/"
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:  # the cache only saves compile time: the run goes on without it, said once
            print(f"note: the persistent compilation cache is off: cannot write in {folder} ({e.strerror or e}); "
                  "point RNAN_JAX_CACHE at a writable folder", file=sys.stderr, flush=True)
            return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if "://" not in folder:
        _write_whole_cache_entries()
    return folder


def _write_whole_cache_entries() -> bool:
    """Makes JAX's compilation cache (a local folder, no size limit) write each entry through a partial file
    renamed into place, and write again an entry found cut short; returns whether it could (JAX's internals).

    JAX (0.10.2) writes an entry straight to its name and never replaces one that is there: a write cut short (a
    full disk or quota, a run killed or preempted while it wrote) left a truncated entry that every later run,
    of every host sharing the folder, failed to read ("Error reading persistent compilation cache entry ...
    incomplete or truncated stream") and compiled again, for good; a run starting meanwhile read it half
    written. An entry that is whole is left as it is, as JAX leaves it (another process wrote it meanwhile)."""
    try:
        from jax._src import compilation_cache, lru_cache

        put, suffix = lru_cache.LRUCache.put, lru_cache._CACHE_SUFFIX
    except (ImportError, AttributeError):
        return False
    if getattr(put, "_rnan_whole", False):
        return True
    from rnan_jax import paths

    def whole_put(self, key: str, value: bytes) -> None:
        if getattr(self, "eviction_enabled", True) or not key or "://" in str(self.path):
            return put(self, key, value)  # a size limit (JAX's lock and eviction) or a remote cache: JAX's own
        path = os.path.join(str(self.path), f"{key}{suffix}")
        try:
            with open(path, "rb") as f:
                there = f.read()
        except FileNotFoundError:
            there = None
        except OSError:  # there, but not readable here (another user's): kept, as JAX keeps it
            return None
        if there is not None:
            try:
                compilation_cache.decompress_executable(there)
                return None
            except Exception:  # cut short (zlib's, zstd's errors): written again
                pass
        paths.write_atomically(path, lambda f: f.write(value))
        return None

    whole_put._rnan_whole = True  # type: ignore[attr-defined]
    lru_cache.LRUCache.put = whole_put
    return True


def prepare_process() -> None:
    """What every command-line entry point does first, before JAX starts its backend: `reuse_freed_memory()`,
    `quiet_logging()`, `float32_types()` and `jit_note()`."""
    reuse_freed_memory()
    quiet_logging()
    float32_types()
    jit_note()


def jit_note() -> bool:
    """A note on stderr where JAX_DISABLE_JIT=1 (left in a shell from debugging) turned JAX's compilation off, and
    whether it did: every operation then runs on its own, the tiny test model trained at 0.4 steps/s where it trains
    at 250, and the trainer still said "compiling the train step", without a word of why. Left on: it is a debugging
    switch, set for a reason."""
    import jax

    if not jax.config.jax_disable_jit:
        return False
    print("note: JAX_DISABLE_JIT is set: JAX compiles nothing and runs each operation on its own, many times "
          "slower (unset it unless you are debugging)", file=sys.stderr, flush=True)
    return True


def float32_types() -> bool:
    """Turns JAX's 64-bit types off (with a note on stderr) where JAX_ENABLE_X64=1 turned them on, and returns
    whether it did. rnan_jax computes in float32, and with them on the demo trained to other numbers (0.09 dB
    below the float32 run's PSNR after 200 steps) without a word, its compilations cached apart."""
    import jax

    if not jax.config.jax_enable_x64:
        return False
    jax.config.update("jax_enable_x64", False)
    print("note: JAX_ENABLE_X64 is ignored: rnan_jax computes in float32 (with 64-bit types its numbers differ "
          "from the float32 ones it documents)", file=sys.stderr, flush=True)
    return True


def backend_problem() -> str | None:
    """None when JAX's backend starts (it starts it), else one line saying why not and what to do: a JAX_PLATFORMS
    naming a platform this machine lacks (cuda, tpu on a CPU-only machine) was a 20-line traceback, for cuda one
    ending in a bare AssertionError. Call after `initialize_distributed`, which must come before the backend."""
    import jax

    platforms = jax.config.jax_platforms or ""
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        text = " ".join(str(e).split())
        if not text and "cuda" in platforms.split(","):  # JAX skips cuda without a visible NVIDIA GPU, then asserts
            text = "no NVIDIA GPU is visible (or JAX's CUDA plugin is not installed)"
        where = f"JAX_PLATFORMS={platforms}" if platforms else "JAX"
        return (f"{where}: {text or type(e).__name__}" + ("" if "JAX_PLATFORMS=" in text or not platforms else
                                                         " (set JAX_PLATFORMS=cpu, or unset it, to use what is here)"))
    return None


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


DISTRIBUTED_TIMEOUT_S = 300  # jax.distributed.initialize's own default wait for every process to join


def distributed_flags_problem(coordinator_address: str | None, num_processes: int | None,
                              process_id: int | None) -> str | None:
    """One line when --coordinator_address/--num_processes/--process_id cannot describe a run (checked before
    JAX is asked, whose errors were tracebacks), else None. All three unset leaves it to JAX to detect the
    cluster (a TPU pod slice, SLURM, Open MPI)."""
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [name for name, v in given.items() if v is None]
    if missing:
        return (f"{', '.join(missing)} missing: off a TPU pod slice, --distributed takes --coordinator_address="
                "HOST:PORT (process 0's), --num_processes=N and --process_id=I, the same on every process but I")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"--coordinator_address {coordinator_address!r} is not HOST:PORT (process 0's host, a free port)"
    if num_processes < 1:
        return f"--num_processes {num_processes}: at least 1"
    if not 0 <= process_id < num_processes:
        return (f"--process_id {process_id} is not one of the {num_processes} processes' indices "
                f"(0 to {num_processes - 1})")
    return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, timeout_s: int = DISTRIBUTED_TIMEOUT_S) -> None:
    """`jax.distributed.initialize`, with every failure one line: a flag combination that cannot work, or no
    cluster detected, raises ValueError; processes that do not all join within `timeout_s` (a coordinator that
    never answers, a process never started) end this process with one line on stderr and exit status 1, where
    JAX aborted it (SIGABRT) with a C++ stack trace, after 300 s."""
    import jax

    if (problem := distributed_flags_problem(coordinator_address, num_processes, process_id)) is not None:
        raise ValueError(problem)
    if timeout_s < 1:
        raise ValueError(f"--distributed_timeout {timeout_s}: at least 1 second")
    where = f"the coordinator {coordinator_address}" if coordinator_address else "the coordinator"

    def give_up() -> None:  # a thread: JAX's wait holds the main thread in C++ (it releases the GIL)
        os.write(2, f"error: --distributed: not every process joined {where} within {timeout_s} s (is process 0 "
                    "running there and reachable, and was every process started with the same --num_processes? "
                    "--distributed_timeout sets the wait)\n".encode())
        os._exit(1)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:  # JAX's own deadline later than the watchdog's: it aborts the process where the watchdog exits
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s + 60)
    except (ValueError, TypeError, RuntimeError) as e:  # no cluster detected, a port in use, and the like
        hint = ("off a TPU pod slice or a detected cluster, pass --coordinator_address=HOST:PORT "
                "--num_processes=N --process_id=I" if coordinator_address is None else
                f"process 0 serves {coordinator_address}: is that port free on its host?")
        raise ValueError(f"--distributed: {' '.join(str(e).split())} ({hint})") from None
    finally:
        watchdog.cancel()
