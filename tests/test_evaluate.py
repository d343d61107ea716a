"""The evaluation script: the paper's Bicubic row, odd inputs, the output files, sr_dir and the model path."""
import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data

from rnan_jax import RNANConfig, apply, benchmark_sets, degrade, images, init, metrics, report
from rnan_jax.ensemble import inverse_transform, transform
from rnan_jax.evaluate import evaluate_bicubic, evaluate_model, evaluate_sr_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Table 1's Bicubic row (paper) and an independent implementation of the same conventions (DESIGN.md).
PAPER_BICUBIC = {
    "Set5": {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)},
    "Set14": {2: (30.24, 0.8688), 3: (27.55, 0.7742), 4: (26.00, 0.7027)},
}
PSNR_TOLERANCE = {"Set5": 0.015, "Set14": 0.02}
INDEPENDENT_BICUBIC = {
    "Set5": {2: (33.649, 0.9295), 3: (30.386, 0.8679), 4: (28.419, 0.8102)},
    "Set14": {2: (30.224, 0.8685), 3: (27.533, 0.7738), 4: (25.993, 0.7024)},
}


def test_bicubic_reproduces_the_papers_row(data_dir):
    evaluation = evaluate_bicubic(["Set5", "Set14"], (2, 3, 4), data_dir=data_dir, progress=False)
    assert evaluation.skipped == [] and evaluation.warnings == []
    summary = evaluation.summary()
    for dataset, rows in PAPER_BICUBIC.items():
        for scale, (psnr, ssim) in rows.items():
            got = summary[dataset][f"x{scale}"]
            assert got["images"] == {"Set5": 5, "Set14": 14}[dataset]
            assert got["psnr"] == pytest.approx(psnr, abs=PSNR_TOLERANCE[dataset]), (dataset, scale)
            assert got["ssim"] == pytest.approx(ssim, abs=0.0005), (dataset, scale)
            ind_psnr, ind_ssim = INDEPENDENT_BICUBIC[dataset][scale]
            assert got["psnr"] == pytest.approx(ind_psnr, abs=0.0006), (dataset, scale)
            assert got["ssim"] == pytest.approx(ind_ssim, abs=0.00006), (dataset, scale)


def _hr_dir(root, dataset):
    d = os.path.join(root, "benchmark", dataset, "HR")
    os.makedirs(d, exist_ok=True)
    return d


def _rgb(h, w, top=100, left=150):
    return np.ascontiguousarray(data.astronaut()[top : top + h, left : left + w])


def _make_odd_dataset(root):
    """Tiny/HR: rgb, rgba (same colours plus alpha), gray, gray16 (gray at 16 bits), a corrupt file, a 1x5 image."""
    hr = _hr_dir(root, "Tiny")
    rgb = _rgb(40, 37)
    gray = np.ascontiguousarray(data.camera()[200:236, 220:250])
    Image.fromarray(rgb).save(os.path.join(hr, "rgb.png"))
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(os.path.join(hr, "rgba.png"))
    Image.fromarray(gray).save(os.path.join(hr, "gray.png"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(os.path.join(hr, "gray16.png"))
    with open(os.path.join(hr, "corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.fromarray(np.zeros((1, 5, 3), np.uint8)).save(os.path.join(hr, "tiny.png"))
    return rgb, gray


def _bicubic_psnr(hr, scale):
    hr = degrade.modcrop(hr, scale)
    return metrics.psnr_y(degrade.imresize(degrade.bicubic_lr(hr, scale), scale), hr, scale)


def test_cli_misuse_is_one_line(tmp_path):
    """A flag combination that cannot work ends in one line naming it (exit 1), not absl's whole help text, and
    the same for upscale's and the export tool's checks (rnan_jax.cli.run)."""
    cases = ((["-m", "rnan_jax.evaluate", "--method", "bicubic", "--self_ensemble"],
              "evaluate: error: --self_ensemble applies to a model (--checkpoint) (see --helpshort)"),
             (["-m", "rnan_jax.evaluate", "--method", "bicubic", "--scales", "2,x"],
              "evaluate: error: --scales must be positive integers like 2,3,4, got '2,x' (see --helpshort)"),
             (["-m", "rnan_jax.upscale", "--checkpoint", "zoo:small_x2", "--output", str(tmp_path)],
              "upscale: error: give one or more input images or folders (see --helpshort)"),
             (["tools/export.py", "--checkpoint", "zoo:small_x2", "--fixed_size", "3", "--output", str(tmp_path)],
              "export: error: --fixed_size must be H,W (positive integers), got '3' (see --helpshort)"))
    for args, line in cases:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stderr.strip().splitlines(), proc.stdout) == (1, [line], "")
    # an --output that cannot be a folder is refused before any scoring
    in_the_way = tmp_path / "results.txt"
    in_the_way.write_text("")
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--method", "bicubic", "--output",
                           str(in_the_way)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr.strip().splitlines(), proc.stdout) == (
        1, [f"evaluate: --output {in_the_way}: is a file, not a folder"], "")


def test_cli_refuses_a_missing_sr_dir_and_report_files_in_the_way_before_scoring(tmp_path):
    (tmp_path / "out" / "results.json").mkdir(parents=True)
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "images").write_text("")
    url = "a URL, but this takes a local path only (copy the files here first, e.g. gcloud storage cp -r, and give " \
          "the local path)"  # it was "no such folder" of objects that are there
    cases = ((["--sr_dir", str(tmp_path / "nope")],
              f"evaluate: --sr_dir {tmp_path}/nope: no such folder (expected <dataset>/x<scale>/<HR file name> "
              "inside, or EDSR's results-<dataset>/<name>_x<scale>_SR.png, or BasicSR's "
              "<dataset>/<name>_<suffix naming x<scale>>.png)"),
             (["--sr_dir", "gs://bucket/sr"], f"evaluate: --sr_dir gs://bucket/sr: {url}"),
             (["--method", "bicubic", "--datasets", "Set5,gs://bucket/Set14"],
              f"evaluate: --datasets gs://bucket/Set14: {url}"),
             (["--method", "bicubic", "--output", str(tmp_path / "out")],
              f"evaluate: --output {tmp_path}/out: {tmp_path}/out/results.json is a folder, in the way of the "
              "report file"),
             (["--method", "bicubic", "--output", str(tmp_path / "out2"), "--save_images"],
              f"evaluate: --output {tmp_path}/out2: {tmp_path}/out2/images is a file, in the way of "
              "--save_images' folder"))
    for args, line in cases:
        proc = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--data_dir", str(tmp_path / "nowhere"),
                               *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stderr.strip().splitlines(), proc.stdout) == (1, [line], "")


def test_cli_on_odd_inputs(tmp_path):
    rgb, gray = _make_odd_dataset(str(tmp_path))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rnan_jax.evaluate", "--method", "bicubic", "--data_dir", str(tmp_path),
           "--datasets", "Tiny,Missing", "--scales", "2,3", "--output", str(out), "--save_images", "--noprogress",
           "--allow_incomplete"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # images were skipped: the exit status says so

    results = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)
    assert set(results) == {"Tiny", "conventions", "run"}
    assert results["Tiny"]["x2"]["images"] == 4 and results["Tiny"]["x3"]["images"] == 4
    assert results["Tiny"]["x2"]["of"] == 6
    assert "Tiny x2: 4 of 6 images scored" in "\n".join(results["run"]["warnings"])
    assert results["conventions"]["y_rounding"] == "rounded" and results["conventions"]["shave"] == "scale"
    skipped = "\n".join(results["run"]["skipped"])
    assert "corrupt.png" in skipped and "Missing" in skipped
    assert f"dataset Missing: {tmp_path}/benchmark/Missing/HR: no such folder; the sets in {tmp_path}/benchmark: " \
        "Tiny (a set is <data_dir>/benchmark/<name>/HR/*.png (LR_bicubic/X<s>/ beside HR is optional), or give the " \
        "set's folder as a path: one holding HR/, or the HR images themselves)" in skipped
    assert "tiny.png: image is 5x1, smaller than the scale x2" in skipped
    assert "tiny.png: image is 5x1, smaller than the scale x3" in skipped
    assert "corrupt.png" in proc.stderr and "Missing" in proc.stderr

    with open(out / "per_image.csv") as f:
        rows = {(r["image"], int(r["scale"])): r for r in csv.DictReader(f)}
    assert len(rows) == 8
    for scale in (2, 3):
        assert float(rows["rgb", scale]["psnr"]) == pytest.approx(_bicubic_psnr(rgb, scale), abs=1e-5)
        assert rows["rgba", scale]["psnr"] == rows["rgb", scale]["psnr"]  # alpha dropped
        assert float(rows["gray", scale]["psnr"]) == pytest.approx(_bicubic_psnr(gray, scale), abs=1e-5)
        assert rows["gray16", scale]["psnr"] == rows["gray", scale]["psnr"]  # 16 bits scaled to 8
        assert rows["gray", scale]["gray"] == "1" and rows["rgb", scale]["gray"] == "0"
    assert rows["rgb", 3]["height"] == "39" and rows["rgb", 3]["width"] == "36"

    table = (out / "results.md").read_text()
    assert table.startswith("| Method | Tiny ×2 (4 of 6 images) | Tiny ×3 (4 of 6 images) |")
    x2 = results["Tiny"]["x2"]
    assert f"| Bicubic | {x2['psnr']:.3f}/{x2['ssim']:.4f}".replace("/0.", "/.") in table
    saved = np.asarray(Image.open(out / "images" / "Tiny" / "x3" / "rgb.png"))
    assert saved.shape == (39, 36, 3)
    assert np.asarray(Image.open(out / "images" / "Tiny" / "x2" / "gray.png")).shape == (36, 30)


def test_sr_dir_scores_saved_images_and_exact_ones_are_infinite(tmp_path):
    root = str(tmp_path)
    _make_odd_dataset(root)
    saved = str(tmp_path / "sr")
    bicubic = evaluate_bicubic(["Tiny"], (2, 4), data_dir=root, save_dir=saved, progress=False)
    rescored = evaluate_sr_dir(saved, ["Tiny"], (2, 4), data_dir=root, progress=False)
    assert rescored.scores == bicubic.scores and len(rescored.scores) == 8

    # The HR images themselves (cropped) as a method's output: PSNR is infinite, written as "inf".
    exact_dir = tmp_path / "exact" / "Tiny" / "X2"
    exact_dir.mkdir(parents=True)
    hr = _rgb(40, 37)
    Image.fromarray(hr[:40, :36]).save(exact_dir / "rgb.png")
    exact = evaluate_sr_dir(str(tmp_path / "exact"), ["Tiny"], (2,), data_dir=root, progress=False,
                            allow_incomplete=True)
    assert [s.name for s in exact.scores] == ["rgb"]
    assert exact.scores[0].psnr == float("inf") and exact.scores[0].ssim == pytest.approx(1.0)
    assert f"Tiny x2: {exact_dir}: no SR image of gray (looked for gray.*, gray_x2_SR.*, grayx2.*, gray_x2.*)" \
        in exact.skipped
    paths = report.write_report(exact, str(tmp_path / "report"))
    results = json.loads(open(paths[0]).read(), parse_constant=pytest.fail)
    assert results["Tiny"]["x2"] == {"psnr": "inf", "ssim": pytest.approx(1.0), "images": 1, "of": 6}
    assert "| inf/1.0000 |" in open(paths[1]).read()
    assert "Tiny,2,rgb,inf,1.000000,40,36,0" in open(paths[2]).read()


def _one_score_evaluation(name="bird", images_scored=1):
    evaluation = report.Evaluation(method="Bicubic", listed={"Set5": images_scored})
    for i in range(images_scored):
        evaluation.scores.append(report.ImageScore("Set5", 2, f"{name}{i or ''}", 36.25, 0.9625, 288, 288, False))
    return evaluation


def test_report_of_a_file_name_that_is_not_utf8_is_written_with_the_bytes_escaped(tmp_path):
    """A file name with a byte that is not UTF-8 (Python holds it as a lone surrogate) made the report a traceback,
    leaving per_image.csv cut after its header (and results.md empty when the name was in a skipped message)."""
    evaluation = _one_score_evaluation("b\udcffx")
    evaluation.skipped.append("Set5: /data/Set5/HR/c\udcffy.png: cannot read image")
    files = report.write_report(evaluation, str(tmp_path / "out"))
    assert open(files[2], encoding="utf-8").read().splitlines()[1] == r"Set5,2,b\udcffx,36.250000,0.962500,288,288,0,1"
    assert r"Skipped 1: Set5: /data/Set5/HR/c\udcffy.png: cannot read image" in open(files[1], encoding="utf-8").read()
    assert json.load(open(files[0]))["run"]["skipped"] == evaluation.skipped
    assert report.markdown_table(evaluation).encode("utf-8").count(rb"c\udcffy.png") == 1  # printable to stdout


def test_report_files_are_written_whole_or_not_at_all(tmp_path):
    """A full disk (here a file size limit) while writing the report cut results.json short over an earlier one."""
    out = str(tmp_path / "out")
    report.write_report(_one_score_evaluation(), out)
    before = {name: open(os.path.join(out, name)).read() for name in report.REPORT_FILES}
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {os.path.join(REPO, "tests")!r})
        from test_evaluate import _one_score_evaluation
        from rnan_jax import report
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500))  # results.json is about 1 kB
        try:
            report.write_report(_one_score_evaluation(images_scored=2), {out!r})
        except OSError as e:
            print("OSError", e.errno)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.strip() == "OSError 27", done.stderr
    assert {name: open(os.path.join(out, name)).read() for name in report.REPORT_FILES} == before
    assert sorted(os.listdir(out)) == sorted(report.REPORT_FILES)  # no partial file left behind


def test_a_full_disk_while_saving_images_is_said_once_and_every_image_is_still_scored(tmp_path, monkeypatch):
    """Saving the SR images failed image by image (a full disk), each failure dropping that image's score, so no
    set got one: a save is not the score."""
    root = str(tmp_path)
    _make_odd_dataset(root)
    bicubic = evaluate_bicubic(["Tiny"], (2, 4), data_dir=root, progress=False)
    written = []

    def write_image(path, pixels):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)

    monkeypatch.setattr(images, "write_image", write_image)
    full = evaluate_bicubic(["Tiny"], (2, 4), data_dir=root, save_dir=str(tmp_path / "sr"), progress=False)
    assert full.scores == bicubic.scores and len(full.scores) == 8 and len(written) == 1
    assert full.skipped == bicubic.skipped  # the odd set's own: a corrupt file, one too small
    assert full.warnings == [f"cannot save SR images in {tmp_path / 'sr'} (No space left on device, at Tiny x4 "
                             f"{full.scores[1].name}); scoring goes on without saving them", *bicubic.warnings]


def test_lr_bicubic_folder_is_used_and_checked(tmp_path):
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    hr = _rgb(40, 36)
    Image.fromarray(hr).save(os.path.join(hr_dir, "a.png"))
    Image.fromarray(hr).save(os.path.join(hr_dir, "b.png"))
    lr_dir = os.path.join(root, "benchmark", "Mine", "LR_bicubic", "X2")
    os.makedirs(lr_dir)
    Image.fromarray(np.full((20, 18, 3), 100, np.uint8)).save(os.path.join(lr_dir, "ax2.png"))
    Image.fromarray(np.full((19, 18, 3), 100, np.uint8)).save(os.path.join(lr_dir, "bx2.png"))
    Image.fromarray(hr).save(os.path.join(hr_dir, "c.png"))  # no LR file: made from HR, and said in the results
    evaluation = evaluate_bicubic(["Mine"], (2,), data_dir=root, progress=False, allow_incomplete=True)
    assert [s.name for s in evaluation.scores] == ["a", "c"]
    expected = metrics.psnr_y(np.full((40, 36, 3), 100, np.uint8), hr, 2)
    assert evaluation.scores[0].psnr == pytest.approx(expected, abs=1e-12)
    assert evaluation.scores[1].psnr == pytest.approx(_bicubic_psnr(hr, 2), abs=1e-12)
    assert any("bx2.png: LR image is 18x19, expected 18x20" in m for m in evaluation.skipped)
    assert f"Mine x2: {lr_dir} lacks the LR file of 1 of 3 images (c); made with MATLAB bicubic from HR instead" \
        in evaluation.warnings


def test_an_lr_folder_that_cannot_be_listed_skips_the_set_in_one_line(tmp_path, monkeypatch):
    """Each image was skipped with the same line (5 for Set5); the other scale is still scored. (os.listdir
    is refused by hand: root lists a chmod 000 folder.)"""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    for name in "abc":
        Image.fromarray(_rgb(40, 36)).save(os.path.join(hr_dir, f"{name}.png"))
    lr_dir = os.path.join(root, "benchmark", "Mine", "LR_bicubic", "X2")
    os.makedirs(lr_dir)
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path=".": (_ for _ in ()).throw(PermissionError(
        13, "Permission denied", path)) if os.path.abspath(path) == lr_dir else listdir(path))
    evaluation = evaluate_bicubic(["Mine"], (2, 4), data_dir=root, progress=False, allow_incomplete=True)
    assert evaluation.skipped == [f"Mine x2: {lr_dir}: cannot list the LR folder (Permission denied)"]
    assert [(s.name, s.scale) for s in evaluation.scores] == [("a", 4), ("b", 4), ("c", 4)]


def test_incomplete_standard_set_warns(tmp_path):
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Set5")
    for name in ("one", "two"):
        Image.fromarray(_rgb(30, 30)).save(os.path.join(hr_dir, f"{name}.png"))
    evaluation = evaluate_bicubic(["Set5"], (2,), data_dir=root, progress=False)
    assert len(evaluation.scores) == 2
    assert evaluation.warnings == [
        "Set5 holds 2 images, the standard set has 5: its numbers are not comparable to published ones"
    ]
    assert "Warning: Set5 holds 2 images" in report.markdown_table(evaluation)


TINY_MODEL = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)


def tiny_params(config=TINY_MODEL, seed=0):
    """Random parameters of `config`'s shapes (U(-0.1, 0.1)): far quicker on CPU than `init`, and as good here."""
    shapes = jax.eval_shape(lambda k: init(k, config), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.uniform(-0.1, 0.1, s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def params():
    return tiny_params()


@pytest.fixture(scope="module")
def forward():
    return jax.jit(lambda p, x: apply(p, x, config=TINY_MODEL))


def _make_model_dataset(root):
    """One RGB and one gray image whose LR images are both 13x13: every forward pass has one shape."""
    hr_dir = _hr_dir(root, "Tiny")
    rgb = _rgb(27, 26)
    gray = np.ascontiguousarray(data.camera()[100:126, 100:127])
    Image.fromarray(rgb).save(os.path.join(hr_dir, "rgb.png"))
    Image.fromarray(gray).save(os.path.join(hr_dir, "gray.png"))
    return {"rgb": degrade.modcrop(rgb, 2), "gray": degrade.modcrop(gray, 2)}


def _expected_psnr(forward, params, hr, ensemble):
    lr = degrade.bicubic_lr(hr, 2)
    lr = np.repeat(lr[..., None], 3, -1) if lr.ndim == 2 else lr
    lr = lr.astype(np.float32) / 255.0
    if ensemble:
        outs = [inverse_transform(np.asarray(forward(params, transform(lr, i))), i) for i in range(8)]
        sr = np.mean(outs, axis=0)
    else:
        sr = np.asarray(forward(params, lr))
    return metrics.psnr_y(metrics.quantize(sr), hr, 2)


@pytest.mark.parametrize("ensemble", [False, True])
def test_model_path_with_tiny_model(tmp_path, params, forward, ensemble):
    root = str(tmp_path)
    hrs = _make_model_dataset(root)
    evaluation = evaluate_model(params, TINY_MODEL, ["Tiny"], self_ensemble=ensemble, data_dir=root, progress=False)
    assert evaluation.method == ("RNAN+" if ensemble else "RNAN") and evaluation.skipped == []
    assert {(s.name, s.scale, s.gray) for s in evaluation.scores} == {("gray", 2, True), ("rgb", 2, False)}
    for s in evaluation.scores:
        assert s.psnr == pytest.approx(_expected_psnr(forward, params, hrs[s.name], ensemble), abs=1e-9)
        assert 5 < s.psnr < 40 and -1 < s.ssim < 1
    if not ensemble:
        # The architecture read off the parameters gives the same numbers.
        inferred = evaluate_model(params, None, ["Tiny"], data_dir=root, progress=False)
        assert inferred.scores == evaluation.scores


def test_an_image_upscaled_in_windows_is_recorded_in_the_report(tmp_path, params, monkeypatch):
    """On a CPU an image too large for the host's memory is upscaled in windows (inference._host_memory_tile),
    which differs slightly from whole-image output: it was a warning on the terminal only, not in results.json."""
    from rnan_jax import inference

    root = str(tmp_path)
    Image.fromarray(_rgb(160, 144)).save(os.path.join(_hr_dir(root, "Big"), "big.png"))
    Image.fromarray(_rgb(40, 36)).save(os.path.join(_hr_dir(root, "Big"), "small.png"))
    monkeypatch.setattr(inference, "host_memory_available", lambda: 1)  # nothing fits whole
    evaluation = evaluate_model(params, TINY_MODEL, ["Big"], data_dir=root, progress=False)
    assert len(evaluation.scores) == 2 and evaluation.skipped == []
    assert len(evaluation.warnings) == 1, evaluation.warnings  # small.png (20x18 LR): no window is smaller
    assert re.fullmatch(r"Big x2 big: a 72x80 image needs about \d+\.\d GiB of host memory whole, 0\.0 GiB are "
                        r"available; upscaling it in 64-pixel windows \(choose with --tile / tile=\)",
                        evaluation.warnings[0]), evaluation.warnings
    results = json.loads(open(report.write_report(evaluation, str(tmp_path / "out"))[0]).read())
    assert evaluation.warnings[0] in json.dumps(results)


def test_cli_checkpoint_path(tmp_path):
    # checkpoint.load_named (reading a workdir's checkpoint) is stood in for by a function returning a tiny model.
    root = str(tmp_path)
    _make_model_dataset(root)
    out = tmp_path / "out"
    driver = textwrap.dedent(
        f"""
        from absl import app
        import rnan_jax
        from rnan_jax import evaluate
        from tests.test_evaluate import TINY_MODEL, tiny_params

        def load_named(path, which):
            assert (path, which) == ("CKPT", "ema"), (path, which)
            return tiny_params(), TINY_MODEL, rnan_jax.checkpoint.Named(8, "step 8")
        rnan_jax.checkpoint.load_named = load_named
        evaluate._define_flags()
        app.run(evaluate.main, argv=["evaluate", "--checkpoint", "CKPT", "--which", "ema", "--self_ensemble",
                                     "--data_dir", {root!r}, "--datasets", "Tiny", "--output", {str(out)!r},
                                     "--noprogress"])
        """
    )
    env = dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla_cache"))
    proc = subprocess.run([sys.executable, "-c", driver], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["Tiny"]) == ["x2"] and results["Tiny"]["x2"]["images"] == 2
    assert results["Tiny"]["x2"]["of"] == 2
    assert results["conventions"]["method"] == "RNAN+" and results["conventions"]["self_ensemble"] is True
    assert "| RNAN+ | " in proc.stdout
    # which parameters were scored (--which best and latest reports could not be told apart)
    assert results["run"]["source"] == "--checkpoint CKPT --which ema --self_ensemble (step 8)"
    assert results["run"]["step"] == 8
    assert "Scored: --checkpoint CKPT --which ema --self_ensemble (step 8)." in \
        (out / "results.md").read_text().splitlines()


_CTRL_C_AT_THE_THIRD_IMAGE = """
import runpy, sys
from rnan_jax import benchmark_sets

real, scored = benchmark_sets.score, []

def score(*args, **kwargs):
    if len(scored) == 2:
        raise KeyboardInterrupt
    scored.append(1)
    return real(*args, **kwargs)

benchmark_sets.score = score
sys.argv = ["evaluate", *sys.argv[1:]]
runpy.run_module("rnan_jax.evaluate", run_name="__main__")
"""


def _two_sets(tmp_path) -> str:
    """A data dir of two small sets, One (2 images) and Two (3): an interruption at the third image is in Two."""
    root = str(tmp_path)
    for name, count in (("One", 2), ("Two", 3)):
        hr_dir = _hr_dir(root, name)
        for i in range(count):
            Image.fromarray(_rgb(40, 36 + 2 * i)).save(os.path.join(hr_dir, f"im{i}.png"))
    return root


def test_ctrl_c_keeps_the_sets_scored_in_full(tmp_path):
    """Ctrl-C in the third set of a long evaluation (hours for the paper's model on a CPU) lost the two done."""
    root = _two_sets(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_AT_THE_THIRD_IMAGE, "--method", "bicubic", "--data_dir", root,
                           "--datasets", "One,Two", "--scales", "2", "--output", str(out), "--noprogress"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"evaluate: interrupted: after 2 image score(s); the table holds the sets scored in full, written to {out}")
    assert "| Bicubic | " in proc.stdout and "Traceback" not in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["One"]["x2"]["images"] == 2 and "Two" not in results
    assert "interrupted (Ctrl-C) after 2 image score(s): One, Two begun, of One, Two" in json.dumps(results)


_SIGNAL_AT_THE_THIRD_IMAGE = """
import atexit, os, runpy, signal, sys, time
from rnan_jax import benchmark_sets

real, scored = benchmark_sets.score, []
signum = getattr(signal, sys.argv.pop(1))

def score(*args, **kwargs):
    if len(scored) == 2:
        os.kill(os.getpid(), signum)  # delivered here, as from another process
    scored.append(1)
    return real(*args, **kwargs)

def ctrl_c_again():  # the user's second Ctrl-C, landing as the process exits (JAX's own atexit clean-up)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)

benchmark_sets.score = score
if signum == signal.SIGINT:
    atexit.register(ctrl_c_again)
sys.argv = ["evaluate", *sys.argv[1:]]
runpy.run_module("rnan_jax.evaluate", run_name="__main__")
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_sigterm_keeps_the_sets_scored_in_full_and_a_second_ctrl_c_stops_at_once(tmp_path, signame):
    """SIGTERM (a preempted VM, `timeout`) ended evaluate with nothing said and nothing written; a second Ctrl-C
    landing in the exit printed a traceback of JAX's atexit clean-up under the one-line message."""
    root = _two_sets(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_AT_THE_THIRD_IMAGE, signame, "--method", "bicubic",
                           "--data_dir", root, "--datasets", "One,Two", "--scales", "2", "--output", str(out),
                           "--noprogress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    if signame == "SIGTERM":
        assert proc.returncode == 143, proc.stderr
        assert lines[-1] == (f"evaluate: SIGTERM: after 2 image score(s); the table holds the sets scored in full, "
                             f"written to {out}")
    else:  # the second Ctrl-C ended the process at once, by the signal
        assert proc.returncode == -2, proc.stderr
        assert lines[-1] == (f"evaluate: interrupted: after 2 image score(s); the table holds the sets scored in "
                             f"full, written to {out}")
    assert "| Bicubic | " in proc.stdout and "Traceback" not in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["One"]["x2"]["images"] == 2 and "Two" not in results
    what = "SIGTERM" if signame == "SIGTERM" else "Ctrl-C"
    assert results["run"]["warnings"] == [f"interrupted ({what}) after 2 image score(s): One, Two begun, of One, Two"]


def test_a_data_dir_flag_with_a_tilde_is_the_home_folder(tmp_path):
    """--data_dir=~/data (no shell expands a ~ after "=") was read as a folder named "~" in the current one."""
    hr_dir = _hr_dir(str(tmp_path / "home" / "data"), "Mine")
    Image.fromarray(_rgb(40, 36)).save(os.path.join(hr_dir, "a.png"))
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--method", "bicubic", "--data_dir=~/data",
                           "--datasets", "Mine", "--scales", "2", "--noprogress"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path / "home")))
    assert proc.returncode == 0, proc.stderr
    assert f"| Bicubic | {_bicubic_psnr(_rgb(40, 36), 2):.3f}/" in proc.stdout


def test_a_set_missing_images_gets_no_score_and_exit_1(tmp_path):
    """`--sr_dir` holding 1 of a set's 3 SR images: no row for that set, a warning, exit status 1."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Three")
    for i in range(3):
        Image.fromarray(_rgb(40, 36 + 2 * i)).save(os.path.join(hr_dir, f"im{i}.png"))
    sr = tmp_path / "sr" / "Three" / "x2"
    sr.mkdir(parents=True)
    Image.fromarray(_rgb(40, 36)).save(sr / "im0.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rnan_jax.evaluate", "--sr_dir", str(tmp_path / "sr"), "--data_dir", root,
           "--datasets", "Three", "--scales", "2,4", "--output", str(out), "--noprogress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    results = json.loads((out / "results.json").read_text())
    assert "Three" not in results  # never written as the set's score
    warnings = "\n".join(results["run"]["warnings"])
    assert "Three x2: 1 of 3 images scored, so no Three x2 score is reported" in warnings
    # some images were scored: the table says why no set has a score, and the results.md keeps the reasons
    assert "(no set was scored in full, so none has a score: --allow_incomplete reports the partial means)" \
        in proc.stdout
    assert "Three x2: 1 of 3 images scored" in (out / "results.md").read_text()
    # The missing x4 folder is said once, naming the folder, not once per image.
    x4 = [m for m in results["run"]["skipped"] if "x4" in m]
    assert len(x4) == 1 and "Three/x4: no such folder" in x4[0], x4
    assert len(results["run"]["skipped"]) == 3  # im1, im2 at x2 and the x4 folder


def test_a_set_that_is_not_there_is_named_with_the_sets_that_are(tmp_path):
    _make_odd_dataset(str(tmp_path))
    with pytest.raises(images.ImageError) as e:
        benchmark_sets.list_hr(str(tmp_path), "tiny")
    assert str(e.value) == f"{tmp_path}/benchmark/tiny/HR: no such folder; did you mean Tiny?"
    with pytest.raises(images.ImageError) as e:
        benchmark_sets.list_hr(str(tmp_path / "elsewhere"), "Set5")
    assert str(e.value) == (f"{tmp_path}/elsewhere/benchmark/Set5/HR: no such folder; {tmp_path}/elsewhere/benchmark: "
                            "no such folder (is --data_dir or RNAN_DATA_DIR right?)")
    # a set folder put beside benchmark/ instead of in it is pointed at
    os.makedirs(tmp_path / "Mine" / "HR")
    with pytest.raises(images.ImageError) as e:
        benchmark_sets.list_hr(str(tmp_path), "Mine")
    assert str(e.value) == (f"{tmp_path}/benchmark/Mine/HR: no such folder; {tmp_path}/Mine is there: give it as a "
                            f"path, --datasets {tmp_path}/Mine")


def test_a_set_given_as_a_path_is_named_by_its_folder_and_saved_under_output(tmp_path):
    """--datasets /path/Mine (holding HR/), /path/Mine/HR, or a plain folder of images: scored as the set 'Mine'
    and saved under the output folder (an absolute set path used to send --save_images into the data folder)."""
    hr = _rgb(40, 36)
    mine = tmp_path / "data" / "Mine"
    (mine / "HR").mkdir(parents=True)
    Image.fromarray(hr).save(mine / "HR" / "a.png")
    flat = tmp_path / "flat" / "Own"
    flat.mkdir(parents=True)
    Image.fromarray(hr).save(flat / "a.png")
    # an LR_bicubic beside a plain folder of images belongs to something else: not read
    (flat.parent / "LR_bicubic" / "X2").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 18, 3), np.uint8)).save(flat.parent / "LR_bicubic" / "X2" / "a.png")
    expected = _bicubic_psnr(hr, 2)
    for entry, name in ((str(mine), "Mine"), (f"{mine}/HR/", "Mine"), (str(flat), "Own")):
        save = tmp_path / "out" / name
        evaluation = evaluate_bicubic([entry], (2,), data_dir=str(tmp_path / "nowhere"), save_dir=str(save),
                                      progress=False)
        assert evaluation.skipped == [] and evaluation.warnings == [], entry
        assert [(s.dataset, s.name) for s in evaluation.scores] == [(name, "a")], entry
        assert evaluation.scores[0].psnr == pytest.approx(expected, abs=1e-12), entry
        assert evaluation.summary()[name]["x2"]["images"] == 1
        assert (save / name / "x2" / "a.png").is_file(), entry
    assert not (mine / "x2").exists() and not (flat / "x2").exists()
    # two sets of one name would merge into one row: the second is refused, by name
    twice = evaluate_bicubic([str(mine), f"{mine}/HR"], (2,), data_dir=str(tmp_path), progress=False)
    assert len(twice.scores) == 1
    assert twice.skipped == [f"dataset {mine}/HR: a set named Mine is already being scored (sets are reported, "
                             "saved and found in --sr_dir by their folder's name: rename one)"]


def test_a_repeated_set_or_scale_is_scored_once(tmp_path):
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    for name in ("a", "b"):
        Image.fromarray(_rgb(40, 36, left=100 + 20 * len(name))).save(os.path.join(hr_dir, f"{name}.png"))
    evaluation = evaluate_bicubic(["Mine", "Mine"], (2, 2), data_dir=root, progress=False)
    assert [(s.name, s.scale) for s in evaluation.scores] == [("a", 2), ("b", 2)]
    assert evaluation.summary()["Mine"]["x2"]["images"] == 2 and evaluation.skipped == []
    # two files of one name: scored once, with a warning (both were scored as "a", and saved over each other)
    Image.fromarray(_rgb(40, 36, left=30)).save(os.path.join(hr_dir, "a.bmp"))
    evaluation = evaluate_bicubic(["Mine"], (2,), data_dir=root, progress=False)
    assert [s.name for s in evaluation.scores] == ["a", "b"] and evaluation.listed == {"Mine": 2}
    assert evaluation.warnings == ["Mine: a.png has the name of a.bmp (images are reported, saved and found by "
                                   "name): scored a.bmp only"]


def test_sr_dir_wrong_size_names_the_sr_file_and_edsr_names_are_found(tmp_path):
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    hr = _rgb(41, 37)  # cropped to 40x36 at x2
    for name in ("a", "b"):
        Image.fromarray(hr).save(os.path.join(hr_dir, f"{name}.png"))
    sr = tmp_path / "sr" / "Mine" / "x2"
    sr.mkdir(parents=True)
    Image.fromarray(hr).save(sr / "a.png")  # the uncropped size
    Image.fromarray(hr[:40, :36]).save(sr / "b_x2_SR.jpg", quality=100)  # EDSR-PyTorch's name, another format
    evaluation = evaluate_sr_dir(str(tmp_path / "sr"), ["Mine"], (2,), data_dir=root, progress=False,
                                 allow_incomplete=True)
    assert evaluation.skipped == [f"Mine x2: {sr}/a.png: SR image is 37x41, expected 36x40 (the HR image cropped "
                                  "to a multiple of 2, top-left)"]
    [score] = evaluation.scores
    assert score.name == "b" and 40 < score.psnr < 70


def test_an_lr_folder_given_as_a_set_is_refused_naming_the_set_folder(tmp_path):
    """--datasets Set5/LR_bicubic/X2 (or DIV2K's *_LR_bicubic/X4, or a set's LR/ folder) scored the LR images as if
    they were the HR ones: 30.75 dB for bicubic on Set5 "X2" (a set of the wrong images), without a word."""
    mine = tmp_path / "Mine"
    hr = degrade.modcrop(_rgb(40, 36), 2)
    (mine / "HR").mkdir(parents=True)
    Image.fromarray(hr).save(mine / "HR" / "a.png")
    for lr_dir in (mine / "LR_bicubic" / "X2", tmp_path / "DIV2K_valid_LR_bicubic" / "X4", tmp_path / "Own" / "LR",
                   tmp_path / "Own" / "LRbicx2"):  # the last: BasicSR's name
        lr_dir.mkdir(parents=True)
        Image.fromarray(degrade.bicubic_lr(hr, 2)).save(lr_dir / "ax2.png")
    evaluation = evaluate_bicubic([f"{mine}/LR_bicubic/X2", f"{tmp_path}/DIV2K_valid_LR_bicubic/X4/",
                                   str(tmp_path / "Own" / "LR"), str(tmp_path / "Own" / "LRbicx2"), str(mine)], (2,),
                                  data_dir=str(tmp_path), progress=False)
    assert [(s.dataset, s.name) for s in evaluation.scores] == [("Mine", "a")]  # the set itself is scored
    assert evaluation.scores[0].psnr == pytest.approx(_bicubic_psnr(hr, 2), abs=1e-12)
    assert evaluation.skipped == [
        f"dataset {mine}/LR_bicubic/X2: {mine}/LR_bicubic/X2: an LR folder by its name, not the HR images a set is "
        f"scored against: give the set's folder, {mine}, which holds HR/ ({benchmark_sets.LAYOUT})",
        f"dataset {tmp_path}/DIV2K_valid_LR_bicubic/X4/: {tmp_path}/DIV2K_valid_LR_bicubic/X4: an LR folder by its "
        f"name, not the HR images a set is scored against: give the folder of the HR images ({benchmark_sets.LAYOUT})",
        f"dataset {tmp_path}/Own/LR: {tmp_path}/Own/LR: an LR folder by its name, not the HR images a set is scored "
        f"against: give the folder of the HR images ({benchmark_sets.LAYOUT})",
        f"dataset {tmp_path}/Own/LRbicx2: {tmp_path}/Own/LRbicx2: an LR folder by its name, not the HR images a set "
        f"is scored against: give the folder of the HR images ({benchmark_sets.LAYOUT})",
    ]
    assert list(evaluation.summary()) == ["Mine"]


def test_one_set_name_as_a_string_and_one_scale_as_an_int(tmp_path):
    """evaluate_bicubic("Mine", 2) in a notebook: the string was iterated as the sets M, i, n and e (4 skipped, no
    score) and the int was a TypeError; a string is the set (or sets, comma-separated, as --datasets takes)."""
    root = str(tmp_path)
    hr = _rgb(40, 36)
    for name in ("Mine", "Own"):
        Image.fromarray(hr).save(os.path.join(_hr_dir(root, name), "a.png"))
    for datasets, scales in (("Mine", 2), ("Mine, Own", np.int64(2)), (["Mine", "Own"], [2])):
        evaluation = evaluate_bicubic(datasets, scales, data_dir=root, progress=False)
        assert evaluation.skipped == [], datasets
        expected = ["Mine", "Own"][:len(evaluation.summary())]
        assert list(evaluation.summary()) == expected and len(expected) == (1 if datasets == "Mine" else 2)
        assert [s.psnr for s in evaluation.scores] == [pytest.approx(_bicubic_psnr(hr, 2), abs=1e-12)] * len(expected)


def test_a_lower_case_lr_bicubic_x_folder_is_read(tmp_path):
    """A set whose LR images are in LR_bicubic/x2 (lower case, as --sr_dir takes too) had them passed over without
    a word: scored against LR made from HR."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    hr = _rgb(40, 36)
    Image.fromarray(hr).save(os.path.join(hr_dir, "a.png"))
    lr_dir = os.path.join(root, "benchmark", "Mine", "LR_bicubic", "x2")
    os.makedirs(lr_dir)
    Image.fromarray(np.full((20, 18, 3), 100, np.uint8)).save(os.path.join(lr_dir, "ax2.png"))
    evaluation = evaluate_bicubic(["Mine"], (2,), data_dir=root, progress=False)
    expected = metrics.psnr_y(np.full((40, 36, 3), 100, np.uint8), hr, 2)
    assert [s.psnr for s in evaluation.scores] == [pytest.approx(expected, abs=1e-12)]
    assert expected < _bicubic_psnr(hr, 2) - 1  # not the LR made from HR


def test_a_set_named_bsd100_is_the_standard_b100(tmp_path):
    """The paper calls B100 BSD100 (BasicSR BSDS100): a set folder so named was neither checked for its 100 images
    nor given the paper's rows."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "BSD100")
    Image.fromarray(_rgb(40, 36)).save(os.path.join(hr_dir, "a.png"))
    evaluation = evaluate_bicubic(["BSD100"], (2,), data_dir=root, progress=False)
    assert "BSD100 holds 1 images, the standard set has 100: its numbers are not comparable to published ones" \
        in evaluation.warnings
    table = report.markdown_table(evaluation)
    assert "| Bicubic (paper) | 29.56/.8431 |" in table and "| RNAN (paper) | 33.07/.9021 |" in table
    assert benchmark_sets.standard_set("bsds100") == "B100" and benchmark_sets.standard_set("set5") == "Set5"
    assert benchmark_sets.standard_set("Mine") is None


def test_sr_dir_beside_a_partial_lr_folder_says_no_lr_was_made(tmp_path):
    """Scoring --sr_dir images of a set whose LR_bicubic/X2 lacks some LR files warned that their LR images were
    "made with MATLAB bicubic from HR instead": the saved SR images are scored, no LR image is read or made."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    hr = _rgb(40, 36)
    for name in ("a", "b"):
        Image.fromarray(hr).save(os.path.join(hr_dir, f"{name}.png"))
    lr_dir = os.path.join(root, "benchmark", "Mine", "LR_bicubic", "X2")
    os.makedirs(lr_dir)
    Image.fromarray(degrade.bicubic_lr(hr, 2)).save(os.path.join(lr_dir, "ax2.png"))  # none for b
    saved = str(tmp_path / "sr")
    bicubic = evaluate_bicubic(["Mine"], (2,), data_dir=root, save_dir=saved, progress=False)
    assert bicubic.warnings == [f"Mine x2: {lr_dir} lacks the LR file of 1 of 2 images (b); made with MATLAB "
                                "bicubic from HR instead"]  # for bicubic, which made it, this is said
    rescored = evaluate_sr_dir(saved, ["Mine"], (2,), data_dir=root, progress=False)
    assert rescored.scores == bicubic.scores and rescored.skipped == []
    assert rescored.warnings == []


def test_an_exact_image_makes_the_set_mean_inf_and_the_report_says_why(tmp_path):
    """A flat image (bicubic reproduces it exactly) scores PSNR inf, the field's value for MSE 0, and so does its
    set's mean: the table printed "inf/.9759" for the set (the other image's 38 dB gone) with no word of it."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    hr = _rgb(40, 36)
    Image.fromarray(hr).save(os.path.join(hr_dir, "a.png"))
    Image.fromarray(np.full((40, 36, 3), 128, np.uint8)).save(os.path.join(hr_dir, "flat.png"))
    evaluation = evaluate_bicubic(["Mine"], (2, 4), data_dir=root, progress=False)
    assert [(s.name, s.scale, s.psnr) for s in evaluation.scores] == [
        ("a", 2, pytest.approx(_bicubic_psnr(hr, 2), abs=1e-12)), ("a", 4, pytest.approx(_bicubic_psnr(hr, 4))),
        ("flat", 2, float("inf")), ("flat", 4, float("inf"))]
    assert evaluation.summary()["Mine"]["x2"]["psnr"] == float("inf")
    messages = [f"Mine x{s}: 1 image(s) reproduced exactly (flat): PSNR inf (MSE 0, the field's value), so the "
                "set's mean PSNR is inf too; each image's is in the per-image scores" for s in (2, 4)]
    assert evaluation.warnings == messages
    table = report.markdown_table(evaluation)
    assert "| Bicubic | inf/" in table and f"Warning: {messages[0]}" in table


def test_sr_dir_is_scored_beside_an_lr_folder_that_cannot_be_listed(tmp_path, monkeypatch):
    """--sr_dir reads no LR image, yet a set whose LR_bicubic/X2 could not be listed was skipped at x2 ("cannot
    list the LR folder"): no score for SR images that were all there."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    for name in "ab":
        Image.fromarray(_rgb(40, 36, left=100 + 30 * "ab".index(name))).save(os.path.join(hr_dir, f"{name}.png"))
    saved = str(tmp_path / "sr")
    bicubic = evaluate_bicubic(["Mine"], (2,), data_dir=root, save_dir=saved, progress=False)
    lr_dir = os.path.join(root, "benchmark", "Mine", "LR_bicubic", "X2")
    os.makedirs(lr_dir)
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path=".": (_ for _ in ()).throw(PermissionError(
        13, "Permission denied", path)) if os.path.abspath(path) == lr_dir else listdir(path))
    rescored = evaluate_sr_dir(saved, ["Mine"], (2,), data_dir=root, progress=False)
    assert rescored.skipped == [] and rescored.scores == bicubic.scores and len(rescored.scores) == 2
    assert list(rescored.summary()) == ["Mine"]
    # bicubic, which needs the LR images, still skips the set in one line
    again = evaluate_bicubic(["Mine"], (2,), data_dir=root, progress=False)
    assert again.skipped == [f"Mine x2: {lr_dir}: cannot list the LR folder (Permission denied)"] and not again.scores


def _noisy(hr, seed, amount=12):
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, hr.shape)
    return np.clip(hr.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def test_sr_dir_finds_edsr_and_basicsr_layouts_and_never_another_scales_file(tmp_path):
    """--sr_dir found SR images only in <dataset>/x<s>/: EDSR-PyTorch's results-<dataset>/<name>_x<s>_SR.png and
    BasicSR's <dataset>/<name>_<experiment>.png were "no such folder". Each is scored as its pixels are (by
    another name of the set too: BasicSR's BSDS100), never an LR/HR copy beside it nor another scale's file."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "B100")
    hrs = {"a": _rgb(48, 48), "b": _rgb(48, 48, top=200, left=60)}  # 48: the same size at x2, x3 and x4
    for name, hr in hrs.items():
        Image.fromarray(hr).save(os.path.join(hr_dir, f"{name}.png"))
    sr = {(n, s): _noisy(hr, 10 * s + i) for i, (n, hr) in enumerate(hrs.items()) for s in (2, 4)}
    edsr = tmp_path / "edsr" / "results-B100"
    basicsr = tmp_path / "basicsr" / "BSDS100"
    for d in (edsr, basicsr):
        d.mkdir(parents=True)
    for (name, s), pixels in sr.items():
        Image.fromarray(pixels).save(edsr / f"{name}_x{s}_SR.png")
        Image.fromarray(hrs[name]).save(edsr / f"{name}_x{s}_HR.png")  # --save_gt's copies: never scored
        Image.fromarray(pixels[::s, ::s]).save(edsr / f"{name}_x{s}_LR.png")
    for name in hrs:
        Image.fromarray(sr[name, 4]).save(basicsr / f"{name}_EDSR_Mx4_f64b16_DIV2K_official-0c287733.png")

    def expected(scale):
        return [(n, pytest.approx(metrics.psnr_y(sr[n, scale], hrs[n], scale), abs=1e-12),
                 pytest.approx(metrics.ssim_y(sr[n, scale], hrs[n], scale), abs=1e-12)) for n in hrs]

    got = evaluate_sr_dir(str(tmp_path / "edsr"), ["B100"], (2, 4), data_dir=root, progress=False)
    assert got.skipped == []
    for scale in (2, 4):
        assert [(s.name, s.psnr, s.ssim) for s in got.scores if s.scale == scale] == expected(scale)
    got = evaluate_sr_dir(str(tmp_path / "basicsr"), ["B100"], (2, 3, 4), data_dir=root, progress=False)
    assert [(s.name, s.psnr, s.ssim) for s in got.scores] == expected(4)
    assert len(got.skipped) == 2 and all(
        m.startswith(f"B100 x{s}: {tmp_path}/basicsr/BSDS100: no SR images of B100 at x{s} there (")
        for m, s in zip(got.skipped, (2, 3))), got.skipped
    assert "BasicSR's" in got.skipped[0] and "results-<dataset>" in got.skipped[0]

    # BasicSR's images in a scale's folder (RCAN's published results are so too); two that fit are refused
    x4 = tmp_path / "basicsr" / "BSDS100" / "x4"
    x4.mkdir()
    Image.fromarray(sr["a", 4]).save(x4 / "a_RCAN.png")
    Image.fromarray(sr["b", 4]).save(x4 / "b_RCAN_x4.png")
    Image.fromarray(hrs["b"]).save(x4 / "b_RCAN_x2.png")  # another scale's by its name
    Image.fromarray(hrs["a"]).save(x4 / "a_SAN.png")
    got = evaluate_sr_dir(str(tmp_path / "basicsr"), ["B100"], (4,), data_dir=root, progress=False,
                          allow_incomplete=True)
    assert [(s.name, s.psnr, s.ssim) for s in got.scores] == expected(4)[1:]
    assert got.skipped == [f"B100 x4: 2 files could be the x4 SR image of a ({x4}/a_RCAN.png, {x4}/a_SAN.png): "
                           "keep one method's images in --sr_dir"]


def test_report_files_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """Each report file was written atomically but alone: a full disk at per_image.csv left the new run's
    results.json and results.md beside the old run's per_image.csv (three files of two runs)."""
    import builtins
    import errno

    out = str(tmp_path / "out")
    report.write_report(_one_score_evaluation(), out)
    before = {name: open(os.path.join(out, name)).read() for name in report.REPORT_FILES}

    real_open = builtins.open

    def full_disk_at_the_csv(path, *args, **kwargs):
        if "per_image.csv" in os.path.basename(os.fspath(path)):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_at_the_csv)
    with pytest.raises(OSError, match="No space left on device"):
        report.write_report(_one_score_evaluation(images_scored=2), out)
    monkeypatch.undo()
    assert {name: open(os.path.join(out, name)).read() for name in report.REPORT_FILES} == before
    assert sorted(os.listdir(out)) == sorted(report.REPORT_FILES)  # no partial file left behind
    report.write_report(_one_score_evaluation(images_scored=2), out)  # and all three are the new run's
    assert json.load(open(os.path.join(out, "results.json")))["Set5"]["x2"]["images"] == 2
    assert "Set5 ×2" in open(os.path.join(out, "results.md")).read()
    assert len(open(os.path.join(out, "per_image.csv")).read().splitlines()) == 3


def test_saved_images_are_one_runs_set_and_a_stale_one_is_removed_with_a_note(tmp_path):
    """A second --save_images run into the same --output kept the first run's images of those it skipped (or never
    reached, stopped): --sr_dir OUT/images then scored two models' images as one set, with no word of it."""
    from rnan_jax.evaluate import Interrupted, evaluate

    root, saved = str(tmp_path), str(tmp_path / "out" / "images")
    hr_dir = _hr_dir(root, "Mine")
    hrs = {"a": _rgb(30, 30), "b": _rgb(30, 30, top=200), "c": _rgb(30, 30, left=60)}
    for name, hr in hrs.items():
        Image.fromarray(hr).save(os.path.join(hr_dir, f"{name}.png"))
    first = evaluate_bicubic(["Mine"], (2,), data_dir=root, save_dir=saved, progress=False)
    assert len(first.scores) == 3 and first.warnings == []

    def second_model(pair):  # another model, which fails on b
        if pair.name == "b":
            raise ValueError("b: out of memory")
        return _noisy(pair.hr, 1)

    folder = os.path.join(saved, "Mine", "x2")
    Image.fromarray(hrs["a"]).save(os.path.join(folder, "a_RCAN_x2.png"))  # another tool's file: never removed
    second = evaluate(second_model, ["Mine"], (2,), data_dir=root, save_dir=saved, progress=False, method="two")
    assert sorted(os.listdir(folder)) == ["a.png", "a_RCAN_x2.png", "c.png"]
    os.remove(os.path.join(folder, "a_RCAN_x2.png"))
    assert (f"Mine x2: removed 1 SR image(s) an earlier run saved in {folder} that this run did not write (b.png): "
            "the folder holds this run's images only") in second.warnings
    rescored = evaluate_sr_dir(saved, ["Mine"], (2,), data_dir=root, progress=False, allow_incomplete=True)
    assert rescored.scores == second.scores and [s.name for s in rescored.scores] == ["a", "c"]
    assert rescored.skipped == [f"Mine x2: {folder}: no SR image of b (looked for b.*, b_x2_SR.*, bx2.*, b_x2.*)"]

    def stopped_at_b(pair):  # Ctrl-C at b: c's image of the second run is not this run's either
        if pair.name == "b":
            raise KeyboardInterrupt
        return _noisy(pair.hr, 2)

    with pytest.raises(Interrupted) as stopped:
        evaluate(stopped_at_b, ["Mine"], (2,), data_dir=root, save_dir=saved, progress=False, method="three")
    assert sorted(os.listdir(folder)) == ["a.png"]
    assert f"Mine x2: removed 1 SR image(s) an earlier run saved in {folder} that this run did not write (c.png)" \
        in "\n".join(stopped.value.evaluation.warnings)
    assert np.array_equal(np.asarray(Image.open(os.path.join(folder, "a.png"))), _noisy(hrs["a"], 2))


def test_sr_dir_takes_the_file_of_a_longer_image_name_for_that_image_only(tmp_path):
    """With images a and a_b in a set, a_b's SR file (a_b_<suffix>.png, or our a_b.png in a scale's folder) was
    taken by prefix as a's where a's was missing (a_b's pixels scored as a's), and refused as "2 files could be" a's
    where both were there."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Mine")
    hrs = {"a": _rgb(48, 48), "a_b": _rgb(48, 48, top=200, left=60)}
    for name, hr in hrs.items():
        Image.fromarray(hr).save(os.path.join(hr_dir, f"{name}.png"))
    sr = {name: _noisy(hr, i) for i, (name, hr) in enumerate(hrs.items())}
    basicsr, ours = tmp_path / "basicsr" / "Mine", tmp_path / "ours" / "Mine" / "x4"
    basicsr.mkdir(parents=True)
    ours.mkdir(parents=True)
    Image.fromarray(sr["a_b"]).save(basicsr / "a_b_EDSR_Mx4.png")
    Image.fromarray(sr["a_b"]).save(ours / "a_b.png")
    for where, layout in ((basicsr, "basicsr"), (ours, "ours")):
        got = evaluate_sr_dir(str(tmp_path / layout), ["Mine"], (4,), data_dir=root, progress=False,
                              allow_incomplete=True)
        assert [s.name for s in got.scores] == ["a_b"], layout
        assert got.scores[0].psnr == pytest.approx(metrics.psnr_y(sr["a_b"], hrs["a_b"], 4), abs=1e-12)
        assert len(got.skipped) == 1 and got.skipped[0].startswith(f"Mine x4: {where}: no SR image of a ")
    Image.fromarray(sr["a"]).save(basicsr / "a_EDSR_Mx4.png")  # both: each image its own file
    got = evaluate_sr_dir(str(tmp_path / "basicsr"), ["Mine"], (4,), data_dir=root, progress=False)
    assert got.skipped == []
    assert [(s.name, s.psnr) for s in got.scores] == [
        (n, pytest.approx(metrics.psnr_y(sr[n], hrs[n], 4), abs=1e-12)) for n in hrs]


def test_sr_images_of_basicsrs_gtmod12_sets_are_scored_against_hr_cropped_so(tmp_path):
    """BasicSR's outputs on its GTmod12 sets (HR cropped to a multiple of 12 before the LR was made: up to 11 px
    smaller than HR cropped to a multiple of the scale) were refused by size. They are scored as BasicSR scores them
    (HR cropped to a multiple of 12 at its top-left, its mod_crop), with a note; another size is still refused."""
    root = str(tmp_path)
    hr_dir = _hr_dir(root, "Set5")
    hrs = {"baby": _rgb(50, 53), "bird": _rgb(38, 40, top=200, left=60)}  # x4: 48x52 and 36x40; mod 12: 48x48, 36x36
    for name, hr in hrs.items():
        Image.fromarray(hr).save(os.path.join(hr_dir, f"{name}.png"))
    out = tmp_path / "basicsr" / "Set5"
    out.mkdir(parents=True)
    sr = {"baby": _noisy(hrs["baby"][:48, :48], 0), "bird": _noisy(hrs["bird"][:36, :36], 1)}
    for name, pixels in sr.items():
        Image.fromarray(pixels).save(out / f"{name}_EDSR_Mx4_f64b16_DIV2K.png")
    got = evaluate_sr_dir(str(tmp_path / "basicsr"), ["Set5"], (4,), data_dir=root, progress=False)
    assert got.skipped == []
    assert [(s.name, s.height, s.width, s.psnr, s.ssim) for s in got.scores] == [
        (n, *sr[n].shape[:2], pytest.approx(metrics.psnr_y(sr[n], hrs[n][:h, :w], 4), abs=1e-12),
         pytest.approx(metrics.ssim_y(sr[n], hrs[n][:h, :w], 4), abs=1e-12))
        for n, (h, w) in ((n, sr[n].shape[:2]) for n in hrs)]
    assert ("Set5 x4: the SR images of 2 of 2 images (baby, bird) are the HR image cropped to a multiple of 12 "
            "(BasicSR's GTmod12 test sets): scored against HR cropped so at its top-left (BasicSR's mod_crop), as "
            "BasicSR scores them, not against HR cropped to a multiple of 4") in got.warnings
    Image.fromarray(hrs["bird"][:36, :32]).save(out / "bird_EDSR_Mx4_f64b16_DIV2K.png")  # neither size
    got = evaluate_sr_dir(str(tmp_path / "basicsr"), ["Set5"], (4,), data_dir=root, progress=False)
    assert got.skipped == [f"Set5 x4: {out}/bird_EDSR_Mx4_f64b16_DIV2K.png: SR image is 32x36, expected 40x36 (the "
                           "HR image cropped to a multiple of 4, top-left)"]


def test_an_empty_sr_folder_of_a_set_is_named_as_the_user_has_it(tmp_path):
    """An empty results-BSD100/ in --sr_dir was reported as "<sr_dir>/B100/x2: no such folder", a folder the user
    never made."""
    root = str(tmp_path)
    Image.fromarray(_rgb(30, 30)).save(os.path.join(_hr_dir(root, "B100"), "3096.png"))
    (tmp_path / "sr" / "results-BSD100").mkdir(parents=True)
    got = evaluate_sr_dir(str(tmp_path / "sr"), ["B100"], (2,), data_dir=root, progress=False)
    assert not got.scores and len(got.skipped) == 1
    assert got.skipped[0].startswith(f"B100 x2: {tmp_path}/sr/results-BSD100: no SR images of B100 at x2 there (no x2 "
                                     f"folder, no file name saying x2; expected {tmp_path}/sr/<dataset>/x<scale>/")


def test_sr_dir_without_scales_scores_the_scales_it_holds_and_prints_each_skip_once(tmp_path):
    """`--sr_dir OUT/images` of --save_images output holding x2 alone, without --scales, looked for x2, x3 and x4:
    x3 and x4 were one "skipped" error per set, exit 1, and each message was printed three times (a log line, under
    the table, in the list at the end). The scales it holds are scored and the others named in one note, exit 0;
    --scales given keeps them errors, each printed once."""
    root = _two_sets(tmp_path)
    evaluate_bicubic(["One", "Two"], (2,), data_dir=root, save_dir=str(tmp_path / "sr"), progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rnan_jax.evaluate", "--sr_dir", str(tmp_path / "sr"), "--data_dir", root,
           "--datasets", "One,Two", "--output", str(out), "--noprogress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [list(results[s]) for s in ("One", "Two")] == [["x2"], ["x2"]]
    assert results["One"]["x2"]["images"] == 2 and results["Two"]["x2"]["images"] == 3
    note = ("no SR images at x3, x4 (of One, Two): scored at x2, the scales --sr_dir holds images of (--scales names "
            "the scales to require)")
    assert results["run"]["skipped"] == [] and results["run"]["warnings"] == [note]
    assert f"Warning: {note}" in proc.stdout and "skipped" not in proc.stderr
    proc = subprocess.run(cmd + ["--scales", "2,3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    skipped = json.loads((out / "results.json").read_text())["run"]["skipped"]
    assert [m.split(":")[0] for m in skipped] == ["One x3", "Two x3"]
    assert all((proc.stdout + proc.stderr).count(m) == 1 for m in skipped), proc.stdout + proc.stderr
    assert f"2 skipped:\n  {skipped[0]}\n  {skipped[1]}" in proc.stderr
    assert f"Skipped 2: {skipped[0]}; {skipped[1]}" in (out / "results.md").read_text()  # the file keeps them


def test_a_model_of_two_scales_in_sr_dir_scores_both_and_a_set_missing_one_is_an_error(tmp_path):
    """Without --scales, a scale that some set has images of is required of every set (one lacking it is
    skipped, as a partial set is); where no scale has images at all, each set's reason is kept (where the
    images were looked for)."""
    root = _two_sets(tmp_path)
    sr = str(tmp_path / "sr")
    evaluate_bicubic(["One", "Two"], (2,), data_dir=root, save_dir=sr, progress=False)
    evaluate_bicubic(["One"], (3,), data_dir=root, save_dir=sr, progress=False)
    got = evaluate_sr_dir(sr, ["One", "Two"], data_dir=root, progress=False, scales_present_only=True)
    assert sorted({(s.dataset, s.scale) for s in got.scores}) == [("One", 2), ("One", 3), ("Two", 2)]
    assert [m.split(":")[0] for m in got.skipped] == ["Two x3"]
    assert got.warnings == ["no SR images at x4 (of One, Two): scored at x2, x3, the scales --sr_dir holds images of "
                            "(--scales names the scales to require)"]
    empty = evaluate_sr_dir(str(tmp_path / "nothing"), ["One"], data_dir=root, progress=False,
                            scales_present_only=True)
    assert [m.split(":")[0] for m in empty.skipped] == ["One x2", "One x3", "One x4"] and empty.warnings == []


def _save_run(workdir, steps, best=None):
    """A training workdir of the tiny model with EMA: checkpoints/ of `steps` ({step: seed}), best/ of `best`;
    returns {step: (params, ema)} of checkpoints/ and, under key "best", best/'s."""
    from test_zoo import _save_steps

    saved = _save_steps(workdir / "checkpoints", steps, TINY_MODEL)
    if best:
        saved["best"] = next(iter(_save_steps(workdir / "best", best, TINY_MODEL).values()))
    return saved


def test_the_report_names_the_step_scored_and_what_a_zoo_file_records(tmp_path):
    """`Scored: --checkpoint RUN --which ema.` named no step (a live run's newest changes as it saves; best/ is an
    earlier one), nor did results.json; a zoo file was `--which latest` whatever its meta records."""
    from rnan_jax import zoo

    root = str(tmp_path)
    _make_model_dataset(root)
    workdir = tmp_path / "run"
    saved = _save_run(workdir, {4: 1, 8: 2}, best={4: 3})
    zoo.write(str(tmp_path / "m.msgpack"), saved[8][1], TINY_MODEL, {"which": "ema", "step": 8})

    def scored(*args):
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", *args, "--data_dir", root, "--datasets",
                               "Tiny", "--output", str(out), "--noprogress"], cwd=REPO, capture_output=True, text=True,
                              timeout=180, env=dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla_cache")))
        assert proc.returncode == 0, proc.stderr
        results = json.loads((out / "results.json").read_text())
        line = f"Scored: {results['run']['source']}."
        assert line in proc.stdout.splitlines() and line in (out / "results.md").read_text().splitlines()
        return results["run"]["source"], results["run"]["step"], results["Tiny"]["x2"]["psnr"]

    def psnr(p):
        return evaluate_model(p, TINY_MODEL, ["Tiny"], data_dir=root, progress=False).summary()["Tiny"]["x2"]["psnr"]

    assert scored("--checkpoint", str(workdir)) == (f"--checkpoint {workdir} --which ema (step 8)", 8,
                                                    psnr(saved[8][1]))
    assert scored("--checkpoint", str(workdir), "--which", "best") == (
        f"--checkpoint {workdir} --which best (step 4)", 4, psnr(saved["best"][1]))
    assert scored("--checkpoint", str(tmp_path / "m.msgpack"))[:2] == (
        f"--checkpoint {tmp_path / 'm.msgpack'} (the run's ema at step 8)", 8)


def test_load_named_names_the_step_it_read_when_a_save_lands_meanwhile(tmp_path, monkeypatch):
    """The step named is the step read: a save landing between the two (a live run) named one step and loaded
    another; where the step located is removed before it is read (the run keeps the newest few), the newest then is
    read and named."""
    import shutil

    from rnan_jax import checkpoint

    saved = _save_run(tmp_path / "run", {4: 1, 8: 2})
    step_12 = _save_run(tmp_path / "other", {12: 5})[12]
    real, calls = checkpoint._read, []

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    for removes_8, step, ema in ((False, 8, saved[8][1]), (True, 12, step_12[1])):
        workdir = tmp_path / f"run{int(removes_8)}"
        shutil.copytree(tmp_path / "run", workdir)
        calls.clear()

        def read(directory, step, which):
            calls.append(step)
            if len(calls) == 1:  # the run saves step 12 (and removes 8) as the step located is about to be read
                shutil.copytree(tmp_path / "other" / "checkpoints" / "12", os.path.join(directory, "12"))
                if removes_8:
                    shutil.rmtree(os.path.join(directory, "8"))
            return real(directory, step, which)

        monkeypatch.setattr(checkpoint, "_read", read)
        params, config, named = checkpoint.load_named(str(workdir), which="ema")
        assert (named, config, calls) == (checkpoint.Named(step, f"step {step}"), TINY_MODEL, [8, 12][:1 + removes_8])
        assert same(params, ema)


def test_an_interrupted_evaluation_marks_its_partial_sets_rows_in_per_image_csv(tmp_path):
    """Ctrl-C during a set kept that set's rows in per_image.csv with nothing to tell them from a set scored in full,
    while results.json and the table leave it out: a script averaging per_image.csv per set reported the mean of the
    images reached as the set's score. Each row says whether its set was scored in full (complete 1)."""
    root = _two_sets(tmp_path)
    out = tmp_path / "out"
    at_the_fourth = _CTRL_C_AT_THE_THIRD_IMAGE.replace("len(scored) == 2", "len(scored) == 3")
    proc = subprocess.run([sys.executable, "-c", at_the_fourth, "--method", "bicubic", "--data_dir", root,
                           "--datasets", "One,Two", "--scales", "2", "--output", str(out), "--noprogress"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Two" not in json.loads((out / "results.json").read_text())
    with open(out / "per_image.csv") as f:
        rows = [(r["dataset"], r["image"], r["complete"]) for r in csv.DictReader(f)]
    assert rows == [("One", "im0", "1"), ("One", "im1", "1"), ("Two", "im0", "0")]


def test_a_report_with_no_set_scored_in_full_still_names_what_was_scored():
    """results.md of a run in which no set was scored in full (an image skipped, Ctrl-C in the first set) said
    nothing of what was scored: the `Scored:` line was under the table only."""
    evaluation = _one_score_evaluation(images_scored=1)
    evaluation.listed["Set5"] = 2  # one of two images scored: no score
    evaluation.source = "--checkpoint run --which ema (step 8)"
    assert report.markdown_table(evaluation).splitlines()[:3] == [
        "(no set was scored in full, so none has a score: --allow_incomplete reports the partial means)", "",
        "Scored: --checkpoint run --which ema (step 8)."]


def test_scoring_sr_dir_into_its_own_folder_with_save_images_is_refused_and_deletes_nothing(tmp_path):
    """`--sr_dir OUT/images --output OUT --save_images` had the new stale-image removal take --sr_dir's own images
    that were skipped (or not reached) for an earlier run's, and delete them: a user's input files lost."""
    root, saved = str(tmp_path), str(tmp_path / "out" / "images")
    hr_dir = _hr_dir(root, "Mine")
    for name, top in (("a", 0), ("b", 200)):
        Image.fromarray(_rgb(30, 30, top=top)).save(os.path.join(hr_dir, f"{name}.png"))
    evaluate_bicubic(["Mine"], (2,), data_dir=root, save_dir=saved, progress=False)
    folder = os.path.join(saved, "Mine", "x2")
    Image.fromarray(_rgb(10, 10)).save(os.path.join(folder, "b.png"))  # the wrong size: skipped when scored
    with pytest.raises(ValueError, match="is sr_dir: saving there would replace and remove its images"):
        evaluate_sr_dir(saved, ["Mine"], (2,), data_dir=root, save_dir=saved + "/", progress=False)
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--sr_dir", saved, "--data_dir", root,
                           "--datasets", "Mine", "--scales", "2", "--output", str(tmp_path / "out"),
                           "--save_images", "--noprogress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"--sr_dir {saved} is --output's images folder, which --save_images rewrites" in proc.stderr
    assert sorted(os.listdir(folder)) == ["a.png", "b.png"]


PAPER = os.path.join(REPO, "..", "shared", "rnan_paper.txt")


def test_the_paper_rows_of_the_table_are_the_papers_table_1():
    """The reference rows printed under every result (report.PAPER_TABLE1): each of their 72 numbers as Table 1 of
    the paper (../shared/rnan_paper.txt) has it: a mistyped one (0.8437 for 0.8473) was printed beside every
    result as the paper's, and only two of them were checked."""
    if not os.path.exists(PAPER):
        pytest.skip(f"the paper's text is not at {PAPER}")
    with open(PAPER, encoding="utf-8") as f:
        lines = f.read().splitlines()
    sets = ("Set5", "Set14", "B100", "Urban100")
    for method, table in report.PAPER_TABLE1.items():
        (k,) = [i for i, line in enumerate(lines) if line.split("\t")[0].strip() == method]
        psnrs = [float(t.strip(" /")) for t in lines[k].split("\t")[1:] if t.strip()]
        ssims = [float(re.sub(r"<[^>]*>", "", t)) for t in lines[k + 1].split("\t") if t.strip()]
        assert len(psnrs) == len(ssims) == 12, method
        expected = {ds: {s: (psnrs[3 * i + s - 2], ssims[3 * i + s - 2]) for s in (2, 3, 4)}
                    for i, ds in enumerate(sets)}
        assert table == expected, method


def _unrounded_y_psnr(sr, hr, shave):
    """PSNR (skimage) on MATLAB rgb2ycbcr's Y left unrounded, the `--norounded_y` convention, computed here."""
    from skimage.metrics import peak_signal_noise_ratio

    def y(rgb):
        return 16 + (rgb.astype(np.float64) @ np.array([65.481, 128.553, 24.966])) / 255

    sl = slice(shave, -shave)
    return peak_signal_noise_ratio(y(hr)[sl, sl], y(sr)[sl, sl], data_range=255)


def test_norounded_y_scores_on_unrounded_y(tmp_path):
    """--norounded_y (evaluate's rounded_y=False, RCAN's script's convention) scores on Y left unrounded: the run
    said "unrounded" and gave the rounded numbers, or the other way round."""
    hr_dir = _hr_dir(str(tmp_path), "Tiny")
    rgb = _rgb(40, 38)
    Image.fromarray(rgb).save(os.path.join(hr_dir, "rgb.png"))
    sr = degrade.imresize(degrade.bicubic_lr(rgb, 2), 2)
    unrounded, rounded = _unrounded_y_psnr(sr, rgb, 2), _bicubic_psnr(rgb, 2)
    assert abs(unrounded - rounded) > 0.01  # the two conventions tell apart here
    for rounded_y, expected in [(False, unrounded), (True, rounded)]:
        evaluation = evaluate_bicubic("Tiny", 2, data_dir=str(tmp_path), rounded_y=rounded_y, progress=False)
        assert evaluation.scores[0].psnr == pytest.approx(expected, abs=1e-9), rounded_y
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.evaluate", "--method", "bicubic", "--data_dir",
                           str(tmp_path), "--datasets", "Tiny", "--scales", "2", "--norounded_y", "--output", str(out),
                           "--noprogress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["conventions"]["y_rounding"] == "unrounded"
    assert results["Tiny"]["x2"]["psnr"] == pytest.approx(unrounded, abs=1e-9)
    assert "on unrounded Y" in (out / "results.md").read_text()


def test_the_lr_file_is_found_in_the_documented_order(tmp_path):
    """find_lr_file takes X<s>/<stem>x<s>, then X<s>/<stem>, then <stem>x<s>, then <stem> (EDSR's and DIV2K's
    names first): with several there, the LR image scored is the first of these, whatever else the folder holds."""
    hr = str(tmp_path / "HR" / "baby.png")
    lr_dir = tmp_path / "LR_bicubic"
    order = [lr_dir / "X2" / "babyx2.png", lr_dir / "X2" / "baby.png", lr_dir / "babyx2.png", lr_dir / "baby.png"]
    for path in order:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    for path in order:
        assert benchmark_sets.find_lr_file(hr, str(lr_dir), 2) == str(path)
        path.unlink()
    assert benchmark_sets.find_lr_file(hr, str(lr_dir), 2, required=False) is None


def _tagged_png(path, pixels, orientation=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes())


@pytest.mark.parametrize("hr_tag, lr_tag", [(6, 1), (8, 1), (5, 1), (1, 6), (1, 8), (3, 6)])
def test_an_lr_bicubic_file_of_the_hr_files_stored_pixels_lines_up_with_the_upright_hr(tmp_path, hr_tag, lr_tag):
    """A set's LR_bicubic file made from the HR file's stored pixels (MATLAB's imread ignores EXIF), written
    with another orientation tag than the HR's (none, or one a tool copied): the LR image scored is
    bicubic_lr of the upright HR, exactly (imresize commutes with flips and quarter turns), for a wide image and
    each tag, both the HR's (read by make_pair) and the LR's (turned back)."""
    stored = _rgb(40, 64)
    _tagged_png(str(tmp_path / "Phone" / "HR" / "a.png"), stored, hr_tag)
    _tagged_png(str(tmp_path / "Phone" / "LR_bicubic" / "X2" / "ax2.png"), degrade.bicubic_lr(stored, 2), lr_tag)
    hr_path = str(tmp_path / "Phone" / "HR" / "a.png")
    hr = images.decode(hr_path).pixels
    assert hr.shape == ((64, 40, 3) if hr_tag >= 5 else (40, 64, 3))
    pair = benchmark_sets.make_pair("Phone", hr_path, hr, 2)
    np.testing.assert_array_equal(pair.lr, degrade.bicubic_lr(hr, 2))


def test_a_colour_lr_file_of_a_gray_hr_image_is_read_in_colour(tmp_path):
    """A gray HR image whose LR_bicubic file is RGB: read as gray only when its three channels are equal (a gray
    image saved as RGB), else as the colour it holds (not its red channel)."""
    gray = np.ascontiguousarray(data.camera()[200:236, 220:250])
    lr = degrade.bicubic_lr(gray, 2)
    hr_path = str(tmp_path / "G" / "HR" / "g.png")
    _tagged_png(hr_path, gray)
    for channels, expected in [((lr, lr, lr), lr), ((lr, lr // 2, lr), np.dstack([lr, lr // 2, lr]))]:
        _tagged_png(str(tmp_path / "G" / "LR_bicubic" / "X2" / "gx2.png"), np.dstack(channels))
        pair = benchmark_sets.make_pair("G", hr_path, images.decode(hr_path).pixels, 2)
        np.testing.assert_array_equal(pair.lr, expected)


def test_an_sr_image_of_hr_cropped_to_12_is_not_taken_at_a_scale_that_does_not_divide_12(tmp_path):
    """At x8 an SR image the size of HR cropped to a multiple of 12 (108x108 of a 112x112 HR) is not an x8 output
    (no LR image gives it) nor a GTmod12 set's: refused by size, not scored against HR cropped to 108."""
    root = str(tmp_path)
    hr = _rgb(112, 112)
    Image.fromarray(hr).save(os.path.join(_hr_dir(root, "Big"), "a.png"))
    (tmp_path / "sr" / "Big" / "x8").mkdir(parents=True)
    Image.fromarray(hr[:108, :108]).save(tmp_path / "sr" / "Big" / "x8" / "a.png")
    got = evaluate_sr_dir(str(tmp_path / "sr"), ["Big"], (8,), data_dir=root, progress=False)
    assert got.scores == []
    assert got.skipped == [f"Big x8: {tmp_path}/sr/Big/x8/a.png: SR image is 108x108, expected 112x112 (the HR image "
                           "cropped to a multiple of 8, top-left)"]


def test_an_image_named_as_its_hr_file_in_a_set_folder_is_not_taken_for_a_scale(tmp_path):
    """<sr_dir>/<set>/<HR name>.png, with no x<scale> folder between, says no scale: it is not scored as the x2 SR
    image (nor as x3's or x4's), and the message says where such images go."""
    root = str(tmp_path)
    hr = _rgb(40, 40)
    Image.fromarray(hr).save(os.path.join(_hr_dir(root, "Mine"), "a.png"))
    (tmp_path / "sr" / "Mine").mkdir(parents=True)
    Image.fromarray(_noisy(hr, 0)).save(tmp_path / "sr" / "Mine" / "a.png")
    got = evaluate_sr_dir(str(tmp_path / "sr"), ["Mine"], (2,), data_dir=root, progress=False)
    assert got.scores == [] and len(got.skipped) == 1
    assert (f"{tmp_path}/sr/Mine holds 1 image(s) whose names say no scale (e.g. a.png): if they are x2's, put them "
            f"in {tmp_path}/sr/Mine/x2") in got.skipped[0]


def test_a_number_with_a_digit_before_its_x_is_no_scale_in_an_sr_file_name(tmp_path):
    """In an SR file's suffix, x followed by digits names a scale only where no digit comes before it: a size such
    as 1920x1080 in a method's output name is not x1080, so such a file in the x2 folder is the x2 SR image."""
    root = str(tmp_path)
    hr = _rgb(40, 40)
    Image.fromarray(hr).save(os.path.join(_hr_dir(root, "Mine"), "a.png"))
    (tmp_path / "sr" / "Mine" / "x2").mkdir(parents=True)
    sr = _noisy(hr, 0)
    Image.fromarray(sr).save(tmp_path / "sr" / "Mine" / "x2" / "a_render_1920x1080.png")
    got = evaluate_sr_dir(str(tmp_path / "sr"), ["Mine"], (2,), data_dir=root, progress=False)
    assert got.skipped == [] and [s.psnr for s in got.scores] == [pytest.approx(metrics.psnr_y(sr, hr, 2), abs=1e-12)]
