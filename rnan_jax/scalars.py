"""A training run's scalars read back from its TensorBoard event files (without TensorFlow), and runs
compared side by side in a markdown table (tools/compare_dtypes.py: float32 against bfloat16).
"""
from __future__ import annotations

import collections
import glob
import os
import struct


def read_scalars(logdir: str) -> dict[str, dict[int, tuple[float, float]]]:
    """{tag: {step: (value, wall_time)}} from every TensorBoard event file under `logdir`.

    Event files are TFRecords (length, CRC, an `Event` proto, CRC); tensorboardX's proto reads them
    without TensorFlow. CRCs are not checked. Files are read in the order they were begun; a resumed run's
    file begins with a SessionLog START at the step after the one it resumed from (`summary.Writer`): as
    TensorBoard does, the values that earlier files hold from that step on (steps trained again) are dropped.
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, tuple[float, float]]] = collections.defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            record = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            if len(record) < length:
                break  # a record cut off by a running writer
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for values in scalars.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag][event.step] = (value.simple_value, event.wall_time)
    return scalars


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
        lines.append(f"{n}: {span}{extra}")
    return "\n".join(lines)
