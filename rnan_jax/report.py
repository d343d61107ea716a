"""Writing an evaluation: results.json, a Markdown table laid out like the paper's Table 1, per-image CSV."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rnan_jax.evaluate import Evaluation

# Table 1 of the paper (PSNR / SSIM on Y), for reference rows beside a result. BSD100 is our B100.
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
    """{"<dataset>": {"x<scale>": {"psnr", "ssim", "images"}}, "conventions": {...}, "run": {...}}."""
    out: dict = {
        ds: {key: {**v, "psnr": json_number(v["psnr"])} for key, v in by_scale.items()}
        for ds, by_scale in evaluation.summary().items()
    }
    out["conventions"] = evaluation.conventions()
    out["run"] = {"skipped": list(evaluation.skipped), "warnings": list(evaluation.warnings)}
    return out


def _cell(psnr: float, ssim: float, psnr_digits: int) -> str:
    return f"{psnr:.{psnr_digits}f}/{ssim:.4f}".replace("/0.", "/.")


def _column(dataset: str, key: str, row: dict) -> str:
    label = f"{dataset} {key.replace('x', '×')}"
    partial = row.get("of", row["images"]) > row["images"]
    return label + (f" ({row['images']} of {row['of']} images)" if partial else "")


def markdown_table(evaluation: Evaluation) -> str:
    """Rows: this result, then the paper's Bicubic / RNAN / RNAN+ rows; columns: dataset x scale (Table 1)."""
    summary = evaluation.summary()
    columns = [(ds, key) for ds, by_scale in summary.items() for key in by_scale]
    if not columns:
        return "(no images were scored)"
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
            ref = table.get(ds, {}).get(int(key[1:]))
            cells.append(_cell(*ref, 2) if ref else "–")
        lines.append(f"| {row} (paper) | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{ds} {key}: {summary[ds][key]['images']}" for ds, key in columns)
    notes = [
        "",
        f"PSNR (dB) / SSIM on {'rounded' if evaluation.rounded_y else 'unrounded'} Y, shave = scale. "
        f"Images scored: {counts}.",
    ]
    notes += [f"Warning: {w}" for w in evaluation.warnings]
    if evaluation.skipped:
        notes.append(f"Skipped {len(evaluation.skipped)}: " + "; ".join(evaluation.skipped))
    return "\n".join(lines + notes)


def write_per_image_csv(evaluation: Evaluation, path: str) -> None:
    """One row per (dataset, scale, image): psnr ("inf" when exact), ssim, cropped HR size, gray."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "scale", "image", "psnr", "ssim", "height", "width", "gray"])
        for s in evaluation.scores:
            psnr = "inf" if math.isinf(s.psnr) else f"{s.psnr:.6f}"
            writer.writerow([s.dataset, s.scale, s.name, psnr, f"{s.ssim:.6f}", s.height, s.width, int(s.gray)])


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
    """Writes results.json, results.md and per_image.csv into `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, n) for n in REPORT_FILES]
    with open(paths[0], "w") as f:
        json.dump(results_json(evaluation), f, indent=2, allow_nan=False)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(markdown_table(evaluation) + "\n")
    write_per_image_csv(evaluation, paths[2])
    return paths
