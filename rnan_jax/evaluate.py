"""Scores SR methods on the benchmark sets with the field's conventions (PSNR/SSIM on Y, shave = scale).

    python -m rnan_jax.evaluate --method bicubic --datasets Set5,Set14 --scales 2,3,4
    python -m rnan_jax.evaluate --checkpoint WORKDIR --self_ensemble --output results/
    python -m rnan_jax.evaluate --sr_dir OTHER_METHOD/ --output results/

`--datasets` takes names under `<data_dir>/benchmark/<name>/HR` or folder paths (your own set: a folder
holding `HR/` and optionally `LR_bicubic/X<s>/`, or the HR images themselves), reported by the folder's name.
`--sr_dir` holds another method's SR images in one of three layouts: ours, `<dataset>/x<scale>/<HR file name>`
(what `--save_images` writes under `<output>/images/`); EDSR-PyTorch's `results-<dataset>/<name>_x<scale>_SR.png`;
or BasicSR's `<dataset>/<name>_<suffix>.png`, its suffix naming the scale (`EDSR_Mx4_...`); see
`upscalers.sr_dir_upscaler`. An SR image the size of HR cropped to a multiple of 12 (BasicSR's GTmod12 sets) is
scored against HR cropped so, with a note. `--save_images` removes the images an earlier run left in a set's
`x<scale>` folder that this run did not write, with a note: the folder holds one run's images. Without `--scales`,
`--sr_dir` is scored at those of 2, 3, 4 it holds SR images of, the others named in one note (a model's saved images
are of its scale); `--scales` given, a scale missing is an error (exit 1).

The report names what was scored (`Scored:` under the table, "source" in results.json): `--checkpoint RUN --which ema
(step 8)`, the step read ("step" in results.json: a live run's newest changes as it saves, and best/'s is an earlier
one); of a zoo file, what its record says: `--checkpoint zoo:NAME (the run's ema at step 2000)`. per_image.csv's
`complete` column is 0 for the rows of a set not scored in full (images skipped, or a run stopped by Ctrl-C in it),
whose mean the table and results.json do not report as its score (--allow_incomplete: labelled). Each skipped image is
printed once, in the list after the table (results.md and results.json hold them too).
From Python: `evaluate_bicubic`, `evaluate_sr_dir`, `evaluate_model(params, config, ...)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging as std_logging
import os
import signal
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from rnan_jax import api, benchmark_sets, checkpoint, cli, env, images, inference, paths, preemption, report
from rnan_jax.benchmark_sets import Pair
from rnan_jax.model import RNANConfig
from rnan_jax.report import Evaluation, ImageScore
from rnan_jax.upscalers import (GT_MOD, MissingFolderError, Upscaler, bicubic_upscaler, gt_mod_shape, model_upscaler,
                                sr_dir_upscaler)

DEFAULT_DATASETS = ("Set5", "Set14", "B100", "Urban100")
DEFAULT_SCALES = (2, 3, 4)

def _warn(evaluation: Evaluation, message: str) -> None:
    logging.warning("%s", message)
    evaluation.warnings.append(message)


def _skip(evaluation: Evaluation, message: str) -> None:
    """Records a skip, printed once, in the list at the end (results.md and results.json have them too): not also as
    a log line when it happened and under the printed table (each was printed three times)."""
    evaluation.skipped.append(message)


@dataclasses.dataclass
class _Folders:
    """The scales whose SR folder `upscale` found missing (`MissingFolderError`), per set, and the scales at which some
    image was upscaled or failed otherwise. With `defer`, the missing ones are `_settle`d when the scoring ends."""

    defer: bool = False
    missing: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)  # scale -> {dataset: message}
    reached: set[int] = dataclasses.field(default_factory=set)


def _settle(evaluation: Evaluation, folders: _Folders, scales: list[int]) -> None:
    """With `folders.defer` (--sr_dir without --scales): a scale of which no set has SR images, where another scale
    has some, is left out with one note naming them all; the other missing folders are skipped as without it (and
    all of them where no scale has images: each says where the images were looked for)."""
    absent = [s for s in scales if s in folders.missing and s not in folders.reached] if folders.reached else []
    for scale in scales:
        if scale not in absent:
            for message in folders.missing.get(scale, {}).values():
                _skip(evaluation, message)
    if absent:
        sets = list(dict.fromkeys(d for s in absent for d in folders.missing[s]))
        _warn(evaluation, f"no SR images at {', '.join(f'x{s}' for s in absent)} (of {', '.join(sets)}): "
              f"scored at {', '.join(f'x{s}' for s in scales if s not in absent)}, the scales --sr_dir holds images of "
              "(--scales names the scales to require)")


def _one_per_name(files: list[str], dataset: str, evaluation: Evaluation) -> list[str]:
    """`files` with one file per image name (the first): `a.png` and `a.bmp` would be scored, reported and
    saved as one image `a` twice. A warning names the files left out."""
    by_name: dict[str, str] = {}
    for path in files:
        name = benchmark_sets.image_name(path)
        if name in by_name:
            _warn(evaluation, f"{dataset}: {os.path.basename(path)} has the name of {os.path.basename(by_name[name])}"
                  f" (images are reported, saved and found by name): scored {os.path.basename(by_name[name])} only")
        else:
            by_name[name] = path
    return list(by_name.values())


def evaluate(
    upscale: Upscaler,
    datasets: Sequence[str],
    scales: Sequence[int],
    *,
    data_dir: str,
    method: str,
    rounded_y: bool = True,
    self_ensemble: bool = False,
    save_dir: str | None = None,
    progress: bool = True,
    allow_incomplete: bool = False,
    scales_present_only: bool = False,
) -> Evaluation:
    """Scores `upscale` on every image of `datasets` at every scale in `scales`.

    A missing dataset folder, an unreadable or too-small image, or a failing `upscale` is recorded in
    `Evaluation.skipped` with its name, and the rest goes on; a set that lost images that way has no score
    in `Evaluation.summary()` unless `allow_incomplete`. `datasets` may be one string ("Set5" or "Set5,Set14"),
    `scales` one integer. With `save_dir`, SR images are written to
    `<save_dir>/<dataset>/x<scale>/<name>.png`, and the .png files an earlier run left in a folder of a set and
    scale this run scored, that this run did not write (images it skipped, or never reached when stopped), are
    removed with a warning: the folder holds one run's images, for `--sr_dir` to score. With `scales_present_only`
    (`--sr_dir` without `--scales`), a scale of which `upscale` finds no SR folder for any set
    (`MissingFolderError`) is left out, named in one warning, not skipped: an `--sr_dir` of `--save_images` output
    holds its model's scale only.
    """
    if isinstance(datasets, str):  # "Set5" was scored as the sets S, e, t and 5; "Set5,Set14" as --datasets takes
        datasets = _parse_list(datasets)
    if isinstance(scales, (int, np.integer)):
        scales = [scales]
    if any(int(s) != s or s < 1 for s in scales):
        raise ValueError(f"scales must be positive integers, got {list(scales)}")
    scales = list(dict.fromkeys(int(s) for s in scales))  # a repeated scale or set would count its images twice
    evaluation = Evaluation(method=method, rounded_y=rounded_y, self_ensemble=self_ensemble,
                            allow_incomplete=allow_incomplete)
    folders = _Folders(defer=scales_present_only)
    try:
        _score_sets(evaluation, upscale, datasets, scales, data_dir, save_dir, progress, folders)
    except (KeyboardInterrupt, preemption.Preempted) as e:  # Preempted: SIGTERM, under preemption.sigterm_raises
        _settle(evaluation, folders, scales)
        signum = getattr(e, "signum", signal.SIGINT)
        _warn(evaluation, f"interrupted ({'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name}) "
              f"after {len(evaluation.scores)} image score(s): {', '.join(evaluation.listed) or 'no set'} begun, of "
              f"{', '.join(dict.fromkeys(datasets))}")
        raise Interrupted(evaluation, signum) from None
    _settle(evaluation, folders, scales)
    for message in evaluation.incomplete():
        _warn(evaluation, message)
    return evaluation


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, `signum`) during `evaluate`; `evaluation` holds what was scored before it (the sets
    scored in full keep their scores; the one it stopped in is incomplete)."""

    def __init__(self, evaluation: Evaluation, signum: int = signal.SIGINT):
        super().__init__()
        self.evaluation = evaluation
        self.signum = signum


def _score_sets(evaluation: Evaluation, upscale: Upscaler, datasets: Sequence[str], scales: list[int], data_dir: str,
                save_dir: str | None, progress: bool, folders: _Folders) -> None:
    save_root = save_dir  # save_dir is None once saving failed (a full disk); the folders are still cleaned up
    for entry in dict.fromkeys(datasets):
        dataset = benchmark_sets.set_name(entry)
        if dataset in evaluation.listed:
            _skip(evaluation, f"dataset {entry}: a set named {dataset} is already being scored (sets are reported, "
                  "saved and found in --sr_dir by their folder's name: rename one)")
            continue
        try:
            files = benchmark_sets.list_hr(data_dir, entry)
        except images.ImageError as e:
            _skip(evaluation, f"dataset {entry}: {e} ({benchmark_sets.LAYOUT})")
            continue
        files = _one_per_name(files, dataset, evaluation)
        evaluation.listed[dataset] = len(files)
        saved: set[tuple[int, str]] = set()  # (scale, name) of the SR images this run wrote
        try:
            save_dir = _score_set(evaluation, upscale, dataset, files, scales, save_dir, progress, saved, folders)
        finally:  # also when stopped: what an earlier run left of the images not reached is not this run's
            if save_root is not None:
                _remove_stale_images(evaluation, save_root, dataset, scales, saved,
                                     {benchmark_sets.image_name(f) for f in files})


def _score_set(evaluation: Evaluation, upscale: Upscaler, dataset: str, files: list[str], scales: list[int],
               save_dir: str | None, progress: bool, saved: set[tuple[int, str]], folders: _Folders) -> str | None:
    """Scores one set's `files`; adds each SR image written to `saved`. Returns `save_dir`, None once saving failed."""
    rounded_y = evaluation.rounded_y
    set_names = tuple(benchmark_sets.image_name(f) for f in files)
    missing_folders: set[int] = set()  # scales whose SR folder is missing: said once, not per image
    made_lr: dict[int, list[str]] = {}  # scale -> images whose LR_bicubic file was missing, so made
    gt_mod: dict[int, list[str]] = {}  # scale -> images whose SR image is HR cropped to a multiple of 12 (BasicSR's)
    if (message := benchmark_sets.completeness_warning(dataset, len(files))) is not None:
        _warn(evaluation, message)
    bar = tqdm(files, desc=dataset, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for path in bar:
        try:
            hr = images.decode(path).pixels
        except images.ImageError as e:
            _skip(evaluation, f"{dataset}: {e}")
            continue
        for scale in scales:
            if scale in missing_folders:
                continue
            try:
                pair = benchmark_sets.make_pair(dataset, path, hr, scale)
                pair.set_names = set_names
                with _inference_warnings() as notes:  # windows instead of the whole image: in the report
                    score, sr = _score_one(upscale, pair, path, rounded_y)
                evaluation.warnings += [f"{dataset} x{scale} {pair.name}: {note}" for note in notes]
            except (MissingFolderError, benchmark_sets.FolderError) as e:  # said once for the set
                missing_folders.add(scale)
                if isinstance(e, MissingFolderError) and folders.defer:
                    folders.missing.setdefault(scale, {})[dataset] = f"{dataset} x{scale}: {e}"
                else:
                    _skip(evaluation, f"{dataset} x{scale}: {e}")
                continue
            except (images.ImageError, ValueError, OSError) as e:
                folders.reached.add(scale)
                _skip(evaluation, f"{dataset} x{scale}: {e}")
                continue
            folders.reached.add(scale)
            if save_dir is not None:
                try:
                    images.write_image(os.path.join(save_dir, pair.dataset, f"x{scale}", f"{pair.name}.png"), sr)
                    saved.add((scale, pair.name))
                except OSError as e:  # a full disk: said once; the scores are what was asked for
                    _warn(evaluation, f"cannot save SR images in {save_dir} ({e.strerror or e}, at {dataset} "
                          f"x{scale} {pair.name}); scoring goes on without saving them")
                    save_dir = None
            if pair.lr_missing_from is not None and "lr" in vars(pair):  # made only when read: not by --sr_dir
                made_lr.setdefault(scale, []).append(pair.name)
            if (score.height, score.width) != pair.hr.shape[:2]:
                gt_mod.setdefault(scale, []).append(pair.name)
            evaluation.scores.append(score)
            bar.set_postfix_str(f"x{scale} {score.name} {score.psnr:.2f} dB", refresh=False)
    bar.close()
    for scale in scales:  # the mean of an infinite PSNR is inf, the set's score in the table: say why
        exact = [s.name for s in evaluation.scores if s.dataset == dataset and s.scale == scale and
                 np.isinf(s.psnr)]
        if exact:
            _warn(evaluation, f"{dataset} x{scale}: {len(exact)} image(s) reproduced exactly ("
                  f"{', '.join(exact[:5])}{', ...' if len(exact) > 5 else ''}): PSNR inf (MSE 0, the field's "
                  "value), so the set's mean PSNR is inf too; each image's is in the per-image scores")
    for scale, names in made_lr.items():
        folder = benchmark_sets.lr_folder(files[0], scale)
        _warn(evaluation, f"{dataset} x{scale}: {folder} lacks the LR file of {len(names)} of {len(files)} "
              f"images ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); made with MATLAB bicubic "
              "from HR instead")
    for scale, names in gt_mod.items():
        _warn(evaluation, f"{dataset} x{scale}: the SR images of {len(names)} of {len(files)} images ("
              f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) are the HR image cropped to a multiple of "
              f"{GT_MOD} (BasicSR's GTmod12 test sets): scored against HR cropped so at its top-left (BasicSR's "
              f"mod_crop), as BasicSR scores them, not against HR cropped to a multiple of {scale}")
    return save_dir


def _remove_stale_images(evaluation: Evaluation, save_dir: str, dataset: str, scales: list[int],
                         saved: set[tuple[int, str]], names: set[str]) -> None:
    """Removes the `<name>.png` files of `<save_dir>/<dataset>/x<scale>/` (`name` one of the set's image `names`, as
    --save_images names them) that this run did not write (`saved`): an earlier run's images of the images this one
    skipped or did not reach, which `--sr_dir` would score beside this run's (two models' images as one set, with no
    word of it). A warning names them. Files named otherwise (another tool's) are never touched."""
    for scale in scales:
        folder = os.path.join(save_dir, dataset, f"x{scale}")
        try:
            stale = sorted(f for f in os.listdir(folder) if f.endswith(".png") and os.path.splitext(f)[0] in names
                           and (scale, os.path.splitext(f)[0]) not in saved
                           and os.path.isfile(os.path.join(folder, f)))
        except OSError:  # no such folder: nothing saved there, by this run or another
            continue
        removed = []
        for f in stale:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, f))
                removed.append(f)
        if removed:
            _warn(evaluation, f"{dataset} x{scale}: removed {len(removed)} SR image(s) an earlier run saved in {folder}"
                  f" that this run did not write ({', '.join(removed[:5])}{', ...' if len(removed) > 5 else ''}): "
                  "the folder holds this run's images only")
        if len(removed) < len(stale):
            _warn(evaluation, f"{dataset} x{scale}: cannot remove {len(stale) - len(removed)} SR image(s) an earlier "
                  f"run saved in {folder} that this run did not write: the folder holds two runs' images")


class _Notes(std_logging.Handler):
    def __init__(self):
        super().__init__(std_logging.WARNING)
        self.notes: list[str] = []

    def emit(self, record: std_logging.LogRecord) -> None:
        self.notes.append(record.getMessage())


@contextlib.contextmanager
def _inference_warnings() -> Iterator[list[str]]:
    """The warnings `inference` logs meanwhile (an image upscaled in windows, which the GC block's global context
    makes differ slightly from whole-image output), for the report; they are printed as before."""
    handler, logger = _Notes(), std_logging.getLogger(inference.__name__)
    logger.addHandler(handler)
    try:
        yield handler.notes
    finally:
        logger.removeHandler(handler)


def _score_one(upscale: Upscaler, pair: Pair, path: str, rounded_y: bool) -> tuple[ImageScore, np.ndarray]:
    """The image's score and its SR image. An SR image of HR cropped to a multiple of 12 (`gt_mod_shape`) is scored
    against HR cropped so; its score's height and width say so."""
    sr = np.asarray(upscale(pair))
    if sr.dtype != np.uint8:
        raise ValueError(f"{path}: the SR function returned {sr.dtype}, expected uint8")
    if sr.shape[:2] != pair.hr.shape[:2] and sr.shape[:2] == gt_mod_shape(pair):  # BasicSR's GTmod12 output:
        pair = dataclasses.replace(pair, hr=pair.hr[: sr.shape[0], : sr.shape[1]])  # scored as BasicSR does
    if sr.shape[:2] != pair.hr.shape[:2]:
        raise ValueError(
            f"{path}: SR image is {sr.shape[1]}x{sr.shape[0]}, the HR image cropped to a multiple of {pair.scale} "
            f"is {pair.hr.shape[1]}x{pair.hr.shape[0]}"
        )
    psnr, ssim = benchmark_sets.score(sr, pair, rounded_y=rounded_y)
    return ImageScore(
        dataset=pair.dataset,
        scale=pair.scale,
        name=pair.name,
        psnr=psnr,
        ssim=ssim,
        height=pair.hr.shape[0],
        width=pair.hr.shape[1],
        gray=pair.is_gray,
    ), sr


def evaluate_bicubic(datasets: Sequence[str], scales: Sequence[int] = DEFAULT_SCALES, **kwargs) -> Evaluation:
    """The paper's Bicubic row: `imresize` up of the bicubic LR image. kwargs as `evaluate`."""
    return evaluate(bicubic_upscaler, datasets, scales, method="Bicubic", **kwargs)


def evaluate_sr_dir(
    sr_dir: str, datasets: Sequence[str], scales: Sequence[int] = DEFAULT_SCALES, **kwargs
) -> Evaluation:
    """Scores the SR images saved under `sr_dir` (see `sr_dir_upscaler`). kwargs as `evaluate` (`scales_present_only`:
    only the scales of `scales` that `sr_dir` holds images of, as `--sr_dir` without `--scales`)."""
    if kwargs.get("save_dir") and _same_folder(sr_dir, kwargs["save_dir"]):  # its stale-image removal: the inputs
        raise ValueError(f"save_dir {kwargs['save_dir']} is sr_dir: saving there would replace and remove its images")
    return evaluate(sr_dir_upscaler(sr_dir), datasets, scales, method=f"sr_dir:{sr_dir}", **kwargs)


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def evaluate_model(
    params: Mapping[str, Any],
    config: RNANConfig | None = None,
    datasets: Sequence[str] = DEFAULT_DATASETS,
    *,
    self_ensemble: bool = False,
    method: str = "RNAN",
    **kwargs,
) -> Evaluation:
    """Scores an RNAN (`params` of `rnan_jax.init`/`load`; `config` its `RNANConfig`, default read off
    `params`) at the model's scale, optionally with self-ensemble (reported as "<method>+").

    One image at a time, never batched, so large images (Urban100) fit. kwargs as `evaluate`.
    """
    config = config or api.infer_config(params)
    upscale = model_upscaler(params, config, self_ensemble=self_ensemble)
    name = method + ("+" if self_ensemble else "")
    return evaluate(upscale, datasets, (config.scale,), method=name, self_ensemble=self_ensemble, **kwargs)


def _parse_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def main(argv: Sequence[str]) -> None:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    chosen = [name for name in ("method", "sr_dir", "checkpoint") if FLAGS[name].value]
    if len(chosen) != 1:
        raise app.UsageError("give exactly one of --method bicubic, --sr_dir DIR, --checkpoint PATH")
    if FLAGS.save_images and not FLAGS.output:
        raise app.UsageError("--save_images needs --output DIR")
    if FLAGS.self_ensemble and not FLAGS.checkpoint:
        raise app.UsageError("--self_ensemble applies to a model (--checkpoint)")
    datasets = _parse_list(FLAGS.datasets)
    if not datasets:
        raise app.UsageError(f"--datasets names no set (e.g. {','.join(DEFAULT_DATASETS)})")
    data_dir = env.default_data_dir(FLAGS.data_dir)
    data_flag = "--data_dir" if FLAGS.data_dir else "$RNAN_DATA_DIR"
    for what, value in [(data_flag, data_dir), ("--sr_dir", FLAGS.sr_dir)] + [("--datasets", d) for d in datasets]:
        if (error := paths.url_error(what, value)) is not None:  # was "no such folder" of objects that are there
            sys.exit(f"evaluate: {error}")
    if FLAGS.output and (error := (cli.output_folder_error(FLAGS.output)
                                   or report.output_error(FLAGS.output, save_images=FLAGS.save_images))):
        sys.exit(f"evaluate: {error}")  # before any scoring, which may take hours
    if FLAGS.sr_dir and FLAGS.save_images and _same_folder(FLAGS.sr_dir, os.path.join(FLAGS.output,
                                                                                   report.IMAGES_FOLDER)):
        raise app.UsageError(f"--sr_dir {FLAGS.sr_dir} is --output's images folder, which --save_images rewrites "
                             "(and clears of the images not scored): give another --output, or leave out --save_images")
    if FLAGS.sr_dir and not os.path.isdir(FLAGS.sr_dir):
        sys.exit(f"evaluate: --sr_dir {FLAGS.sr_dir}: no such folder (expected <dataset>/x<scale>/<HR file name> "
                 "inside, or EDSR's results-<dataset>/<name>_x<scale>_SR.png, or BasicSR's <dataset>/<name>_<suffix "
                 "naming x<scale>>.png)")
    env.prepare_process()
    env.enable_compilation_cache()
    try:
        scales = list(dict.fromkeys(int(s) for s in _parse_list(FLAGS.scales))) or None
        if scales and min(scales) < 1:
            raise ValueError
    except ValueError:
        raise app.UsageError(f"--scales must be positive integers like 2,3,4, got {FLAGS.scales!r}") from None
    common = dict(
        data_dir=data_dir,
        rounded_y=FLAGS.rounded_y,
        save_dir=os.path.join(FLAGS.output, report.IMAGES_FOLDER) if FLAGS.save_images else None,
        progress=FLAGS.progress,
        allow_incomplete=FLAGS.allow_incomplete,
    )
    step = None  # the checkpoint step scored
    if FLAGS.checkpoint:
        if (problem := env.backend_problem()) is not None:  # JAX_PLATFORMS=cuda without a GPU: the
            sys.exit(f"evaluate: {problem}")  # checkpoint's restore failed, and was called "damaged"
        try:
            which = checkpoint.resolve_which(FLAGS.checkpoint, FLAGS.which)  # auto: what validation scored
            # the step read, named in the report: a run saving meanwhile makes --which ema one of several steps
            params, config, named = checkpoint.load_named(FLAGS.checkpoint, which=which)
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError naming the path
            sys.exit(f"evaluate: cannot load --checkpoint: {e}")
        if scales and scales != [config.scale]:
            raise app.UsageError(f"the checkpoint is an x{config.scale} model; --scales {FLAGS.scales} does not apply")
        run = functools.partial(evaluate_model, params, config, datasets, self_ensemble=FLAGS.self_ensemble)
        source = (checkpoint.named_source(FLAGS.checkpoint, which) + " --self_ensemble" * FLAGS.self_ensemble
                  + f" ({named.text})")  # a zoo file: what it records
        step = named.step
    elif FLAGS.sr_dir:  # no --scales: the scales it holds images of, the others named in a note
        run = functools.partial(evaluate_sr_dir, FLAGS.sr_dir, datasets, scales or DEFAULT_SCALES,
                                scales_present_only=not scales)
        source = f"--sr_dir {os.path.abspath(FLAGS.sr_dir)}"
    else:
        run = functools.partial(evaluate_bicubic, datasets, scales or DEFAULT_SCALES)
        source = "--method bicubic"
    signum = None
    try:
        with preemption.sigterm_raises():  # SIGTERM (a preemption, `timeout`) as Ctrl-C: what was scored is kept
            evaluation = run(**common)
    except Interrupted as e:  # the sets scored before Ctrl-C are reported and written, as if they were all
        evaluation, signum = e.evaluation, e.signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C again: stop now (it met JAX's exit with a traceback)
        print(file=sys.stderr)
    evaluation.source = source  # in the report: which parameters (--which, the step) a result is of
    evaluation.step = step
    print(report.markdown_table(evaluation, skipped=False))  # the skips are listed below it, once
    if FLAGS.output:
        try:
            for path in report.write_report(evaluation, FLAGS.output):
                logging.info("wrote %s", path)
        except OSError as e:  # e.g. a full disk; the table above holds the numbers
            sys.exit(f"evaluate: --output {FLAGS.output}: cannot write the report ({e})")
    if evaluation.skipped:  # here, one a line; results.md and results.json have them too
        print(f"\n{len(evaluation.skipped)} skipped:", *evaluation.skipped, sep="\n  ", file=sys.stderr)
        for message in evaluation.incomplete():
            print(f"incomplete: {message}", file=sys.stderr)
    if signum is not None:
        detail = (f"after {len(evaluation.scores)} image score(s); the table holds the sets scored in full"
                  + (f", written to {FLAGS.output}" if FLAGS.output else ""))
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(detail)
        print(f"evaluate: {signal.Signals(signum).name}: {detail}", file=sys.stderr)
        sys.exit(128 + signum)  # 143, as if SIGTERM had ended the process
    if evaluation.skipped or not evaluation.scores:
        sys.exit(1)  # something could not be scored: the table above is not the whole job


def _define_flags() -> None:
    flags.DEFINE_enum("method", None, ["bicubic"], "A fixed method to score.")
    flags.DEFINE_string("sr_dir", None, "Score the SR images in DIR/<dataset>/x<scale>/<HR file name>, EDSR's "
                        "DIR/results-<dataset>/<name>_x<scale>_SR.png or BasicSR's DIR/<dataset>/<name>_<suffix "
                        "naming the scale>.png.")
    flags.DEFINE_string("checkpoint", None, "Score an RNAN checkpoint: a training workdir, a checkpoint "
                        "path, or zoo:NAME (shipped weights, e.g. zoo:small_x2) or a zoo file's path.")
    flags.DEFINE_enum("which", "auto", list(checkpoint.CLI_WHICH), checkpoint.WHICH_HELP)
    flags.DEFINE_string("datasets", ",".join(DEFAULT_DATASETS), "Comma-separated benchmark sets: names under "
                        "<data_dir>/benchmark/<name>/HR, or folder paths (holding HR/, or the HR images themselves).")
    flags.DEFINE_string(
        "data_dir", None, "Folder holding benchmark/<set>/HR (default $RNAN_DATA_DIR or ../shared/data)."
    )
    flags.DEFINE_string("scales", None, "Comma-separated scales (default 2,3,4: with --sr_dir, those of them it holds "
                        "images of, the others named in a note; a checkpoint uses its own scale).")
    flags.DEFINE_bool("self_ensemble", False, "Average the 8 flips/rotations (RNAN+).")
    flags.DEFINE_bool("allow_incomplete", False, "Report a set scored on fewer images than it holds (some "
                      "skipped), labelled with its image count; by default such a set gets no score.")
    flags.DEFINE_bool(
        "rounded_y", True, "Round Y to integers as MATLAB's uint8 rgb2ycbcr does (--norounded_y: as RCAN's script)."
    )
    cli.define_local_output("output", None, "Write results.json, results.md and per_image.csv here.")
    flags.DEFINE_bool("save_images", False, "Also write the SR images to <output>/images/<dataset>/x<scale>/.")
    flags.DEFINE_bool("progress", True, "Show a progress bar per dataset.")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
