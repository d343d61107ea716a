"""Upscales image files with a trained RNAN checkpoint.

    python -m rnan_jax.upscale --checkpoint WORKDIR photos/ extra.jpg --output out/ [--tile 256]
        [--overlap 32] [--self_ensemble] [--which auto|latest|best|ema] [--noprogress]

Inputs are image files (anything Pillow reads) or folders (their files with an `images.READABLE_EXTENSIONS`
extension, GIF included, not recursing: subfolders holding images are named in a note; not hidden ones such as
macOS's `._name.png`, nor, with a note, upscaled outputs of the folder's other files at any scale: `a_x4.png`
beside `a.png`, 4 times its size). Of an animated file the first frame is upscaled, with a note; a file that is
another input under a second name (a link) once, with a note. Each `<name>.<ext>` is written as
`<output>/<name>_x<scale>.png`: PNG always, so outputs are lossless and keep grayscale, alpha and bit depth,
and the colour profile (ICC) and resolution (dpi). Gray stays gray; alpha is upscaled with
MATLAB-style bicubic `imresize`; 16-bit input goes into the model at full precision and comes out as a 16-bit
PNG (8-bit input as 8-bit). The colour of fully transparent pixels (alpha 0: of a cut-out, a palette's or
colour key's transparent entry), which no viewer shows and is often black or garbage, is first replaced by
that of the nearest visible pixel, so that it does not bleed into the visible edge as a dark or coloured fringe:
visible pixels come out the same whatever colour was hidden, and an image without fully transparent pixels
(alpha opaque everywhere) comes out exactly as its colour alone would.
Inputs that differ only in extension (`a.png`, `a.jpg`) are written as `<name>_<ext>_x<scale>.png`, with a
note; outputs whose names differ only in case (`a.png`, `A.png` in two folders), one file on a case-insensitive
disk (macOS, Windows), are refused as one name in two folders is. An input that is where another input's output
goes and is that input's size times the scale (an earlier run's output, in a rerun with --output the input folder)
is not upscaled, with a note, and is replaced. Any other
output path that is one of the inputs is never written (that file is reported as failed), nor is
one that another input of the same run produces; outputs of earlier runs are replaced, each only once its
new file is complete. A file that cannot be read, upscaled or written is reported by name in one line and
the rest go on (a full disk stops the run there, saying how many were not attempted); the exit status is 1
if any input failed, 2 for an unusable checkpoint or --output. The parameters read (`--which auto`: those the
run's validation scored) are named as evaluate names them, with the step read: `Upscaling with: --checkpoint RUN
--which ema (step 8)`; of a zoo file, what it records: `--checkpoint zoo:NAME (the run's ema at step 2000)`.
`--noprogress` leaves out the progress bars (scripts, CI logs), as evaluate's does.

`--overlap` defaults to 32 LR pixels, or half of a `--tile` of 64 or less.
Without `--tile` each image is upscaled whole (device memory grows with the image: about 13 KiB per LR
pixel for the paper's x4 model); one that does not fit is tiled automatically, in the largest window that
fits (a warning says which; on a CPU before it runs, by its compiled program's memory against the host's).
`--tile` bounds memory by the window (a second progress bar counts windows); the output then differs
slightly from whole-image output because the GC block sees each window's context, not the image's
(tools/BENCHMARKS.md, "Inference: tiling", measures by how much).
"""
from __future__ import annotations

import collections
import errno
import os
import re
import sys
from typing import Sequence

import jax
import numpy as np
from absl import app, flags
from scipy import ndimage
from tqdm import tqdm

from rnan_jax import checkpoint, cli, degrade, env, images, inference, paths
from rnan_jax.checkpoint import CLI_WHICH, WHICH_HELP, CheckpointError
from rnan_jax.model import RNANConfig


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image files, error messages): folders are replaced by their image files, in order, without repeats."""
    files, errors, _ = expand(inputs)
    return files, errors


def expand(inputs: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """`expand_inputs`, with notes: a folder scan leaves out the files that are upscaled outputs of its other
    files (`scanned_outputs`) unless they are named as inputs too, and a file that is another input under a second
    name (a link to it) is upscaled once, under the first name, with a note."""
    named = {os.path.realpath(p) for p in inputs if not paths.is_url(p) and not os.path.isdir(p)}
    files, errors, notes, seen, again = [], [], [], {}, {}
    for path in inputs:
        if (error := paths.url_error("input", path)) is not None:  # was "no such file" of an object that is there
            errors.append(error)
            continue
        try:
            found = images.list_images(path, images.READABLE_EXTENSIONS) if os.path.isdir(path) else [path]
        except images.ImageError as e:
            errors.append(str(e))
            continue
        if os.path.isdir(path):
            outputs = [f for f in scanned_outputs(found) if os.path.realpath(f) not in named]
            if outputs:  # `a_x4.png` beside `a.png` (an earlier run's --output was this folder): upscaled again
                names = [os.path.basename(f) for f in outputs]
                notes.append(f"{path}: left out {len(names)} file(s) that are upscaled outputs of its other images "
                             f"(NAME_x<scale>.png, <scale> times NAME's size: {', '.join(names[:5])}"
                             f"{', ...' if len(names) > 5 else ''}): name them as inputs to upscale them (one "
                             "that is where an input's output goes, --output this folder, is replaced instead)")
                found = [f for f in found if f not in outputs]
        for f in found:
            real = os.path.realpath(f)
            if real not in seen:
                seen[real] = f
                files.append(f)
            elif os.path.abspath(f) != os.path.abspath(seen[real]):  # b.png -> a.png: b_x2.png was never written
                again.setdefault(os.path.abspath(f), f"{f} (= {seen[real]})")
    if again:
        pairs = list(again.values())
        notes.append(f"{len(pairs)} input(s) are the same file as an earlier one under another name (a link), and "
                     f"are upscaled once, under the earlier name: {', '.join(pairs[:5])}{', ...' * (len(pairs) > 5)}")
    return files, errors, notes


def scanned_outputs(files: Sequence[str]) -> list[str]:
    """Those of a folder's `files` that are upscaled outputs of others of them at any scale: named as
    `output_path` names them in that folder (`a_x4.png`, `a_png_x4.png` of `a.png`), and that file's size
    times the scale."""
    scales = {int(m.group(1)) for f in files if (m := re.search(r"_x(\d+)\.png$", os.path.basename(f)))}
    outputs: set[str] = set()
    for scale in sorted(s for s in scales if s >= 2):
        outputs.update(earlier_outputs(files, os.path.dirname(files[0]), scale))
    return [f for f in files if f in outputs]


def _holds_images(folder: str) -> bool:
    """Whether `folder` directly holds a file a folder scan takes (`images.list_images`' rule)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.name.lower().endswith(images.READABLE_EXTENSIONS) and not e.name.startswith(".")
                       and e.is_file() for e in entries)
    except OSError:
        return False


def left_out_notes(inputs: Sequence[str], output_dir: str | None = None) -> list[str]:
    """A note per input folder holding files of a format Pillow reads whose extension a folder scan does not take
    (JPEG 2000's .jp2, .ico, .psd, ...), and one per input folder with subfolders holding images (the scan does not
    recurse; `output_dir` aside): they were left out without a word, the run saying it wrote the others."""
    from PIL import Image

    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    output = None if output_dir is None else os.path.realpath(output_dir)
    notes = []
    for folder in inputs:
        if paths.is_url(folder) or not os.path.isdir(folder):
            continue
        try:
            listed = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        except OSError:
            continue  # said by expand_inputs
        names = [n for n in listed if os.path.splitext(n)[1].lower() in readable - set(images.READABLE_EXTENSIONS)
                 and os.path.isfile(os.path.join(folder, n))]
        if names:
            notes.append(f"{folder}: left out {len(names)} file(s) of formats a folder scan does not take "
                         f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): name them as inputs to "
                         "upscale them")
        subfolders = [n for n in listed if os.path.isdir(sub := os.path.join(folder, n))
                      and os.path.realpath(sub) != output and _holds_images(sub)]
        if subfolders:
            notes.append(f"{folder}: left out {len(subfolders)} subfolder(s) holding images "
                         f"({', '.join(subfolders[:5])}{', ...' if len(subfolders) > 5 else ''}): a folder scan "
                         "does not recurse; name them as inputs to upscale their images")
    return notes


def output_path(input_path: str, output_dir: str, scale: int, *, with_extension: bool = False) -> str:
    """`<output_dir>/<stem>_x<scale>.png`, or `<stem>_<ext>_x<scale>.png` `with_extension`."""
    stem, ext = os.path.splitext(os.path.basename(input_path))
    if with_extension and ext:
        stem = f"{stem}_{ext[1:].lower()}"
    return os.path.join(output_dir, f"{stem}_x{scale}.png")


def _upright_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image file as `images.decode` turns it (EXIF orientation), from its header; None for
    a file that is not an image Pillow reads."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # not an image (or gone): not an earlier output
        return None
    return (h, w) if images.exif_orientation(path) in (5, 6, 7, 8) else (w, h)


def earlier_outputs(files: Sequence[str], output_dir: str, scale: int) -> dict[str, str]:
    """{input: the input it is an earlier output of}: inputs that are where this run writes (or, named by extension
    or not, would write) another input's output, and are that input's size times `scale`. A rerun with --output
    the input folder took its own outputs as inputs: `a_x2.png` was upscaled to `a_x2_x2.png`, and `a.png`
    refused (its output an input file)."""
    by_output: dict[str, list[str]] = collections.defaultdict(list)
    for f in files:
        for with_extension in (False, True):
            by_output[os.path.realpath(output_path(f, output_dir, scale, with_extension=with_extension))].append(f)
    earlier = {}
    for f in files:
        sources = [g for g in by_output.get(os.path.realpath(f), ()) if g != f]
        if sources and (size := _upright_size(f)) is not None:
            for g in sources:
                if (source := _upright_size(g)) is not None and size == (source[0] * scale, source[1] * scale):
                    earlier[f] = g
                    break
    return earlier


def _folded(path: str) -> str:
    """`path`'s real path with its name case-folded: the file it names on a case-insensitive disk (macOS, Windows,
    their shares), where `A_x2.png` is `a_x2.png`."""
    folder, name = os.path.split(os.path.realpath(path))
    return os.path.join(folder, name.casefold())


def plan(files: Sequence[str], output_dir: str, scale: int
         ) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """([(input, output)], error messages, notes), refusing any output that is an input or is another input's
    output, also where the names differ only in case (one file on a case-insensitive disk, which a run on a
    case-sensitive one may write to). Inputs whose plain outputs would be the same file get their extension in
    the name (a note each) where that tells them apart (a.png and A.jpg; not a.png in two folders, of which the
    second is refused). Inputs that are earlier outputs of other inputs (`earlier_outputs`) are left out, with a
    note."""
    earlier = earlier_outputs(files, output_dir, scale)
    names = list(earlier)
    left_out = [f"left out {len(names)} input(s) that are earlier outputs of other inputs (named after them, "
                f"{scale}x their size): {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"] if names else []
    files = [f for f in files if f not in earlier]
    inputs = {os.path.realpath(f) for f in files}
    folded_inputs = {_folded(f): os.path.realpath(f) for f in reversed(files)}  # the first of each
    plain = [_folded(output_path(f, output_dir, scale)) for f in files]
    extended = [_folded(output_path(f, output_dir, scale, with_extension=True)) for f in files]
    plain_uses, extended_uses = collections.Counter(plain), collections.Counter(extended)  # not a scan per file
    taken: dict[str, tuple[str, str]] = {}
    jobs, errors, notes = [], [], []
    case = ", which a case-insensitive disk (macOS, Windows) takes for the same file"
    for f, first, named in zip(files, plain, extended):
        by_extension = plain_uses[first] > 1 and extended_uses[named] == 1
        out = output_path(f, output_dir, scale, with_extension=by_extension)
        real, key = os.path.realpath(out), _folded(out)
        if real in inputs or key in folded_inputs:
            what = ("is an input file" if real in inputs
                    else f"differs only in case from the input file {folded_inputs[key]}{case}")
            errors.append(f"{f}: its output {out} {what}; not overwriting it (choose another --output)")
        elif key in taken:
            other, other_out = taken[key]
            what = (f"is also that of {other}" if os.path.realpath(other_out) == real
                    else f"differs only in case from {other_out}, that of {other}{case}")
            errors.append(f"{f}: its output {out} {what}; rename one of them")
        else:
            taken[key] = f, out
            jobs.append((f, out))
            if by_extension:
                others = [g for g, p in zip(files, plain) if p == first and g != f]
                notes.append(f"{f}: written as {out}, since {', '.join(others)} would have the same output name")
    return jobs, errors, left_out + notes


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-style bicubic upscaling of a uint8 or uint16 alpha [H, W], rounded and clipped to its type."""
    if alpha.dtype == np.uint8:
        return degrade.imresize(alpha, scale)
    out = degrade.round_half_up(degrade.imresize(alpha.astype(np.float64), scale))
    return np.clip(out, 0, np.iinfo(alpha.dtype).max).astype(alpha.dtype)


def fill_transparent(pixels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`pixels` [H, W(, 3)] with the colour of each fully transparent pixel (`alpha` [H, W] 0) replaced by that of
    the nearest pixel with alpha > 0; `pixels` itself where no pixel, or every pixel, is fully transparent.

    The network's output at a visible edge depends on its transparent neighbours' colour, which the file holds
    but nobody sees (black, white, a colour key's magenta): upscaled as stored, it shows as a fringe (a white
    disc on transparent black came out with a grey rim, fully opaque pixels of it as dark as 152/255).
    Premultiplying by alpha instead leaves a fringe too, since the network's edge is not the bicubic alpha's."""
    hidden = alpha == 0
    if not hidden.any() or hidden.all():
        return pixels
    rows, cols = ndimage.distance_transform_edt(hidden, return_distances=False, return_indices=True)
    return pixels[rows, cols]


class OutputFull(images.ImageError):
    """The output's filesystem is full (or over quota): no later image can be written either."""


def upscale_file(params: inference.Params, config: RNANConfig, src: str, dst: str, *,
                 max_pixels: int | None = images.DEFAULT_MAX_PIXELS, **kwargs) -> int:
    """Reads `src`, upscales its colour (gray stays gray; fully transparent pixels' colour filled in by
    `fill_transparent`) and alpha at the file's bit depth, writes `dst` with the file's colour profile and
    resolution (its dpi, as image editors keep it when scaling: the print grows by the scale).
    kwargs as `upscale_image`. Returns the file's frame count (its first frame is what was upscaled).

    Raises `images.ImageError` naming `src` for an unreadable file, one above `max_pixels` pixels, or an
    output that cannot be written (`OutputFull` when its disk is full)."""
    decoded = images.decode(src, max_pixels=max_pixels, high_bit_depth=True)
    pixels = decoded.pixels if decoded.alpha is None else fill_transparent(decoded.pixels, decoded.alpha)
    sr = inference.upscale_image(params, pixels, config=config, **kwargs)
    alpha = None if decoded.alpha is None else upscale_alpha(decoded.alpha, config.scale)
    try:
        images.write_image(dst, sr, alpha, icc_profile=decoded.icc_profile, dpi=decoded.dpi)
    except OSError as e:  # a full disk, a folder in the way: the partial file is gone, an earlier `dst` kept
        error = OutputFull if e.errno in (errno.ENOSPC, errno.EDQUOT) else images.ImageError
        raise error(f"{src}: cannot write {dst} ({e.strerror or e})") from None
    return decoded.frames


def main(argv: Sequence[str]) -> None:
    FLAGS = flags.FLAGS
    if len(argv) < 2:
        raise app.UsageError("give one or more input images or folders")
    overlap = FLAGS.overlap if FLAGS["overlap"].present else inference.default_overlap(FLAGS.tile)
    if FLAGS.tile is not None and overlap >= FLAGS.tile:
        raise app.UsageError(f"--overlap ({overlap}) must be smaller than --tile ({FLAGS.tile})")
    if not os.path.exists(FLAGS.output) and FLAGS.output.lower().endswith(images.READABLE_EXTENSIONS):
        # `--output big.jpg` made a folder big.jpg/ holding <name>_x<scale>.png, and said it wrote to big.jpg
        print(f"upscale: --output {FLAGS.output}: is the folder the upscaled images go into (as "
              "<name>_x<scale>.png), not an image file; name a folder", file=sys.stderr)
        sys.exit(2)
    env.prepare_process()
    env.enable_compilation_cache()
    if (problem := env.backend_problem()) is not None:  # JAX_PLATFORMS=cuda without a GPU: the checkpoint's
        print(f"upscale: {problem}", file=sys.stderr)  # restore failed, and was called "damaged"
        sys.exit(2)
    try:
        which = checkpoint.resolve_which(FLAGS.checkpoint, FLAGS.which)  # auto: what validation scored
        params, config, named = checkpoint.load_named(FLAGS.checkpoint, which=which)  # and the step read
    except CheckpointError as e:
        print(f"upscale: cannot load --checkpoint: {e}", file=sys.stderr)
        sys.exit(2)
    files, errors, scan_notes = expand(argv[1:])
    jobs, plan_errors, notes = plan(files, FLAGS.output, config.scale)
    errors += plan_errors
    notes = left_out_notes(argv[1:], FLAGS.output) + scan_notes + notes
    for message in errors:
        print(f"failed: {message}", file=sys.stderr)
    for message in notes:
        print(f"note: {message}", file=sys.stderr)
    if (error := cli.output_folder_error(FLAGS.output)) is not None:
        print(f"upscale: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"Upscaling with: {checkpoint.named_source(FLAGS.checkpoint, which)} ({named.text})",
          file=sys.stderr)  # as evaluate's "Scored:"
    done, not_attempted = 0, 0
    bar = tqdm(jobs, desc=f"x{config.scale}", unit="image", file=sys.stderr, disable=not FLAGS.progress)
    for k, (src, dst) in enumerate(bar):
        windows = None

        def progress(count: int, total: int) -> None:  # a tiled image: a second bar counting its windows
            nonlocal windows
            if windows is None:
                windows = tqdm(total=total, desc=os.path.basename(src), unit="window", leave=False, file=sys.stderr,
                               disable=not FLAGS.progress)
            windows.update(count - windows.n)

        try:
            frames = upscale_file(params, config, src, dst, tile=FLAGS.tile, overlap=overlap,
                                  self_ensemble=FLAGS.self_ensemble, progress=progress,
                                  max_pixels=FLAGS.max_image_pixels or None)
            done += 1
            if frames > 1:
                tqdm.write(f"note: {src}: has {frames} frames; upscaled the first", file=sys.stderr)
        except (images.ImageError, OSError, ValueError, jax.errors.JaxRuntimeError, MemoryError) as e:
            # JaxRuntimeError: typically out of device memory, after upscale_image's own fallback to tiles.
            # MemoryError: a host array too large for this machine (NumPy's "Unable to allocate 412. MiB for an
            # array with shape (6000, 6000, 3)", or Pillow's while decoding): one image, not the run.
            message = str(e) if isinstance(e, images.ImageError) else f"{src}: {type(e).__name__}: {e}"
            if isinstance(e, jax.errors.JaxRuntimeError) and inference.is_out_of_memory(e):
                message = f"{src}: out of device memory " + (
                    f"with --tile {FLAGS.tile}: try a smaller one" if FLAGS.tile
                    else f"even in {min(inference.FALLBACK_TILES)}-pixel windows")
            elif isinstance(e, MemoryError):
                message = f"{src}: out of host memory ({str(e) or 'MemoryError'})" + (
                    "" if FLAGS.tile else "; --tile 512 keeps less of the image in memory at once")
            errors.append(message)
            tqdm.write(f"failed: {message}", file=sys.stderr)
            if isinstance(e, OutputFull):  # every later image would be computed, then fail the same way
                not_attempted = len(jobs) - k - 1
                break
        finally:
            if windows is not None:
                windows.close()
    bar.close()
    print(f"wrote {done} image(s) to {FLAGS.output}" + (f"; {len(errors)} failed" if errors else "") + (
          f"; stopped with the disk full: {not_attempted} not attempted" if not_attempted else ""), file=sys.stderr)
    if errors:
        sys.exit(1)


def _define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "A training workdir, one checkpoint step's folder, or "
                        "zoo:NAME (shipped weights, e.g. zoo:small_x2) or a zoo file's path.", required=True)
    cli.define_local_output("output", None, "Folder for the upscaled images (created).", required=True)
    flags.DEFINE_enum("which", "auto", list(CLI_WHICH), WHICH_HELP)
    flags.DEFINE_integer("tile", None, "Upscale in overlapping TILE x TILE LR windows, bounding device memory "
                         "(default: whole images).", lower_bound=1)
    flags.DEFINE_integer("overlap", inference.DEFAULT_OVERLAP, "LR pixels shared by neighbouring windows "
                         "(default: 32, or half of a --tile of 64 or less).", lower_bound=0)
    flags.DEFINE_bool("self_ensemble", False, "Average the 8 flips/rotations (RNAN+; 8x slower).")
    flags.DEFINE_integer("max_image_pixels", images.DEFAULT_MAX_PIXELS, "Refuse (per file, the rest going on) "
                         "images of more pixels than this, a guard against decompression bombs; 0: no limit.",
                         lower_bound=0)
    flags.DEFINE_bool("progress", True, "Show a progress bar (and one of windows for a tiled image); --noprogress "
                      "for scripts and CI logs.")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
