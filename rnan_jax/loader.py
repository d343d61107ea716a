"""Batches out of grain: read threads and worker processes behind one checkpointable iterator.

`BatchIterator` runs an infinite MapDataset of batches through `to_iter_dataset` (read threads) and, given
the `worker_options`, `mp_prefetch` (worker processes). Its state is a batch count, so a checkpoint restores
under any number of workers. The worker processes are born deaf to Ctrl-C (the trainer's first one means
"save a checkpoint and stop"), and a worker that dies (as the out-of-memory killer ends one) becomes one
line, a `sources.DataError`, instead of grain's RuntimeError.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
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
    _spawn_closes_the_childs_pipe_ends()
    return grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer_size)


# sha256 of `inspect.getsource(multiprocessing.popen_spawn_posix.Popen._launch)` as CPython 3.11, 3.12 and 3.13
# have it until gh-118981's fix (3.11.7, 3.12.1, 3.13.0 checked): the one version that is replaced.
_HANGING_LAUNCH = "3fd508aa79b8aba6267e28e79b08be8985f36a5a389a1da3c39ba4259f515510"


def _spawn_closes_the_childs_pipe_ends() -> None:
    """Makes a worker process that dies while it starts a worker that died, not a run that hangs forever.

    grain starts each worker ("spawn") from a thread, which writes the worker's work (its pickled share of the
    data set: megabytes for the demo images or a folder of thousands) into a pipe that the worker reads only
    once its imports are done, seconds later. CPython keeps the worker's end of that pipe open in this process
    until the write is done (gh-118981, fixed in later 3.13s), so a worker killed meanwhile (the out-of-memory
    killer, a kill, a script without `if __name__ == "__main__":` that its import re-runs) left the write, then
    the trainer's wait for a batch, blocked forever at "compiling the train step", deaf to SIGTERM and Ctrl-C,
    and closing the iterator joined that thread forever. Where `_launch` is exactly that version it is replaced
    by one that closes the worker's ends once it is started: the write then fails, and the worker is one that
    exited (grain reads its `exitcode`: `BatchIterator.__next__`'s `DataError`)."""
    from multiprocessing import popen_spawn_posix

    try:
        source = inspect.getsource(popen_spawn_posix.Popen._launch)
    except (OSError, TypeError):  # no source to check: leave it
        return
    if hashlib.sha256(source.encode()).hexdigest() == _HANGING_LAUNCH:
        popen_spawn_posix.Popen._launch = _launch


def _launch(self, process_obj) -> None:
    """CPython 3.11's `popen_spawn_posix.Popen._launch`, but the child's pipe ends closed in this process once
    it is started, and its work not written when it has died before reading it (its exitcode says how)."""
    from multiprocessing import popen_spawn_posix as m, resource_tracker

    tracker_fd = resource_tracker.getfd()
    self._fds.append(tracker_fd)
    prep_data = m.spawn.get_preparation_data(process_obj._name)
    fp = m.io.BytesIO()
    m.set_spawning_popen(self)
    try:
        m.reduction.dump(prep_data, fp)
        m.reduction.dump(process_obj, fp)
    finally:
        m.set_spawning_popen(None)
    parent_r = child_w = child_r = parent_w = None
    try:
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        cmd = m.spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
        self._fds.extend([child_r, child_w])
        self.pid = m.util.spawnv_passfds(m.spawn.get_executable(), cmd, self._fds)
        self.sentinel = parent_r
        os.close(child_r)
        os.close(child_w)
        child_r = child_w = None
        data, written = fp.getbuffer(), 0
        try:
            while written < len(data):
                written += os.write(parent_w, data[written:])
        except BrokenPipeError:  # the child has exited before reading it all
            pass
    finally:
        self.finalizer = m.util.Finalize(self, m.util.close_fds, [fd for fd in (parent_r, parent_w) if fd is not None])
        for fd in (child_r, child_w):
            if fd is not None:
                os.close(fd)


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


def _owned(batch: Any) -> Any:
    """The batch with its arrays copied out of the worker processes' shared memory into ordinary ones. Each grain
    hands over is a `SharedMemoryArray` that holds a file descriptor and a mapping until it is freed: a script
    that kept its batches failed with "Too many open files" after about 270 of them (at the common limit of
    1024), and each one still held when the interpreter exited printed a traceback ("Exception ignored in
    SharedMemoryArray.__del__"). The copy is of a batch of uint8 patches (under 2 MB at the paper's size)."""
    import jax

    return jax.tree_util.tree_map(lambda v: np.array(v) if isinstance(v, np.ndarray) else v, batch)


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
        if self._multiprocessing_options is not None:
            batch = _owned(batch)
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
