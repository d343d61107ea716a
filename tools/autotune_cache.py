r"""What XLA:GPU's per-fusion autotuning cache folders hold, and where two of them picked differently.

    python tools/autotune_cache.py autotune.tar                 # every cache folder in a gpu_check.sh tar
    python tools/autotune_cache.py /tmp/rnan_autotune_a /tmp/rnan_autotune_c

XLA writes one small protobuf per autotuned instruction into `--xla_gpu_per_fusion_autotune_cache_dir`
(tools/gpu_check.sh returns them as autotune.tar): its key (a device fingerprint, the instruction's HLO
fingerprint and a version) and the pick. The pick's first field names the backend that won; the numbers seen
on an H200 with jaxlib 0.11.2 (tools/BENCHMARKS.md, "Fourth GPU session"), read off their contents: 1 a cuDNN
convolution (an engine id and its knobs), 9 XLA's Triton block-level emitter (tile sizes, warps, CTAs,
stages), 10 XLA's own emitter (no settings: what the fusion autotuner keeps when Triton loses). Decoded
without the schema (field numbers only), so other jaxlib versions may number them differently: then the
counts still show how many picks of each kind there are.

Prints, per folder: entries and their count per backend; for every pair of folders: the keys both hold whose
picks differ, with both picks.
"""
from __future__ import annotations

import collections
import os
import sys
import tarfile

BACKENDS = {1: "cuDNN conv", 9: "Triton block-level", 10: "XLA emitter"}


def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(b):
            raise ValueError("truncated varint")
        x = b[i]
        i += 1
        value |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return value, i


def fields(b: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message, without its schema: varints as ints,
    length-delimited fields and fixed-width ones as bytes."""
    out, i = [], 0
    while i < len(b):
        key, i = _varint(b, i)
        number, kind = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if kind == 0:
            value, i = _varint(b, i)
        elif kind == 2:
            n, i = _varint(b, i)
            if i + n > len(b):
                raise ValueError("truncated field")
            value, i = b[i:i + n], i + n
        elif kind in (1, 5):
            n = 8 if kind == 1 else 4
            value, i = b[i:i + n], i + n
        else:
            raise ValueError(f"wire type {kind}")
        out.append((number, value))
    return out


def _message(b: bytes) -> list | None:
    try:
        return fields(b)
    except (ValueError, IndexError):
        return None


def canonical(b: bytes) -> str:
    """A message's fields as text, nested messages decoded, and the entries of integer maps (repeated
    {1: int, 2: int} messages, such as a cuDNN algorithm's tuning knobs) sorted: protobuf writes map entries
    in no set order, so two equal picks can differ in bytes."""
    parsed = _message(b)
    if not parsed or any(isinstance(v, bytes) and len(v) in (4, 8) and _message(v) is None for _, v in parsed):
        return b.hex()
    parts = []
    for number, value in parsed:
        inner = canonical(value) if isinstance(value, bytes) else str(value)
        parts.append((number, inner))
    entries = [p for p in parts if p[1].startswith("{1:") and p[1].count(":") == 2 and "{" not in p[1][1:]]
    if len({n for n, _ in entries}) == 1 and len(entries) > 1:
        rest = [p for p in parts if p not in entries]
        parts = rest + sorted(entries)
    return "{" + " ".join(f"{n}:{v}" for n, v in parts) + "}"


def entry(b: bytes) -> tuple[str, int | None, str]:
    """(the instruction's HLO fingerprint, backend number, the pick as `canonical` text) of one cache file:
    field 1 is the key ({1: {1: device, 3: HLO fingerprint}, 2: {1: version}}), field 2 the result, whose
    field 1 holds the backend (its field 1) and the backend's settings."""
    top = dict(fields(b))
    key, result = top.get(1, b""), top.get(2, b"")
    if not isinstance(key, bytes) or not key:  # an empty file, or another protobuf: its picks counted as "None"
        raise ValueError("no key (field 1)")
    instruction = dict(fields(dict(fields(key)).get(1, b""))) if key else {}
    fingerprint = instruction.get(3, key)
    pick = dict(fields(result)).get(1, b"") if result else b""
    backend = dict(fields(pick)).get(1) if pick else None
    name = fingerprint.decode("ascii", "replace") if isinstance(fingerprint, bytes) else str(fingerprint)
    return name, backend if isinstance(backend, int) else None, canonical(pick)


def _entry(name: str, b: bytes) -> tuple[str, int | None, str]:
    """`entry` of the file `name`, whose name a ValueError names."""
    try:
        return entry(b)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{name}: not an XLA autotuning cache entry ({e})") from None


def read_folders(paths: list[str]) -> dict[str, dict[str, tuple[int | None, str]]]:
    """{folder: {key: (backend, pick)}} from cache folders or tar files of them (one entry per top folder; files
    at a tar's top level are the tar's own folder)."""
    caches: dict[str, dict[str, tuple[int | None, str]]] = {}
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        if os.path.isdir(path):
            caches.setdefault(path, {})  # an empty one is told as 0 entries, not left out
            for root, _, files in os.walk(path):
                for name in files:
                    with open(os.path.join(root, name), "rb") as f:
                        key, backend, pick = _entry(os.path.join(root, name), f.read())
                    caches[path][key] = (backend, pick)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                if not members:
                    raise ValueError(f"{path}: the tar file holds no files")
                for member in members:
                    # "./a/x.pb" (tar -C dir .) is in folder a, as "a/x.pb" is: every folder was "." and merged
                    parts = [p for p in member.name.split("/") if p not in ("", ".")]
                    folder = parts[0] if len(parts) > 1 else os.path.basename(path)
                    key, backend, pick = _entry(f"{path}: {member.name}", tar.extractfile(member).read())
                    caches.setdefault(folder, {})[key] = (backend, pick)
        else:
            raise FileNotFoundError(f"{path}: neither a folder nor a tar file")
    return caches


def report(caches: dict[str, dict[str, tuple[int | None, str]]]) -> str:
    lines = []
    for folder, picks in caches.items():
        counts = collections.Counter(backend for backend, _ in picks.values())
        kinds = ", ".join(f"{n} {BACKENDS.get(b, f'backend {b}')}" for b, n in counts.most_common())
        lines.append(f"{folder}: {len(picks)} entries" + (f": {kinds}" if kinds else " (no cache files)"))
    names = list(caches)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = caches[a].keys() & caches[b].keys()
            differ = sorted(k for k in shared if caches[a][k] != caches[b][k])
            lines.append(f"{a} against {b}: {len(shared)} keys in both, {len(differ)} picked differently")
            for k in differ:
                (ba, pa), (bb, pb) = caches[a][k], caches[b][k]
                lines.append(f"  {k}: {BACKENDS.get(ba, ba)} {pa} | {BACKENDS.get(bb, bb)} {pb}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("autotune_cache: name cache folders or tar files of them (--help says more)", file=sys.stderr)
        return 2
    if argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        print(report(read_folders(argv[1:])))
    except BrokenPipeError:  # `| head`: the reader took what it wanted (was "autotune_cache: [Errno 32]", status 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ValueError, tarfile.TarError) as e:
        print(f"autotune_cache: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
