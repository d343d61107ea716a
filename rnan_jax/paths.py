"""Paths that are local or URLs (`gs://bucket/run`, where Cloud TPU users keep workdirs and data).

Paths stay strings (os.path.join/basename/dirname work on URLs as on POSIX paths); everything that touches
the filesystem goes through etils.epath, which reaches gs:// through gcsfs (`STORAGE_EMULATOR_HOST` points
it at an emulator). orbax and tensorstore read and write gs:// themselves (`TENSORSTORE_GCS_HTTP_URL`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import os
import re
import shutil
import socket
import threading
from typing import BinaryIO, Callable, Sequence

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


# The URL schemes etils.epath reaches, and the package (fsspec's backend) each needs.
_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
# "gs:/bucket/run" (a slash lost) is a relative local path to os.path: a run went into ./gs:/bucket/run.
_SLASH_MISSING = re.compile(r"(gs|gcs|s3|az|hf):(?!//)", re.IGNORECASE)


def resolve(path: str | os.PathLike) -> str:
    """A URL without trailing slashes (as a local path's: "gs://b/run/checkpoints/3/" names step 3); a local
    path made absolute (with ~ expanded). Raises ValueError for a URL that nothing installed can reach (a gs://
    one without gcsfs or TensorFlow, which etils.epath would use; a scheme etils.epath does not know), and for
    one with a slash missing ("gs:/bucket"), which would be a local folder named "gs:"."""
    path = os.fspath(path)
    if not is_url(path):
        if _SLASH_MISSING.match(path):
            scheme = {"gcs": "gs"}.get(path.split(":", 1)[0].lower(), path.split(":", 1)[0].lower())
            raise ValueError(f"{path}: a URL with a slash missing? (write {scheme}://...; as a local path it "
                             f"would be a folder named {path.split('/', 1)[0]!r})")
        return os.path.abspath(os.path.expanduser(path))
    scheme = path.split("://", 1)[0]
    if scheme not in _SCHEMES:
        raise ValueError(f"{path}: unsupported URL scheme {scheme}:// (give a local path, or a URL of "
                         f"{', '.join(s + '://' for s in _SCHEMES)}, in lower case)")
    backends = (_SCHEMES[scheme], "tensorflow") if scheme == "gs" else (_SCHEMES[scheme],)
    if not any(importlib.util.find_spec(m) for m in backends):
        install = "'rnan_jax[gcs]' (or [tpu])" if scheme == "gs" else _SCHEMES[scheme]
        raise ValueError(f"{path}: {scheme}:// paths need {_SCHEMES[scheme]}: pip install {install}")
    stripped = path.rstrip("/")
    return stripped if stripped != scheme + ":" else scheme + "://"


def url_error(what: str, value: str, advice: str = "copy the files here first, e.g. gcloud storage cp -r, and give "
              "the local path") -> str | None:
    """One line for a URL given where only a local path is read, else None: os.path took "gs://b/x" for a local
    path that is not there, and said "no such folder" of objects that are."""
    if value and is_url(value):
        return f"{what} {value}: a URL, but this takes a local path only ({advice})"
    return None


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
    shared folder (NFS) included: process ids alone repeat across hosts (a container's are the same on each).
    Raises OSError (EINVAL) for a URL, writing nothing: os.path made it a local folder named "gs:". An OSError
    about the partial file names `path` instead (its errno and strerror as they were)."""
    write_all_atomically([(path, write)])


def write_all_atomically(files: Sequence[tuple[str, Callable[[BinaryIO], object]]]) -> None:
    """`write_atomically` of several (path, write) together: every partial file is written before any is renamed,
    so that a failure before the renames leaves each earlier file as it was (files of one run beside those of
    another: an evaluation's three report files) and no partial file behind."""
    for path, _ in files:
        if is_url(path):
            raise OSError(errno.EINVAL, "a URL, but only a local file can be written here (write it to a local "
                                        "folder, then copy it, e.g. gcloud storage cp)", path)
    partials = []
    for path, _ in files:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        partials.append(os.path.join(folder, _partial_name(os.path.basename(path))))
    path = partial = None
    try:
        for (path, write), partial in zip(files, partials):
            with open(partial, "wb") as f:
                write(f)
        for (path, _), partial in zip(files, partials):
            os.replace(partial, path)
    except BaseException as e:
        for p in partials:
            with contextlib.suppress(OSError):
                os.remove(p)
        if isinstance(e, OSError) and partial in (e.filename, e.filename2):  # it named the hidden partial file
            raise OSError(e.errno, e.strerror, path) from None  # (its errno kept: a full disk is still one)
        raise


_NAME_MAX = 255  # bytes in a file name on the common filesystems (ext4, XFS, APFS, NTFS's 255 characters)


def _partial_name(name: str) -> str:
    """The partial file's name for a file `name`: `.<name>.<host>.<pid>.<thread>.partial`, unique per host, process
    and thread; with `name` cut short (and a digest of it added) where the whole would pass `_NAME_MAX` bytes, so
    that a file whose name fits is not refused as "File name too long" for its partial file's."""
    suffix = f".{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.partial"
    partial = f".{name}{suffix}"
    if len(os.fsencode(partial)) <= _NAME_MAX:
        return partial
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    room, head = _NAME_MAX - len(os.fsencode(suffix)) - len(digest) - 2, name
    while head and len(os.fsencode(head)) > room:  # by characters: a multi-byte one is not cut in two
        head = head[:-1]
    return f".{head}.{digest}{suffix}"


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
    """Deletes a file (an object); FileNotFoundError if it is not there. The object of that very name: fsspec's
    rm (under epath's unlink) expands glob characters, so that removing "gs://b/run[1]/train.lock" found nothing
    and removing "gs://b/x [1]" deleted "gs://b/x 1"."""
    try:
        epath.Path(_literal(path)).unlink()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file or object", path) from None


def _literal(path: str) -> str:
    """`path` with its glob characters escaped ("[" as "[[]") where epath's backend is fsspec, which expands
    them in rm; as it is elsewhere (a local path; TensorFlow's gfile, which etils picks where TF is installed)."""
    backend = getattr(epath.Path(path), "_backend", None)
    if type(backend).__name__ != "_FileSystemSpecBackend":
        return path
    return re.sub(r"([*?[])", r"[\1]", path)


def write_text(path: str, text: str) -> None:
    epath.Path(path).write_text(text)


def rename(source: str, target: str) -> None:
    """Moves a file or folder (on GCS: copies every object under it, then deletes the originals)."""
    if is_url(source):
        src = epath.Path(source)
        if src.is_file():
            src.copy(epath.Path(target))
            remove(source)
            return
        files = _files_under(src)  # not src.rglob: etils refuses "**" on GCS (NotImplementedError)
        for file in files:
            dest = epath.Path(target) / file.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            file.copy(dest)
        for file in files:  # by name, not src.rmtree(), which expands glob characters in `source`
            remove(os.fspath(file))
    else:
        os.rename(source, target)


def _files_under(folder: epath.Path) -> list[epath.Path]:
    files = []
    for child in folder.iterdir():
        files += _files_under(child) if child.is_dir() else [child]
    return files
