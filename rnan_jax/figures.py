"""The pictures of MODEL_ZOO.md: a training curve and a visual comparison in the style of the paper's Figure 3.

    python -m rnan_jax.figures curve --workdir runs/small291_x2 --output docs/figures/small_x2_curve.png
    python -m rnan_jax.figures compare --checkpoint zoo:small_x2 --image Urban100/img_004 \
        --box 200,100,80 --output docs/figures/small_x2_img_004.png

`curve` reads the validation scalars that the trainer writes to `<workdir>/tensorboard/metrics.jsonl`
(validation PSNR against step, bicubic's as a line); a folder inside the workdir (its checkpoints/, best/) is
refused naming the workdir to give. `compare` shows a benchmark HR image with a boxed
region and zoomed crops of HR, bicubic and the model, each labelled with its whole-image PSNR/SSIM on Y
(the numbers `evaluate` prints for that image). matplotlib is an optional extra: `pip install -e '.[figures]'`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, NoReturn, Sequence

import numpy as np

from rnan_jax import benchmark_sets, cli, images, metrics, paths, upscalers
from rnan_jax.summary import METRICS_FILE, RUN_LOG

log = logging.getLogger(__name__)


class FigureError(ValueError):
    """Bad input for a figure (missing file, box outside the image); the message says which."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FigureError("matplotlib is not installed: pip install -e '.[figures]'") from None
    return plt


def read_validation(workdir: str) -> tuple[list[int], list[float], float | None]:
    """(steps, validation PSNRs, bicubic PSNR) from a workdir's metrics.jsonl (or that file itself), in step
    order (a resumed run's repeated steps keep the last value, and its line {"step": S, "resumed": true} drops
    the earlier lines' steps after S, of a trajectory that no longer exists; a line that is not a record is
    skipped, with a warning)."""
    path = metrics_path(workdir)
    url = paths.is_url(path)  # a gs:// run's (a TPU VM's): os.path said "no such file" of the objects there
    if not (paths.isfile(path) if url else os.path.isfile(path)):
        # RUN/checkpoints, RUN/best/4: it said "written since metrics.jsonl was added", as if the run were too old
        if (run := enclosing_run(workdir)) is not None:
            raise FigureError(f"{path}: no such file: {workdir} is inside the training workdir {run}; give "
                              f"--workdir {run}")
        raise FigureError(f"{path}: no such file (written by the trainer since metrics.jsonl was added)")
    if url:
        text = paths.read_text(path)
    else:
        with open(path) as f:
            text = f.read()
    by_step, bicubic, unreadable = {}, None, []
    for number, line in enumerate(text.split("\n"), 1):
        try:
            record = json.loads(line)
            if isinstance(record, dict) and record.get("resumed") is True:
                by_step = {k: v for k, v in by_step.items() if k <= record["step"]}
            if "val/psnr" in record:
                by_step[record["step"]] = record["val/psnr"]
                bicubic = record.get("val/bicubic_psnr", bicubic)
        except (ValueError, TypeError, KeyError):  # a line cut short when a run was killed mid-write
            if line.strip():
                unreadable.append(number)
    if unreadable:
        log.warning("%s: skipped line(s) %s, not a JSON record with a step", path, ", ".join(map(str, unreadable)))
    if not by_step:
        raise FigureError(f"{path}: holds no validation record")
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps], bicubic


def metrics_path(workdir: str) -> str:
    """The metrics.jsonl of `workdir`: a training workdir's tensorboard/metrics.jsonl, the file itself, or the one in
    the folder given (the workdir's tensorboard folder, as TensorBoard's --logdir names it: it was looked for in
    RUN/tensorboard/tensorboard)."""
    isfile = paths.isfile if paths.is_url(workdir) else os.path.isfile  # a gs:// workdir (a TPU VM's run)
    if isfile(workdir):
        return workdir
    path = os.path.join(workdir, "tensorboard", METRICS_FILE)
    here = os.path.join(workdir, METRICS_FILE)
    return here if not isfile(path) and isfile(here) else path


def enclosing_run(folder: str) -> str | None:
    """The training workdir that `folder` is a subfolder of (its checkpoints/, best/, a step's folder in them), up to
    three levels up: the first folder above it holding tensorboard/metrics.jsonl, or checkpoints/ with the
    config.json or train.log a run writes beside it (a checkpoints/ alone, ~/checkpoints or /data/checkpoints of
    another tool, named its folder the workdir of every run below it); None where there is none."""
    url = paths.is_url(folder)
    isfile, isdir = (paths.isfile, paths.isdir) if url else (os.path.isfile, os.path.isdir)
    here = folder.rstrip("/") if url else os.path.abspath(folder)
    for _ in range(3):
        parent = os.path.dirname(here)
        if parent == here or (url and "/" not in parent.split("://", 1)[-1]):  # the root, or a bucket
            return None
        here = parent
        if isfile(os.path.join(here, "tensorboard", METRICS_FILE)) or (isdir(os.path.join(here, "checkpoints")) and any(
                isfile(os.path.join(here, name)) for name in ("config.json", RUN_LOG))):
            return here if url or os.path.isabs(folder) else os.path.relpath(here)  # as it was given
    return None


def run_name(workdir: str) -> str:
    """The training run's folder name for a workdir as `metrics_path` takes it ("x2" for runs/x2, runs/x2/tensorboard
    and runs/x2/tensorboard/metrics.jsonl), not "tensorboard" or "metrics.jsonl"."""
    path = metrics_path(workdir)
    path = os.path.normpath(path if paths.is_url(path) else os.path.abspath(path))
    folder = os.path.dirname(path)
    return os.path.basename(os.path.dirname(folder) if os.path.basename(folder) == "tensorboard" else folder)


def training_curve(workdir: str, output: str, *, title: str = "", references: dict[str, float] | None = None) -> str:
    """Validation PSNR against step, bicubic (and `references`, e.g. {"FSRCNN (paper)": 37.05}) as lines."""
    steps, psnrs, bicubic = read_validation(workdir)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(steps, psnrs, marker="o", markersize=3, label="RNAN (this run)")
    if bicubic is not None:
        ax.axhline(bicubic, color="gray", linestyle="--", label=f"Bicubic {bicubic:.2f} dB")
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=f"C{i + 1}", linestyle=":", label=f"{name} {value:.2f} dB")
    ax.set_xlabel("step")
    ax.set_ylabel("validation PSNR (dB, Y)")
    ax.set_title(title or f"{run_name(workdir)}: last {psnrs[-1]:.3f} dB")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, output)
    plt.close(fig)
    return output


def _save(fig: Any, output: str) -> None:
    """Writes `fig` to exactly `output` (whole or not at all), in the format its extension names, PNG without one
    (matplotlib would write `output`.png instead)."""
    image_format = os.path.splitext(output)[1][1:].lower() or "png"
    paths.write_atomically(output, lambda f: fig.savefig(f, format=image_format))


def find_benchmark_image(data_dir: str, image: str) -> tuple[str, str]:
    """(set, file) of benchmark image `image` ("Set14/barbara"); FigureError in one line when the name is not
    SET/NAME, the set is not there (the sets that are, or the one meant) or the set has no such image (the one
    meant, or its names)."""
    dataset, _, name = image.partition("/")
    if not dataset or not name or "/" in name:
        raise FigureError(f"--image takes SET/NAME, e.g. Set14/barbara, got {image!r}")
    try:
        files = benchmark_sets.list_hr(data_dir, dataset)
    except images.ImageError as e:
        raise FigureError(str(e)) from None
    names = [benchmark_sets.image_name(f) for f in files]
    if name in names:
        return dataset, files[names.index(name)]
    meant = [n for n in names if n.lower() == name.lower()]
    there = (f"did you mean {dataset}/{meant[0]}?" if meant else f"it holds {', '.join(names)}" if len(names) <= 20
             else f"it holds {len(names)} images, e.g. {', '.join(names[:5])}")
    raise FigureError(f"{benchmark_sets.hr_folder(data_dir, dataset)}: no image named {name}; {there}")


def comparison(upscalers: dict[str, upscalers.Upscaler], image: str, box: Sequence[int], output: str, *,
               scale: int, data_dir: str) -> dict[str, tuple[float, float]]:
    """Figure 3's layout for the benchmark image `image` ("Urban100/img_004"): the HR image with `box`
    (x, y, size in HR pixels) drawn, then the boxed crop of HR and of each upscaler's output, labelled with
    the whole image's PSNR/SSIM (Y, shave = scale, as `evaluate`). Returns {name: (psnr, ssim)}."""
    dataset, path = find_benchmark_image(data_dir, image)
    pair = benchmark_sets.make_pair(dataset, path, images.decode(path).pixels, scale)
    x, y, size = (int(v) for v in box)
    h, w = pair.hr.shape[:2]
    if x < 0 or y < 0 or size <= 0 or x + size > w or y + size > h:
        raise FigureError(f"--box {x},{y},{size} does not fit in {image} ({w}x{h} after cropping to x{scale})")
    panels = [("HR", pair.hr, None)]
    scores = {}
    for label, upscale in upscalers.items():
        sr = upscale(pair)
        luma = metrics.luminance_pair(sr, pair.hr, scale)
        scores[label] = (metrics.psnr(*luma), metrics.ssim(*luma))
        panels.append((label, sr, scores[label]))
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    fig = plt.figure(figsize=(3.0 * (2 + len(panels)), 3.4), dpi=120)
    grid = fig.add_gridspec(1, 1 + len(panels), width_ratios=[2] + [1] * len(panels))
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(_rgb(pair.hr))
    ax.add_patch(Rectangle((x, y), size, size, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_title(f"{image} (x{scale})", fontsize=9)
    ax.axis("off")
    for i, (label, img, score) in enumerate(panels):
        a = fig.add_subplot(grid[0, 1 + i])
        a.imshow(_rgb(img)[y:y + size, x:x + size], interpolation="nearest")
        a.set_title(label if score is None else f"{label}\n{score[0]:.2f} dB / {score[1]:.4f}", fontsize=9)
        a.axis("off")
    fig.tight_layout()
    _save(fig, output)
    plt.close(fig)
    return scores


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


class _Parser(argparse.ArgumentParser):
    """argparse with a misuse (a missing flag, an unknown command) told in one line, exit status 1, as the other
    entry points (`cli.parse_flags`) do: argparse prints its whole usage first and exits with 2."""

    def error(self, message: str) -> NoReturn:
        sys.exit(f"figures: error: {message} (see {self.prog} --help)")


def main(argv: Sequence[str] | None = None) -> int:
    from rnan_jax import checkpoint, env

    parser = _Parser(prog="python -m rnan_jax.figures", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    curve = sub.add_parser("curve", help="validation PSNR against step from a training workdir")
    curve.add_argument("--workdir", required=True, help="a training workdir, or its tensorboard/metrics.jsonl")
    curve.add_argument("--output", required=True,
                       help="the figure's file: PNG, or the format its extension names (.pdf, .svg, ...)")
    curve.add_argument("--title", default="", help="default: the run's folder name and its last validation PSNR")
    curve.add_argument("--reference", action="append", default=[],
                       help="NAME=DB, a horizontal line, e.g. 'FSRCNN (paper)=37.05' (repeatable)")
    compare = sub.add_parser("compare", help="Figure 3-style crops of HR, bicubic and a model")
    compare.add_argument("--checkpoint", required=True, help="a workdir, checkpoint folder or zoo:NAME")
    compare.add_argument("--which", default="auto", choices=checkpoint.CLI_WHICH,
                         help=checkpoint.WHICH_HELP[0].lower() + checkpoint.WHICH_HELP[1:])
    compare.add_argument("--image", required=True, help="DATASET/NAME, e.g. Urban100/img_004")
    compare.add_argument("--box", required=True, help="x,y,size of the zoomed region in HR pixels")
    compare.add_argument("--output", required=True,
                         help="the figure's file: PNG, or the format its extension names (.pdf, .svg, ...)")
    compare.add_argument("--label", default="RNAN", help="the model's panel title")
    compare.add_argument("--data_dir", default=None, help="default: $RNAN_DATA_DIR or ../shared/data")
    args = parser.parse_args(argv)
    try:
        args.output = cli.local_path(args.output)
        folder = os.path.dirname(os.path.abspath(args.output))
        error = (cli.output_folder_error(folder, flag="--output's folder")
                 or (f"--output {args.output}: is a folder (give the figure's file name)"
                     if os.path.isdir(args.output) else None))
    except ValueError as e:
        error = f"--output {args.output}: {e}"
    if error is not None:
        print(f"figures: {error}", file=sys.stderr)  # before any work
        return 1
    try:
        if args.command == "curve":
            refs = {}
            for item in args.reference:
                name, _, value = item.rpartition("=")
                try:
                    db = float(value)
                except ValueError:
                    db = float("nan")
                if not name or not np.isfinite(db):
                    raise FigureError(f"--reference takes NAME=DB, e.g. 'FSRCNN (paper)=37.05', got {item!r}")
                refs[name] = db
            training_curve(args.workdir, args.output, title=args.title, references=refs)
            print(f"wrote {args.output}")
        else:
            try:
                box = [int(v) for v in args.box.split(",")]
            except ValueError:
                box = []
            if len(box) != 3:
                raise FigureError(f"--box takes x,y,size (integers), got {args.box!r}")
            # auto: what validation scored (the EMA of a run trained with it), as evaluate prints
            which = checkpoint.resolve_which(args.checkpoint, args.which)
            params, config = checkpoint.load(args.checkpoint, which=which)
            scores = comparison({"Bicubic": upscalers.bicubic_upscaler,
                                 args.label: upscalers.model_upscaler(params, config)}, args.image, box,
                                args.output, scale=config.scale, data_dir=env.default_data_dir(args.data_dir))
            print(f"wrote {args.output}: " + ", ".join(f"{k} {p:.2f} dB / {s:.4f}" for k, (p, s) in scores.items()))
    except (FigureError, checkpoint.CheckpointError, images.ImageError, ValueError, OSError) as e:
        print(f"figures: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
