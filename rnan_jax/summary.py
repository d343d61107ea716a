"""What a training run shows: TensorBoard event files (tensorboardX, no TensorFlow), log lines, tables."""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from rnan_jax import paths


METRICS_FILE = "metrics.jsonl"


_EVENT_THREAD_ERRORS: dict[threading.Thread, OSError] = {}  # tensorboardX writer threads that died, and why


def _keep_event_thread_errors() -> None:
    """tensorboardX writes event files from a thread of its own. An OSError there (a full disk) printed a
    traceback and ended the thread, whose queue then filled until an add_scalar waited forever: the error is
    kept here instead, for `Writer` to raise in the caller's thread before its next write."""
    from tensorboardX import event_file_writer

    previous = threading.excepthook
    if getattr(previous, "rnan_jax", False):
        return

    def hook(args):
        if isinstance(args.thread, event_file_writer._EventLoggerThread) and issubclass(args.exc_type, OSError):
            _EVENT_THREAD_ERRORS[args.thread] = args.exc_value
        else:
            previous(args)

    hook.rnan_jax = True
    threading.excepthook = hook


def _event_writers(writer: Any) -> list[Any]:
    return [w.event_writer for w in (writer.all_writers or {}).values()]


def _local_copy_prefix(kind: str) -> str:
    """The name a URL run's local copy (`kind` tensorboard or train) begins with in the temp folder: whose it is
    (host and process), so that a later run can remove the copies of runs that are gone (`_remove_dead_copies`)."""
    return f"rnan_{kind}.{socket.gethostname()}.{os.getpid()}."


def _hold(path: str) -> int:
    """A descriptor of `path` (a file or folder) with a shared flock on it, held while the run keeps the copy: a
    run that is gone holds none, also one in another process namespace that shares the temp folder."""
    fd = os.open(path, os.O_RDONLY)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return fd


def _remove_dead_copies() -> None:
    """Removes the local copies that runs on this host left in the temp folder when killed outright (SIGKILL, the
    OOM killer): their process is gone and nothing holds their lock."""
    folder, host = tempfile.gettempdir(), re.escape(socket.gethostname())
    for name in os.listdir(folder):
        match = re.match(rf"rnan_(?:tensorboard|train)\.{host}\.(\d+)\.", name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # alive (or its pid taken by another process since): kept
        except ProcessLookupError:
            pass
        except OSError:  # another user's process
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # held: a run in another process namespace
        except OSError:
            pass
        finally:
            os.close(fd)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _replay(logdir: str, resumed_from: int) -> tuple[int, list[tuple[float, int, Any]]]:
    """(purge step, [(wall time, step, Summary.Value)] to write again after its START) for a run that resumes from
    step `resumed_from` in `logdir` (`Writer`): the values that the earlier event files hold, as TensorBoard keeps
    them (each START drops the values before it from its step on), from the last step up to `resumed_from` of each
    tag that has values after it, in the order written (one per tag and step: the last). The files are read twice,
    the values themselves held only the second time and only from the purge step (a long run's image strips are
    not all held). Files that cannot be read leave the START at `resumed_from` + 1, with a warning: the run is not
    stopped for its curves."""
    from tensorboardX.proto import event_pb2

    from rnan_jax import scalars

    def kept_values(keep: Any) -> list[tuple[float, int, Any]]:
        # as TensorBoard keeps them: each START drops the values from its step on; a later value at the same
        # (tag, step) replaces the earlier (an earlier version's resumed run wrote no START); the value itself only
        # where keep(step), so that a long run's image strips are not all held
        kept: dict[tuple[str, int], tuple[float, int, Any]] = {}
        for path in scalars.event_files(logdir):
            for event in scalars.events(path):
                if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                    kept = {k: v for k, v in kept.items() if k[1] < event.step}
                for value in event.summary.value:
                    kept.pop((value.tag, event.step), None)
                    held = value if keep(event.step) else value.tag
                    kept[value.tag, event.step] = (event.wall_time, event.step, held)
        return list(kept.values())

    try:
        kept = kept_values(lambda step: False)
        last: dict[str, int] = {}  # per tag, its last step up to resumed_from
        for _, step, tag in kept:
            if step <= resumed_from:
                last[tag] = max(step, last.get(tag, step))
        stale = {tag for _, step, tag in kept if step > resumed_from}
        purge = min([last[tag] for tag in stale if tag in last], default=resumed_from + 1)
        kept = kept_values(lambda step: purge <= step <= resumed_from) if purge <= resumed_from else []
    except Exception as e:  # a damaged file of the runs before (protobuf, gcsfs errors): curves, not the run
        logging.getLogger(__name__).warning(
            "%s: the earlier event files could not be read (%s: %s); TensorBoard's default loader may show their "
            "values after step %d until this run logs those tags again", logdir, type(e).__name__, e, resumed_from)
        return resumed_from + 1, []
    return purge, [k for k in kept if purge <= k[1] <= resumed_from]


class Writer:
    """TensorBoard scalars and images under `logdir`, written by process 0 only; the scalars also as JSON
    lines in `logdir/metrics.jsonl` ({"step": s, "train/loss": ...}), readable without TensorBoard.

    A URL `logdir` (gs://bucket/run/tensorboard; objects there cannot be appended to) is written in a local
    folder whose changed files are copied there, whole, at most every `mirror_every_s` seconds, after each write
    of images and at `close`. There each write of images also ends its event file and the next write begins
    another (TensorBoard reads a run's files in order): one event file of every image strip of a 1M-step run
    grew to hundreds of MB, copied again after every logged step, and stalled the step loop while it went.

    A run that resumes from step `resumed_from` (the trainer gives its first step) logs the steps after it again:
    what the runs before it logged past that step (up to the crash or kill, beyond the last checkpoint) is of a
    trajectory that no longer exists. The first event file begins with tensorboardX's `purge_step` (a SessionLog
    START at `resumed_from` + 1: TensorBoard's Python loader, `--load_fast=false`, hides the earlier files' values
    from that step on, as `scalars.read_scalars` does). TensorBoard's default loader (RustBoard) reads no START: a
    value at step s hides only its own tag's values from s on, so the old trajectory's points past `resumed_from`
    stayed on until the run logged that tag again (its validation PSNR and images until the next validation; for
    good if it stopped first, a NaN or a second crash). So where the earlier files hold values past `resumed_from`,
    the START is at the last step up to `resumed_from` of such a tag, and the values from there up to `resumed_from`
    are written again after it, as they were (step, wall time): both loaders then show what the runs before left up
    to `resumed_from`, and nothing after it, except a tag with no value up to `resumed_from` (a first validation
    after the last checkpoint): RustBoard shows its later points until the run logs that tag again, as any value
    written to hide them would itself be shown. metrics.jsonl, when runs before wrote it, gets the line
    {"step": resumed_from, "resumed": true} (readers drop the earlier lines with a step after it, as
    `figures.read_validation` does). A last line cut short (a killed run) is ended first, so that the next record is
    a line of its own."""

    def __init__(self, logdir: str, mirror_every_s: float = 60.0, *, resumed_from: int | None = None):
        self._writer = None
        self._jsonl = None
        self._remote = logdir if paths.is_url(logdir) else None
        self._copied: dict[str, int] = {}
        self._mirror_every_s, self._mirrored_at, self._event_files = mirror_every_s, -math.inf, 0
        self._purge_step = None if resumed_from is None else resumed_from + 1
        self._replay: list[tuple[float, int, Any]] = []  # values written again after the START (see above)
        if jax.process_index() == 0:
            if resumed_from is not None:
                self._purge_step, self._replay = _replay(logdir, resumed_from)
            self._local = tempfile.mkdtemp(prefix=_local_copy_prefix("tensorboard")) if self._remote else logdir
            self._held = _hold(self._local) if self._remote else None

            _keep_event_thread_errors()
            self._writer = self._new_event_file()
            self._jsonl = os.path.join(self._local, METRICS_FILE)
            if self._remote and paths.exists(remote := os.path.join(self._remote, METRICS_FILE)):
                with open(self._jsonl, "w") as f:  # a resumed run continues the lines of the runs before it
                    f.write(paths.read_text(remote))
            if os.path.isfile(self._jsonl) and os.path.getsize(self._jsonl):
                with open(self._jsonl, "rb+") as f:
                    f.seek(-1, os.SEEK_END)
                    cut = f.read(1) != b"\n"  # a line cut short by a killed run: the next record starts a line
                    marker = {"step": resumed_from, "resumed": True}
                    f.write((b"\n" if cut else b"") + (b"" if resumed_from is None else
                                                        json.dumps(marker).encode() + b"\n"))

    def _new_event_file(self) -> Any:
        from tensorboardX import SummaryWriter

        # inf is a value here (PSNR of an image reproduced exactly, bicubic's of a flat one), written as such:
        # tensorboardX warned "NaN or Inf found in input tensor" at every validation
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        self._event_files += 1  # tensorboardX names a file by the second it began: the number keeps them apart
        purge = self._purge_step if self._event_files == 1 else None  # a later one's would hide this run's own
        writer = SummaryWriter(self._local, flush_secs=30, filename_suffix=f".{self._event_files:04d}",
                               purge_step=purge)
        if purge is not None:
            from tensorboardX.proto import summary_pb2

            for wall_time, step, value in self._replay:
                writer.file_writer.add_summary(summary_pb2.Summary(value=[value]), step, wall_time)
            self._replay = []
        return writer

    def _events(self) -> Any:
        """The SummaryWriter; raises the OSError that ended one of its writer threads, if one did."""
        for events in _event_writers(self._writer):
            if (error := _EVENT_THREAD_ERRORS.get(getattr(events, "_worker", None))) is not None:
                raise OSError(error.errno, f"{error.strerror}, writing TensorBoard events")
        return self._writer

    def _written(self) -> None:
        """Waits until the writer thread has written what was added, and flushes the event file: tensorboardX
        flushes it every `flush_secs` (30) alone, and its `flush` leaves what the thread has not yet taken. A run
        killed outright (SIGKILL, a lost VM) lost the values of its last 30 s from TensorBoard, also those logged
        before the checkpoint that the rerun resumed from, which the rerun does not log again (a gap in the curve;
        metrics.jsonl, appended line by line, had them). A thread that failed is left as it is: its error is
        raised before the next write (`_events`)."""
        for events in _event_writers(self._writer):
            try:  # all that is needed, before the thread is stopped: a tensorboardX whose internals differ is left
                # to write on its own schedule, never without a thread (its queue would fill and block the run)
                worker, stop = events._worker, events._worker._shutdown_signal
                if events._closed:
                    continue
                successor = type(worker)(events._event_queue, events._ev_writer, events._flush_secs)
            except (AttributeError, TypeError):
                continue
            while worker.is_alive():  # a stop after the queued events; a thread that died takes none (a full queue)
                try:
                    events._event_queue.put(stop, timeout=1)
                    break
                except queue.Full:
                    pass
            worker.join()
            if worker in _EVENT_THREAD_ERRORS:
                continue
            events._worker = successor
            successor.start()
            events._ev_writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer:
            for k, v in values.items():
                self._events().add_scalar(k, float(v), step)
            self._written()
            with open(self._jsonl, "a") as f:
                f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
            self._mirror()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 [H, W, 3] images."""
        if self._writer:
            for k, v in images.items():
                self._events().add_image(k, np.asarray(v), step, dataformats="HWC")
            self._written()
            if self._remote:  # the images' file is copied once, complete, and never again
                self._events().close()
                self._mirror(flush=False, now=True)
                self._writer = self._new_event_file()

    def _mirror(self, flush: bool = True, now: bool = False) -> None:
        """Copies the local files that changed since the last copy to the URL logdir: `now`, or if the last copy
        is `mirror_every_s` old."""
        if not self._remote or not (now or time.monotonic() - self._mirrored_at >= self._mirror_every_s):
            return
        self._mirrored_at = time.monotonic()
        if flush:
            self._writer.flush()
        for name in os.listdir(self._local):
            size = os.path.getsize(os.path.join(self._local, name))
            if self._copied.get(name) != size:
                with open(os.path.join(self._local, name), "rb") as f:
                    epath.Path(self._remote, name).write_bytes(f.read())
                self._copied[name] = size

    def close(self) -> None:
        """Flushes and closes the event files; idempotent. On an OSError (a full disk) they are given up, with no
        second try at exit, and the error raised."""
        if not self._writer:
            return
        try:
            self._events().close()
        except OSError:
            for events in _event_writers(self._writer):
                worker = getattr(events, "_worker", None)
                if worker is not None and worker.is_alive():  # a dead one's full queue would take no stop signal
                    with contextlib.suppress(Exception):
                        worker.stop()
                events._closed = True  # what tensorboardX's own close at exit checks
            raise
        finally:
            self._writer = None
        self._mirror(flush=False, now=True)
        if self._remote:
            shutil.rmtree(self._local, ignore_errors=True)
            os.close(self._held)


RUN_LOG = "train.log"


class RunLog:
    """`<workdir>/train.log`, as EDSR's log.txt: the trainer's lines and the package's warnings (skipped
    images, remade cache entries; the `rnan_jax` loggers), each line stamped with the UTC time, appended by
    every run in the workdir (a resumed run continues it), written by process 0 only. A URL's log (objects
    there cannot be appended to) is kept in a local file and copied there whole: with a line when the last copy
    is `mirror_every_s` old, at `flush` and at `close` (an exception, SIGTERM's or Ctrl-C's stop included). It
    was copied after every line, its whole size each time (quadratic in the lines; a burst of lines outran
    GCS's one write a second of an object): a run killed outright (SIGKILL, a lost VM) now loses the lines of
    at most its last `mirror_every_s`. A context manager: the warnings are taken while it is open."""

    def __init__(self, path: str, mirror_every_s: float = 60.0):
        self._path, self._file, self._handler = path, None, None
        self._mirror_every_s, self._mirrored_at, self._pending = mirror_every_s, -math.inf, False
        if jax.process_index() != 0:
            return
        self._remote = path if paths.is_url(path) else None
        if self._remote:
            _remove_dead_copies()
            fd, self._local = tempfile.mkstemp(prefix=_local_copy_prefix("train"), suffix=".log")
            os.close(fd)
            if paths.exists(path):  # a resumed run continues the log (bytes not UTF-8 as they are: a local log's
                # copied there; read as text, a UnicodeDecodeError stopped the resumed run at its start)
                with open(self._local, "wb") as f:
                    f.write(epath.Path(path).read_bytes())
        else:
            self._local = path
        # UTF-8 whatever the locale: under LANG=C without Python's UTF-8 mode (PYTHONUTF8=0) a workdir named
        # "données" stopped the run at its first line ("'ascii' codec can't encode characters")
        self._file = open(self._local, "a", encoding="utf-8", errors="surrogateescape")
        if self._remote:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        self._handler = _RunLogHandler(self)
        logging.getLogger("rnan_jax").addHandler(self._handler)

    def write(self, message: str) -> None:
        if self._file is None:
            return
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        try:
            self._file.write("".join(f"{stamp}  {line}\n" for line in str(message).splitlines() or [""]))
            self._file.flush()
        except OSError:  # a full disk: raised once; the log writes nothing after it (its close would fail too)
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            raise
        if self._remote:
            self._pending = True
            if time.monotonic() - self._mirrored_at >= self._mirror_every_s:
                self.flush()

    def flush(self) -> None:
        """Copies a URL's log there now if lines were written since the last copy."""
        if self._file is None or not self._remote or not self._pending:
            return
        self._mirrored_at, self._pending = time.monotonic(), False
        # a byte that is not UTF-8 (a Latin-1 file name in a warning or the command) as an escape, \xe9: written
        # as is, its surrogate stopped the run at the copy ("surrogates not allowed")
        with open(self._local, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read().encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        paths.write_text(self._remote, text)

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger("rnan_jax").removeHandler(self._handler)
            self._handler = None
        if self._file is not None:
            try:
                self.flush()
            finally:
                self._file.close()
                self._file = None
                if self._remote:
                    os.remove(self._local)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _RunLogHandler(logging.Handler):
    """The package's warnings into a `RunLog`, as `warning: <message>`."""

    def __init__(self, run_log: RunLog):
        super().__init__(level=logging.WARNING)
        self._run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._run_log.write(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a log that cannot be written must not stop the run
            self.handleError(record)


def eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def log_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    """One readable line: step, loss, learning rate, gradient norm, speed, ETA (speed and ETA said to come at the
    next log when `metrics` has none: a run's first step, whose time is the compile's)."""
    parts = [f"step {step}/{total}", f"loss {metrics['loss']:.5f}", f"lr {metrics['lr']:.3g}",
             f"grad_norm {metrics['grad_norm']:.4g}"]
    if "steps_per_s" in metrics:
        parts += [f"{metrics['steps_per_s']:.2f} steps/s", f"{metrics['patches_per_s']:.1f} patches/s",
                  f"ETA {eta(metrics['eta_s'])}"]
    else:
        parts.append("steps/s and ETA at the next log (this step compiled)")
    if metrics.get("skipped"):
        parts.append(f"skipped {int(metrics['skipped'])}")
    return "  ".join(parts)


def parameter_table(params: Any) -> str:
    """Parameter count per top-level module and in total."""
    rows = [(name, sum(x.size for x in jax.tree_util.tree_leaves(sub))) for name, sub in params.items()]
    total = sum(n for _, n in rows)
    width = max(len(n) for n, _ in rows)
    lines = [f"{'module':<{width}}  {'parameters':>12}"]
    lines += [f"{n:<{width}}  {c:>12,}" for n, c in sorted(rows, key=lambda r: r[0])]
    lines.append(f"{'total':<{width}}  {total:>12,}")
    return "\n".join(lines)


def comparison_strip(lr_up: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, hr: np.ndarray,
                     max_side: int = 256) -> np.ndarray:
    """uint8 [h, 4w, 3]: nearest-upscaled LR | bicubic | SR | HR, a centre crop of at most max_side."""
    h, w = hr.shape[:2]
    ch, cw = min(h, max_side), min(w, max_side)
    top, left = (h - ch) // 2, (w - cw) // 2
    crops = [np.asarray(x)[top:top + ch, left:left + cw] for x in (lr_up, bicubic, sr, hr)]
    return np.concatenate(crops, axis=1)


def git_revision(path: str) -> str:
    """The git revision of the code at `path` (with '-dirty' for local changes), or 'unknown', also when `path` is
    not tracked by the repository around it: a package installed into a virtual environment inside the user's own
    project (`.venv/lib/.../rnan_jax`, ignored there) was recorded with that project's revision."""
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
        tracked = subprocess.run(["git", "ls-files", "--", "."], cwd=path, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode or tracked.returncode or not tracked.stdout.strip():
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))
