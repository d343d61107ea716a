"""A training run's scalars read back from its TensorBoard event files (without TensorFlow), and runs
compared side by side in a markdown table (tools/compare_dtypes.py: float32 against bfloat16).
"""
from __future__ import annotations

import collections
import glob
import os
import struct
from typing import Any, Iterator

from etils import epath

from rnan_jax import paths


class Scalars(collections.defaultdict):
    """`read_scalars`' {tag: {step: (value, wall_time)}}, with `sessions`: [(first, last)] wall time of the values
    that each run (each process that wrote the logdir: the first, then each resume) logged, in order."""

    def __init__(self, *args):
        super().__init__(dict, *args)
        self.sessions: list[tuple[float, float]] = []


def read_scalars(logdir: str) -> Scalars:
    """{tag: {step: (value, wall_time)}} from every TensorBoard event file under `logdir`.

    Event files are TFRecords (length, CRC, an `Event` proto, CRC); tensorboardX's proto reads them
    without TensorFlow. CRCs are not checked. Files are read in the order they were begun; a resumed run's
    file begins with a SessionLog START at the step after the one it resumed from (`summary.Writer`): as
    TensorBoard does, the values that earlier files hold from that step on (steps trained again) are dropped.
    Every run's first file begins with a START (a first run's at step 1), so they also part the runs' `sessions`;
    so does a file that is not a run's second or later one (`_continues`): the files of earlier versions hold no
    START, and their runs were one session, the time between them counted as training. The values that a resumed run
    writes again after its START from the earlier files (`summary.Writer`: the values it dropped, with their wall
    times) are values of the runs before it, not of its session.
    """
    from tensorboardX.proto import event_pb2

    scalars = Scalars()
    walls: list[list[float]] = [[]]  # per session: the wall times of the values it logged, dropped ones included
    dropped: set[tuple[str, int, float, float]] = set()  # what the latest START dropped: a copy of one is no value
    for path in event_files(logdir):                    # its session logged (`summary.Writer` writes them again)
        if walls[-1] and not _continues(path.name):  # another run's file, from a version that wrote no START
            walls.append([])
        for event in events(path):
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                if walls[-1]:
                    walls.append([])
                dropped = set()
                for tag, values in scalars.items():
                    for step in [s for s in values if s >= event.step]:
                        dropped.add((tag, step, *values.pop(step)))
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag][event.step] = (value.simple_value, event.wall_time)
                    if (value.tag, event.step, value.simple_value, event.wall_time) not in dropped:
                        walls[-1].append(event.wall_time)
    scalars.sessions = [(min(w), max(w)) for w in walls if w]
    return scalars


def event_files(logdir: str) -> list[epath.Path]:
    """The TensorBoard event files in `logdir` (a folder or a gs:// URL), in the order they were begun."""
    if paths.is_url(logdir):  # gs://: a glob of the text found nothing, and the runs there were "no values"
        names = paths.listdir(logdir) if paths.isdir(logdir) else []  # listed, not a glob: [ ] in a name
        return [epath.Path(logdir) / n for n in sorted(names) if n.startswith("events.out.tfevents.")]
    return [epath.Path(p) for p in sorted(glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*")))]


def events(path: epath.Path) -> Iterator[Any]:
    """The `Event` protos of event file `path`, in order, up to a record cut off by a running writer. CRCs are not
    checked."""
    from tensorboardX.proto import event_pb2

    with path.open("rb") as f:
        while len(header := f.read(12)) == 12:
            (length,) = struct.unpack("<Q", header[:8])
            if length > 1 << 31:  # a damaged length: not read (and allocated) as one record
                return
            record = f.read(length)
            if len(record) < length:
                return  # a record cut off by a running writer
            f.read(4)  # its CRC
            yield event_pb2.Event.FromString(record)


def _continues(name: str) -> bool:
    """Whether event file `name` continues a run's earlier file: tensorboardX's name ends in the host, then
    `summary.Writer`'s number of the file in its run (".0002" and on; a run of a version before those numbers wrote
    one file)."""
    last = name.rsplit(".", 1)[-1]
    return len(last) == 4 and last.isdigit() and int(last) > 1


def comparison_table(runs: dict[str, dict[str, dict[int, tuple[float, float]]]]) -> str:
    """Markdown: one row per step logged by any run; train loss and validation PSNR per dtype."""
    names = list(runs)
    steps = sorted({s for r in runs.values() for tag in ("train/loss", "val/psnr") for s in r.get(tag, {})})
    head = ["step"] + [f"loss {n}" for n in names] + [f"val PSNR {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in steps:
        cells = [str(s)]
        for tag, spec in (("train/loss", ".5f"), ("val/psnr", ".3f")):
            for n in names:
                v = runs[n].get(tag, {}).get(s)
                cells.append(format(v[0], spec) if v else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        walls = [w for r in runs[n].values() for _, w in r.values()]
        bicubic = runs[n].get("val/bicubic_psnr", {})
        extra = f", bicubic {next(iter(bicubic.values()))[0]:.3f} dB" if bicubic else ""
        span = f"{max(walls) - min(walls):.0f} s from the first to the last logged value" if walls else "no values"
        sessions = getattr(runs[n], "sessions", [])
        if walls and len(sessions) > 1:  # a resumed run: the time between its runs (down, waiting) is not training
            trained = sum(last - first for first, last in sessions)
            gaps = max(last for _, last in sessions) - min(first for first, _ in sessions) - trained
            span = (f"{trained:.0f} s from the first to the last logged value of each of its {len(sessions)} runs "
                    f"(the {gaps:.0f} s between them left out)")
        lines.append(f"{n}: {span}{extra}")
    return "\n".join(lines)
