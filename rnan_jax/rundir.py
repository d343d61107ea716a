"""The run's folder: what a run writes there first (config.json, git_revision.txt), what a resumed run
compares with it, the one-line refusals of a workdir that cannot be one (a file in the way, no permission) and
the lock that keeps a second run out of it while one trains there.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from typing import Any, Iterator

import jax
import ml_collections

from rnan_jax import checkpoint, configs, paths, summary


def write_info(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    paths.makedirs(workdir)
    paths.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    paths.write_text(os.path.join(workdir, "git_revision.txt"), summary.git_revision(summary.package_dir()) + "\n")


def config_changes(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """`KEY OLD -> NEW` for every key whose value differs from the workdir's config.json (the config of the run
    that started it), e.g. a resumed run's new total_steps, which also stretches a cosine schedule. A key the
    package gained since (absent there) counts only when its value is not its default: the old run had the
    default's behaviour."""
    try:
        saved = json.loads(paths.read_text(os.path.join(workdir, "config.json")))
    except (OSError, ValueError):
        return []

    def flat(values: dict) -> dict[str, Any]:
        return dict(configs.flatten_config(ml_collections.ConfigDict(values)))

    old, new = flat(saved), flat(json.loads(config.to_json_best_effort()))
    defaults = flat(json.loads(configs.default_config().to_json_best_effort()))
    old.update({k: v for k, v in defaults.items() if k not in old and new.get(k) == v})
    return [f"{k} {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def problem(workdir: str) -> str | None:
    """One line when a file is where the workdir, or one of the folders the run writes in it, goes, or the workdir
    is a symbolic link to nothing (it failed as "cannot create it (File exists)"); else None."""
    if paths.exists(workdir) and not paths.isdir(workdir):
        return f"--workdir {workdir}: a file is in the way (the workdir is a folder)"
    if not paths.is_url(workdir) and os.path.islink(workdir) and not os.path.exists(workdir):
        return f"--workdir {workdir}: a symbolic link to {os.readlink(workdir)}, which does not exist"
    for name in (checkpoint.CHECKPOINTS, checkpoint.BEST, "tensorboard", checkpoint.CHECKPOINTS + "_damaged"):
        path = os.path.join(workdir, name)
        if paths.exists(path) and not paths.isdir(path):
            return f"--workdir {workdir}: a file is in the way at {path} (the run writes a folder there)"
    return None


def prepare(workdir: str) -> None:
    """Refuses a file where the workdir or one of the folders the run writes goes (`problem`), and
    creates the workdir, before anything is read or trained: orbax otherwise failed at the first save, from its
    save thread, with a traceback."""
    if (line := problem(workdir)) is not None:
        raise ValueError(line)
    if jax.process_index() == 0:
        try:
            paths.makedirs(workdir)
        except OSError as e:
            raise ValueError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from None


LOCK_FILE = "train.lock"
URL_LOCK_REFRESH_S = 60.0  # how often a URL workdir's lock says its run is alive
URL_LOCK_STALE_S = 600.0  # a URL workdir's lock not refreshed for this long is of a run that is gone: taken over


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
    """Holds an exclusive lock on a workdir while a run trains in it (process 0 only): a second run started
    there (the same command in another terminal or on another VM), whose checkpoints and logs would interleave
    with the first's, is refused in one line naming the first. Locally a flock on `workdir/train.lock`, which
    says who holds it: released when the process ends, however it ends; a file system that does not take locks
    is not locked. A URL workdir (gs://), where nothing holds a lock for a process, gets `_url_lock`'s."""
    if jax.process_index() != 0:
        yield
        return
    if paths.is_url(workdir):
        with _url_lock(workdir, URL_LOCK_REFRESH_S, URL_LOCK_STALE_S):
            yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only mount, another user's folder: it was "[Errno 30] ...: '.../train.lock'"
        raise ValueError(f"--workdir {workdir}: cannot write in it ({e.strerror or e})") from None
    with open(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "its process is not known"
            raise ValueError(_refusal(workdir, holder)) from None
        except OSError:  # a file system without locks (some network mounts): not locked, as before
            yield
            return
        f.truncate(0)
        f.write(_holder() + "\n")
        f.flush()
        yield


def _holder() -> str:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}"


def _refusal(workdir: str, holder: str, extra: str = "") -> str:
    return (f"--workdir {workdir}: another run is training in it ({holder}); let it finish or stop it first, or "
            f"use another --workdir{extra}")


_ALIVE = "alive at "  # the second line of a URL lock: when its run last said it was alive (seconds since 1970)


def _read_url_lock(path: str) -> tuple[str, float | None] | None:
    """(the holder line, when it was last refreshed or None if the object does not say) of the lock object at
    `path`; None when there is none."""
    try:
        lines = paths.read_text(path).splitlines()
    except FileNotFoundError:
        return None
    alive = None
    for line in lines[1:]:
        if line.startswith(_ALIVE):
            with contextlib.suppress(ValueError):
                alive = float(line[len(_ALIVE):].split()[0])
    return (lines[0].strip() if lines else "") or "its process is not known", alive


_HELD: set[str] = set()  # the URL locks this process holds


def _gone(holder: str, path: str) -> bool:
    """Whether the lock's process is known to have ended: it ran on this host and no process has its id now
    (a killed run rerun on the same VM, or a preempted VM's rerun under its name, need not wait for staleness),
    or it has this process's id but this process does not hold it (a restarted container's process)."""
    match = re.fullmatch(r"pid (\d+) on (.+), started .*", holder)
    if not match or match.group(2) != socket.gethostname():
        return False
    if int(match.group(1)) == os.getpid():
        return path not in _HELD
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        pass
    return False


@contextlib.contextmanager
def _url_lock(workdir: str, refresh_s: float, stale_s: float) -> Iterator[None]:
    """A lock object `workdir/train.lock` (GCS), created only where none is (`paths.create_exclusively`: of two
    runs starting together one gets it), saying who holds it and, refreshed every `refresh_s` by a thread, when
    it was last alive; deleted when the run ends (an exception, SIGTERM's or Ctrl-C's stop included). A run
    killed outright leaves it: a lock not refreshed for `stale_s`, or whose process is gone from this host, is
    taken over (a line says so); the refusal of a live one says how to remove it by hand."""
    path = os.path.join(workdir, LOCK_FILE)
    holder = _holder()

    def content() -> bytes:
        return f"{holder}\n{_ALIVE}{time.time():.0f} (refreshed every {refresh_s:g} s)\n".encode()

    for _ in range(3):  # a lock that went between the create and the read, or stale one taken over: again
        try:
            paths.create_exclusively(path, content())
            break
        except FileExistsError:
            pass
        except OSError as e:  # no such bucket, no permission
            why = e.strerror or ("not found: is the bucket there?" if isinstance(e, FileNotFoundError) else str(e))
            raise ValueError(f"--workdir {workdir}: cannot create its lock {path} ({why})") from None
        if (found := _read_url_lock(path)) is None:
            continue
        other, alive = found
        age = None if alive is None else time.time() - alive
        if not _gone(other, path) and (age is None or age < stale_s):
            if age is None:  # never stale: it said "rerun once the lock is 10 min stale", which never came
                raise ValueError(_refusal(workdir, other, f"; its lock {path} does not say when its run was last "
                                          "alive (a local run's train.lock, copied with the workdir?): if no run is "
                                          "training there, delete it"))
            raise ValueError(_refusal(workdir, f"{other}, last seen alive {max(age, 0):.0f} s ago",
                                      f"; if it is not running (its VM lost), delete {path} or rerun once the lock "
                                      f"is {stale_s / 60:g} min stale"))
        logging.getLogger(__name__).warning(
            "--workdir %s: taking over the lock of a run that is gone (%s%s)", workdir, other,
            "" if age is None else f", last seen alive {age:.0f} s ago")
        with contextlib.suppress(FileNotFoundError):
            paths.remove(path)
    else:
        raise ValueError(_refusal(workdir, "a run that took its lock as this one started", f"; see {path}"))

    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(refresh_s):
            try:
                found = _read_url_lock(path)
                if found is None or found[0] != holder:  # taken over: the other run's, not to be overwritten
                    logging.getLogger(__name__).warning(
                        "--workdir %s: this run's lock %s was %s; another run may be training there", workdir,
                        path, "deleted" if found is None else f"taken over ({found[0]})")
                    return
                paths.write_text(path, content().decode())
            except Exception:  # a failed refresh (the network): tried again at the next
                pass

    thread = threading.Thread(target=refresh, name="rnan_jax workdir lock", daemon=True)
    thread.start()
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        stop.set()
        thread.join(timeout=30)
        with contextlib.suppress(Exception):  # released if still this run's; a stale lock is taken over anyway
            found = _read_url_lock(path)
            if found is not None and found[0] == holder:
                paths.remove(path)
