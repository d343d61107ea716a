"""Batches out of grain: read threads and worker processes behind one checkpointable iterator.

`BatchIterator` runs an infinite MapDataset of batches through `to_iter_dataset` (read threads) and, given
the `worker_options`, `mp_prefetch` (worker processes). Its state is a batch count, so a checkpoint restores
under any number of workers. The worker processes are born deaf to Ctrl-C (the trainer's first one means
"save a checkpoint and stop"), and a worker that dies (as the out-of-memory killer ends one) becomes one
line, a `sources.DataError`, instead of grain's RuntimeError.
"""
from __future__ import annotations

import contextlib
import re
import signal
import sys
from typing import Any

import grain
import numpy as np

from rnan_jax import sources

_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"  # the -W form: action:message-start:category


def worker_options(num_workers: int, buffer_size: int) -> grain.MultiprocessingOptions | None:
    """grain's options for `num_workers` worker processes keeping `buffer_size` batches ready each, with this
    process made ready to start them; None for 0 workers (batches made in this process)."""
    if num_workers <= 0:
        return None
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # grain's worker start-up reads its absl flags (google/grain#1355); outside an absl app nothing
        # parses them, so take their defaults.
        flags.FLAGS.mark_as_parsed()
    # The worker processes hand batches over in shared memory; those still queued when the iterator closes
    # are unlinked by multiprocessing's resource tracker, which then warns of "leaked shared_memory
    # objects" at every exit though nothing leaks. The tracker is started later with this process's
    # warning options, so this one warning is silenced there; our own processes are unaffected.
    if _TRACKER_WARNING not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_WARNING)
    # Started now, not by the first worker's start: starting it unblocks SIGINT in the thread that does, which
    # then started the other workers able to die of a Ctrl-C (`_ctrl_c_blocked_for_new_workers`).
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    return grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size)


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
    """In each worker process: a terminal's Ctrl-C reaches the whole process group, and the trainer's first one
    means "save a checkpoint and stop", which needs no worker to die with a traceback; closing the iterator
    (the trainer does on any exit) ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _ctrl_c_blocked_for_new_workers():
    """Blocks SIGINT in this thread while the worker processes are started, from threads this one creates (a
    new thread and a new process inherit the signal mask), so that they are born deaf to Ctrl-C: `_ignore_ctrl_c`
    runs only after a worker's imports, and a Ctrl-C during those seconds ended each worker with a
    KeyboardInterrupt traceback, then could hang the trainer. The process still gets the signal: another of its
    threads takes it, or it waits until this thread unblocks it."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _dead_worker_code(error: RuntimeError) -> int | None:
    """The exit code in grain's "Worker process was terminated unexpectedly with exit code N", else None."""
    match = re.match(r"Worker process was terminated unexpectedly with exit code (-?\d+)", str(error))
    return int(match.group(1)) if match else None


def _exit_reason(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}" + (", as the kernel's out-of-memory killer does" if -code == signal.SIGKILL else "")


class BatchIterator(grain.DatasetIterator):
    """Iterates an infinite MapDataset of batches through grain (read threads, optional worker processes).

    Its state is the number of batches taken, {"next_batch": n}, so a checkpoint restores under any
    num_workers or read_threads (grain's own multiprocess state does not); restoring restarts the
    pipeline at batch n, and batch n does not depend on how many workers made it. `images`: what the batches
    are cut from, for the caller (`data.train_iterator` gives a `data.ImageList`); unused here.
    """

    def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions,
                 multiprocessing_options: grain.MultiprocessingOptions | None = None, *, images: Any = None):
        super().__init__()
        self.images = images
        self._batches = batches
        self._read_options = read_options
        self._multiprocessing_options = multiprocessing_options
        self._next_batch = 0
        self._it: grain.DatasetIterator | None = None
        self._workers_starting = False

    def _pipeline(self) -> grain.DatasetIterator:
        self._assert_not_closed()
        if self._it is None:
            ds = self._batches[self._next_batch:].to_iter_dataset(self._read_options)
            if self._multiprocessing_options is not None:
                ds = ds.mp_prefetch(self._multiprocessing_options, worker_init_fn=_ignore_ctrl_c)
            self._it = iter(ds)
            self._workers_starting = self._multiprocessing_options is not None
        return self._it

    def _starting(self):
        """Around making the pipeline and asking for its first batch: its worker processes start then, from
        threads made then."""
        new_workers = self._multiprocessing_options is not None and (self._it is None or self._workers_starting)
        return _ctrl_c_blocked_for_new_workers() if new_workers else contextlib.nullcontext()

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch; raises `sources.DataError` (one line) when a worker process has died."""
        try:
            with self._starting():
                batch = next(self._pipeline())
            self._workers_starting = False
        except RuntimeError as e:
            if (code := _dead_worker_code(e)) is None:
                raise
            raise sources.DataError(
                f"a data worker process died at batch {self._next_batch} ({_exit_reason(code)}); rerun to resume "
                "from the last checkpoint, with a lower data.num_workers or data.worker_buffer_size if memory ran "
                "out") from None
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_batch": self._next_batch}

    def set_state(self, state: dict[str, Any]) -> None:
        self._stop()
        self._next_batch = int(state["next_batch"])

    def start_prefetch(self) -> None:
        with self._starting():
            self._pipeline().start_prefetch()

    def close(self) -> None:
        """Stops the worker processes and threads (also on garbage collection); idempotent."""
        self._stop()
        super().close()

    def _stop(self) -> None:
        if getattr(self, "_it", None) is not None:
            self._it.close()
            self._it = None
