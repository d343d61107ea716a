"""An evaluation's record (`Evaluation`: per-image scores, what was skipped or flagged, the conventions used) and
how it is written: results.json, a Markdown table laid out like the paper's Table 1, per-image CSV."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os

import numpy as np

from rnan_jax import benchmark_sets, paths


@dataclasses.dataclass(frozen=True)
class ImageScore:
    dataset: str
    scale: int
    name: str
    psnr: float  # dB; math.inf for an exact reconstruction
    ssim: float
    height: int  # of the cropped HR image
    width: int
    gray: bool


@dataclasses.dataclass
class Evaluation:
    """Per-image scores plus everything skipped or suspicious, and how the numbers were made."""

    method: str
    rounded_y: bool = True
    self_ensemble: bool = False
    scores: list[ImageScore] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    listed: dict[str, int] = dataclasses.field(default_factory=dict)  # image files found per dataset
    allow_incomplete: bool = False  # report a set scored on fewer images than it holds (labelled as such)
    source: str = ""  # what was scored, as the command named it ("--checkpoint runs/x4 --which best (step 8)")
    step: int | None = None  # the checkpoint step scored (a zoo file's: the one it records), if known

    def _groups(self) -> dict[str, dict[str, list[ImageScore]]]:
        out: dict[str, dict[str, list[ImageScore]]] = {}
        for s in self.scores:
            out.setdefault(s.dataset, {}).setdefault(f"x{s.scale}", []).append(s)
        return out

    def incomplete(self) -> list[str]:
        """One message per (dataset, scale) scored on fewer images than the dataset's folder holds."""
        return [f"{ds} {key}: {len(group)} of {self.listed[ds]} images scored" +
                ("" if self.allow_incomplete else f", so no {ds} {key} score is reported (--allow_incomplete "
                 "reports the mean of those, labelled)")
                for ds, by_scale in self._groups().items() for key, group in by_scale.items()
                if len(group) < self.listed.get(ds, 0)]

    def summary(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """{dataset: {"x<scale>": {"psnr": mean dB, "ssim": mean, "images": count, "of": listed}}}, in
        evaluation order. A (dataset, scale) scored on fewer images than the dataset holds is left out
        unless `allow_incomplete` (its mean is not that set's score)."""
        out = {}
        for ds, by_scale in self._groups().items():
            rows = {
                key: {
                    "psnr": float(np.mean([s.psnr for s in group])),
                    "ssim": float(np.mean([s.ssim for s in group])),
                    "images": len(group),
                    "of": self.listed.get(ds, len(group)),
                }
                for key, group in by_scale.items()
                if self.allow_incomplete or len(group) >= self.listed.get(ds, 0)
            }
            if rows:
                out[ds] = rows
        return out

    def conventions(self) -> dict[str, object]:
        return {
            "method": self.method,
            "self_ensemble": self.self_ensemble,
            "y_rounding": "rounded" if self.rounded_y else "unrounded",
            "channel": "Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 (MATLAB rgb2ycbcr); grayscale "
            "references on their gray values, RGB output reduced to round(0.299 R + 0.587 G + 0.114 B)",
            "shave": "scale",
            "psnr": "peak 255, mean over images of per-image PSNR; an exact reconstruction is infinite, written "
            'as the string "inf"',
            "ssim": "Wang et al.: Gaussian 11 / sigma 1.5, K1 0.01, K2 0.03, L 255, valid, mean of the map",
            "quantization": "SR clipped to [0, 1], x255, rounded to uint8 before scoring",
            "degradation": "HR cropped to a multiple of the scale (top-left), MATLAB imresize(hr, 1/s, 'bicubic') "
            "with antialiasing, rounded to uint8 (or the LR_bicubic/X<s> files where present)",
        }


# Table 1 of the paper (PSNR / SSIM on Y), for reference rows beside a result. BSD100 is our B100
# (`benchmark_sets.standard_set`).
PAPER_TABLE1: dict[str, dict[str, dict[int, tuple[float, float]]]] = {
    "Bicubic": {
        "Set5": {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)},
        "Set14": {2: (30.24, 0.8688), 3: (27.55, 0.7742), 4: (26.00, 0.7027)},
        "B100": {2: (29.56, 0.8431), 3: (27.21, 0.7385), 4: (25.96, 0.6675)},
        "Urban100": {2: (26.88, 0.8403), 3: (24.46, 0.7349), 4: (23.14, 0.6577)},
    },
    "RNAN": {
        "Set5": {2: (38.24, 0.9614), 3: (34.73, 0.9297), 4: (32.52, 0.8986)},
        "Set14": {2: (33.97, 0.9211), 3: (30.59, 0.8473), 4: (28.82, 0.7872)},
        "B100": {2: (33.07, 0.9021), 3: (29.26, 0.8096), 4: (27.72, 0.7418)},
        "Urban100": {2: (33.07, 0.9368), 3: (28.85, 0.8667), 4: (26.67, 0.8049)},
    },
    "RNAN+": {
        "Set5": {2: (38.31, 0.9617), 3: (34.80, 0.9302), 4: (32.66, 0.9005)},
        "Set14": {2: (34.10, 0.9221), 3: (30.69, 0.8486), 4: (28.92, 0.7894)},
        "B100": {2: (33.42, 0.9027), 3: (29.33, 0.8108), 4: (27.79, 0.7432)},
        "Urban100": {2: (33.28, 0.9384), 3: (29.08, 0.8699), 4: (26.90, 0.8097)},
    },
}


def json_number(x: float) -> float | str:
    """JSON has no infinity: an infinite PSNR (exact reconstruction) is written as the string "inf"."""
    return "inf" if math.isinf(x) else x


def results_json(evaluation: Evaluation) -> dict:
    """{"<dataset>": {"x<scale>": {"psnr", "ssim", "images"}}, "conventions": {...}, "run": {"source", "step" (the
    checkpoint step scored, or null), "skipped", "warnings"}}."""
    out: dict = {
        ds: {key: {**v, "psnr": json_number(v["psnr"])} for key, v in by_scale.items()}
        for ds, by_scale in evaluation.summary().items()
    }
    out["conventions"] = evaluation.conventions()
    out["run"] = {"source": evaluation.source, "step": evaluation.step, "skipped": list(evaluation.skipped),
                  "warnings": list(evaluation.warnings)}
    return out


def _cell(psnr: float, ssim: float, psnr_digits: int) -> str:
    return f"{psnr:.{psnr_digits}f}/{ssim:.4f}".replace("/0.", "/.")


def _column(dataset: str, key: str, row: dict) -> str:
    label = f"{dataset} {key.replace('x', '×')}"
    partial = row.get("of", row["images"]) > row["images"]
    return label + (f" ({row['images']} of {row['of']} images)" if partial else "")


def markdown_table(evaluation: Evaluation, *, skipped: bool = True) -> str:
    """Rows: this result, then the paper's Bicubic / RNAN / RNAN+ rows; columns: dataset x scale (Table 1). Under it
    the notes: the warnings and (`skipped`) the skipped images."""
    summary = evaluation.summary()
    columns = [(ds, key) for ds, by_scale in summary.items() for key in by_scale]
    if not columns:  # the warnings and skips still said: they are why (results.md held the first line alone)
        head = ("(no set was scored in full, so none has a score: --allow_incomplete reports the partial means)"
                if evaluation.scores else "(no images were scored)")
        scored = [f"Scored: {evaluation.source}."] if evaluation.source else []  # what, though no set has a score
        return _escaped("\n".join([head, ""] + scored + _notes(evaluation, skipped)))
    lines = [
        "| Method | " + " | ".join(_column(ds, key, summary[ds][key]) for ds, key in columns) + " |",
        "| --- |" + " --- |" * len(columns),
        f"| {evaluation.method} | "
        + " | ".join(_cell(summary[ds][key]["psnr"], summary[ds][key]["ssim"], 3) for ds, key in columns)
        + " |",
    ]
    for row, table in PAPER_TABLE1.items():
        cells = []
        for ds, key in columns:
            ref = table.get(benchmark_sets.standard_set(ds) or ds, {}).get(int(key[1:]))
            cells.append(_cell(*ref, 2) if ref else "–")
        lines.append(f"| {row} (paper) | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{ds} {key}: {summary[ds][key]['images']}" for ds, key in columns)
    notes = [
        "",
        f"PSNR (dB) / SSIM on {'rounded' if evaluation.rounded_y else 'unrounded'} Y, shave = scale. "
        f"Images scored: {counts}.",
    ] + ([f"Scored: {evaluation.source}."] if evaluation.source else [])
    return _escaped("\n".join(lines + notes + _notes(evaluation, skipped)))


def _notes(evaluation: Evaluation, skipped: bool = True) -> list[str]:
    """The table's lines for the warnings and (`skipped`) the skipped images."""
    notes = [f"Warning: {w}" for w in evaluation.warnings]
    if evaluation.skipped and skipped:
        notes.append(f"Skipped {len(evaluation.skipped)}: " + "; ".join(evaluation.skipped))
    return notes


def _escaped(text: str) -> str:
    """`text` with what UTF-8 cannot encode (the undecodable bytes of a file name, which Python holds as lone
    surrogates) written as escapes (b\\udcffx), so that it can be printed and written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def per_image_csv(evaluation: Evaluation) -> str:
    """One row per (dataset, scale, image): psnr ("inf" when exact), ssim, cropped HR size, gray, and complete: 1 where
    every image of that set was scored at that scale, 0 where some were not (skipped, or not reached when the run
    was stopped): the mean of those rows is not the set's score, which the table and results.json leave out (or
    label, with --allow_incomplete). A script averaging the rows per set keeps those with complete 1."""
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(["dataset", "scale", "image", "psnr", "ssim", "height", "width", "gray", "complete"])
    counts: dict[tuple[str, int], int] = {}
    for s in evaluation.scores:
        counts[s.dataset, s.scale] = counts.get((s.dataset, s.scale), 0) + 1
    for s in evaluation.scores:
        psnr = "inf" if math.isinf(s.psnr) else f"{s.psnr:.6f}"
        complete = counts[s.dataset, s.scale] >= evaluation.listed.get(s.dataset, 0)  # as `summary` counts a set
        writer.writerow([s.dataset, s.scale, s.name, psnr, f"{s.ssim:.6f}", s.height, s.width, int(s.gray),
                         int(complete)])
    return _escaped(f.getvalue())


REPORT_FILES = ("results.json", "results.md", "per_image.csv")
IMAGES_FOLDER = "images"


def output_error(output_dir: str, *, save_images: bool = False) -> str | None:
    """None when the report files (and with `save_images` the images folder) can be written in the existing
    folder `output_dir`, else one line saying what is in the way: checked before scoring, which may take hours."""
    for name in REPORT_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            return f"--output {output_dir}: {path} is a folder, in the way of the report file"
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return f"--output {output_dir}: {path} exists and cannot be overwritten (permission denied)"
    images = os.path.join(output_dir, IMAGES_FOLDER)
    if save_images and os.path.exists(images) and not os.path.isdir(images):
        return f"--output {output_dir}: {images} is a file, in the way of --save_images' folder"
    return None


def write_report(evaluation: Evaluation, output_dir: str) -> list[str]:
    """Writes results.json, results.md and per_image.csv (UTF-8) into `output_dir`; returns their paths. The three
    are written together or not at all (`paths.write_all_atomically`: each to a partial file first, then all
    renamed), so that a full disk or Ctrl-C leaves an earlier report's three files as they were
    (results.json had been replaced by the new run's beside the old results.md and per_image.csv) and no partial
    file behind."""
    texts = [json.dumps(results_json(evaluation), indent=2, allow_nan=False) + "\n",
             markdown_table(evaluation) + "\n", per_image_csv(evaluation)]
    files = [os.path.join(output_dir, n) for n in REPORT_FILES]
    paths.write_all_atomically([(path, lambda f, text=text: f.write(text.encode("utf-8")))
                                for path, text in zip(files, texts)])
    return files
