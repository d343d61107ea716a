"""Paths that are local or URLs (`gs://bucket/run`, where Cloud TPU users keep workdirs and data).

Paths stay strings (os.path.join/basename/dirname work on URLs as on POSIX paths); everything that touches
the filesystem goes through etils.epath, which reaches gs:// through gcsfs (`STORAGE_EMULATOR_HOST` points
it at an emulator). orbax and tensorstore read and write gs:// themselves (`TENSORSTORE_GCS_HTTP_URL`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import threading
from typing import BinaryIO, Callable

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
    """A URL as it is; a local path made absolute (with ~ expanded). Raises ValueError for a gs:// URL
    when nothing can reach GCS (neither gcsfs nor TensorFlow, which etils.epath would use, is installed)."""
    path = os.fspath(path)
    if not is_url(path):
        return os.path.abspath(os.path.expanduser(path))
    if path.startswith("gs://") and not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
        raise ValueError(f"{path}: gs:// paths need gcsfs: pip install 'rnan_jax[gcs]' (or [tpu])")
    return path


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
    return epath.Path(path).is_file()


def listdir(path: str) -> list[str]:
    return sorted(p.name for p in epath.Path(path).iterdir())


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def free_bytes(path: str) -> int | None:
    """Bytes free on the filesystem of a local `path` (an existing folder); None for a URL or when unknown."""
    if is_url(path):
        return None
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_atomically(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Calls `write` on a partial file beside local `path` (its folder made if missing), then renames it to
    `path`: a failure (a full disk, Ctrl-C) leaves no half-written file and an earlier file of that name as it
    was, and a reader meanwhile sees the old file or the whole new one. The partial file's name is unique per
    host, process and thread, so concurrent writers of one path do not collide, those of several hosts in a
    shared folder (NFS) included: process ids alone repeat across hosts (a container's are the same on each)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}."
                                   f"{threading.get_ident()}.partial")
    try:
        with open(partial, "wb") as f:
            write(f)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def create_exclusively(path: str, data: bytes) -> None:
    """Writes `data` to `path` only if nothing is there yet; raises FileExistsError if something is. Atomic for a
    local file (O_EXCL) and on GCS (one upload with the precondition ifGenerationMatch=0, through gcsfs: of two
    creators exactly one succeeds). Where the backend cannot (a gcsfs before 2025, TensorFlow's gfile) it checks,
    then writes: a creator between the two is not seen."""
    if not is_url(path):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            f.write(data)
        return
    try:
        import fsspec

        fsspec.core.url_to_fs(path)[0].pipe_file(path, data, mode="create")
        return
    except (ImportError, ValueError, TypeError):  # no fsspec backend for the URL, or one without mode="create"
        pass
    if exists(path):
        raise FileExistsError(path)
    epath.Path(path).write_bytes(data)


def remove(path: str) -> None:
    """Deletes a file (an object); FileNotFoundError if it is not there."""
    epath.Path(path).unlink()


def write_text(path: str, text: str) -> None:
    epath.Path(path).write_text(text)


def rename(source: str, target: str) -> None:
    """Moves a file or folder (on GCS: copies every object under it, then deletes the originals)."""
    if is_url(source):
        src = epath.Path(source)
        for file in [p for p in src.rglob("*") if p.is_file()]:
            dest = epath.Path(target) / file.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            file.copy(dest)
        src.rmtree()
    else:
        os.rename(source, target)
