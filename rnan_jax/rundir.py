"""The run's folder: what a run writes there first (config.json, git_revision.txt), what a resumed run
compares with it, the one-line refusals of a workdir that cannot be one (a file in the way, no permission) and
the lock that keeps a second run out of it while one trains there.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
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
    """One line when a file is where the workdir, or one of the folders the run writes in it, goes; else None."""
    if paths.exists(workdir) and not paths.isdir(workdir):
        return f"--workdir {workdir}: a file is in the way (the workdir is a folder)"
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


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
    """Holds an exclusive lock on a local workdir while a run trains in it (process 0): a second run started
    there (the same command in another terminal), whose checkpoints and logs would interleave with the first's,
    is refused in one line naming the first. A flock on `workdir/train.lock`, which says who holds it: released
    when the process ends, however it ends. A URL workdir (gs://) is not locked: nothing there can hold one; nor
    is a file system that does not take locks."""
    if jax.process_index() != 0 or paths.is_url(workdir):
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "its process is not known"
            raise ValueError(f"--workdir {workdir}: another run is training in it ({holder}); let it finish or stop "
                             "it first, or use another --workdir") from None
        except OSError:  # a file system without locks (some network mounts): not locked, as before
            yield
            return
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        f.flush()
        yield
