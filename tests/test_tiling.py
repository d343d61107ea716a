"""Tiled upscaling's windows and blend weights, and rnan_jax.tiling (what tools/tiling_bound.py measures)."""
import math

import jax
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from rnan_jax import degrade, init, tiling, upscale_image
from rnan_jax.inference import blend_weights, tile_starts

import test_inference  # noqa: E402 (tests/, on the path as pytest runs them)

# TINY, its receptive field, its parameters (with and without the GC block: fixtures) and the photo crops of the
# tiling tests in test_inference.py
TINY, TINY_RADIUS, _photo = test_inference.TINY, test_inference.TINY_RADIUS, test_inference._photo
params, params_without_gc = test_inference.params, test_inference.params_without_gc


def test_blend_weights_are_a_linear_ramp_centred_in_the_overlap():
    # Windows [0, 40) and [24, 64), overlap 16 LR pixels, x2. The ramp spans 16 - 2 * (16 // 4) = 8 LR pixels
    # (16 HR pixels) centred on LR 32 (HR 64): HR 56..71. At pixel centres it reads (k + 0.5) / 16; the
    # outer 4 LR pixels (8 HR pixels) of each inner edge get weight 0.
    starts = tile_starts(64, 40, 16)
    assert starts == [0, 24]
    up = [(k + 0.5) / 16 for k in range(16)]
    w0, w1 = blend_weights(starts, 40, 16, 2)
    np.testing.assert_allclose(w0, [1.0] * 56 + up[::-1] + [0.0] * 8, atol=1e-7)
    np.testing.assert_allclose(w1, [0.0] * 8 + up + [1.0] * 56, atol=1e-7)


@pytest.mark.parametrize("shape", [(40, 75), (75, 40), (75, 30), (30, 75)])
def test_tile_as_long_as_a_side_or_longer_than_one_is_exact_without_gc(params_without_gc, shape):
    # A side equal to the tile or shorter than it is one window along that axis; the other is tiled.
    assert tile_starts(40, 40, 32) == [0] and tile_starts(30, 40, 32) == [0]
    image = _photo(*shape).astype(np.float32) / 255
    whole = upscale_image(params_without_gc, image)
    tiled = upscale_image(params_without_gc, image, tile=40, overlap=32)
    assert 32 // 4 >= TINY_RADIUS and tiled.shape == whole.shape == (2 * shape[0], 2 * shape[1], 3)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def _exact_y(rgb):
    rgb = rgb.astype(np.int64)
    n = 16 * 255000 + 65481 * rgb[..., 0] + 128553 * rgb[..., 1] + 24966 * rgb[..., 2]
    return ((2 * n + 255000) // 510000).astype(np.float64)


def test_tiling_rows_report_the_differences_tiling_makes(params):
    hr = _photo(41, 37)  # not a multiple of the scale: the rows crop it as the LR image was cropped
    rows = tiling.tiling_rows(params, TINY, hr, tiles=[8, 32], overlaps=[2, 4, 8])
    # Overlap 8 >= tile 8: no row. Tile 32 >= the LR image: one window.
    assert [(r["tile"], r["overlap"]) for r in rows] == [(8, 2), (8, 4), (32, 2), (32, 4), (32, 8)]
    assert {r["lr"] for r in rows} == {"18x20"}  # width x height of the 20 x 18 LR image
    lr = degrade.bicubic_lr(hr, 2).astype(np.float32) / 255
    whole = upscale_image(params, lr)
    y_hr = _exact_y(hr[:40, :36])[2:-2, 2:-2]
    for r in rows:
        tiled = upscale_image(params, lr, tile=r["tile"], overlap=r["overlap"])
        q_tiled, q_whole = (np.floor(np.clip(x.astype(np.float64), 0, 1) * 255 + 0.5) for x in (tiled, whole))
        mse = np.mean((tiled.astype(np.float64) - whole) ** 2)
        assert r["float_psnr"] == (pytest.approx(10 * math.log10(1 / mse), abs=1e-9) if mse else math.inf)
        mse8 = np.mean((q_tiled - q_whole) ** 2)
        assert r["uint8_psnr"] == (pytest.approx(10 * math.log10(255**2 / mse8), abs=1e-9) if mse8 else math.inf)
        assert r["max_levels"] == np.abs(q_tiled - q_whole).max()
        for key, q in (("hr_whole", q_whole), ("hr_tiled", q_tiled)):
            expected = peak_signal_noise_ratio(y_hr, _exact_y(q)[2:-2, 2:-2], data_range=255)
            assert r[key] == pytest.approx(expected, abs=1e-9)
    assert rows[0]["max_levels"] > 0 and rows[0]["float_psnr"] < 80  # 8-pixel windows: GC context differs
    assert rows[0]["float_psnr"] != rows[1]["float_psnr"]  # each row tiles with its own overlap
    assert all(r["float_psnr"] == math.inf and r["max_levels"] == 0 for r in rows[2:])  # the whole image


def test_forward_memory_counts_the_parameters_input_and_output():
    params_bytes = 4 * sum(x.size for x in jax.tree_util.tree_leaves(init(jax.random.key(0), TINY)))
    temp, arguments, output = tiling.forward_memory(TINY, 8)
    assert arguments == params_bytes + 4 * 8 * 8 * 3
    assert output == 4 * 16 * 16 * 3
    assert temp > 0


def test_largest_fitting_is_the_largest_multiple_of_the_step_that_fits(monkeypatch):
    monkeypatch.setattr(tiling, "forward_memory", lambda config, side: (100 * side * side, 5000, 12 * side * side))
    fits = lambda side: 112 * side * side + 5000  # noqa: E731
    for side in range(16, 1100, 16):
        for budget in (fits(side), fits(side) + 7, fits(side + 16) - 1):
            assert tiling.largest_fitting(TINY, budget) == side, budget
    # Not even one step fits: 0, not the step (which would claim a 16 x 16 image fits).
    assert tiling.largest_fitting(TINY, fits(16) - 1) == 0
    assert tiling.largest_fitting(TINY, 1) == 0


def _run_tool(tmp_path, tool, stubs, *args):
    """tools/`tool` run in a subprocess (in `tmp_path`, on the CPU) after the Python lines `stubs` (which stand in
    for the parts of rnan_jax it should not run)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runner = tmp_path / f"run_{os.path.splitext(tool)[0]}.py"
    runner.write_text(f"import runpy, sys\n{stubs}sys.argv[0] = {os.path.join(root, 'tools', tool)!r}\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
    return subprocess.run([sys.executable, str(runner), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def _tiling_bound(tmp_path, *args):
    """tools/tiling_bound.py in a subprocess, its part 2 (which compiles the paper's x4 model) stubbed out: the stub
    prints the budget it is given ("BUDGET <bytes>") and fits a side of 16."""
    return _run_tool(tmp_path, "tiling_bound.py", "from rnan_jax import tiling\n"
                     "tiling.forward_memory = lambda config, side: (1, 2, 3)\n"
                     "tiling.largest_fitting = lambda config, budget: print('BUDGET', budget) or 16\n", *args)


def _table_rows(stdout):
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| image", "| ---", "| LR side"))]


def test_tiling_bound_scans_at_the_default_overlap_of_the_scan_tile_and_reads_any_image_format(tmp_path):
    # A set of .bmp HR images (evaluate scores such a set): only <stem>.png was read, "no such file". And a scan
    # tile of 32 ran at DEFAULT_OVERLAP 32, which is not below the tile: "first 0 images", nothing scanned;
    # upscale_image's default overlap for a tile of 32 is 16.
    from PIL import Image

    hr_dir = tmp_path / "benchmark" / "Mine" / "HR"
    hr_dir.mkdir(parents=True)
    Image.fromarray(_photo(96, 88)).save(hr_dir / "a.bmp")
    Image.fromarray(_photo(40, 36)).save(hr_dir / "b.jpg")
    proc = _tiling_bound(tmp_path, f"--data_dir={tmp_path}", "--images=Mine/a,Mine/b.jpg", "--tiles=32",
                         "--overlaps=8", "--sets=Mine", "--scan_tile=32", "--sizes=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## At tile 32, overlap 16 (the default overlap)" in proc.stdout
    assert "Mine, first 2 images, of which 1 came out identical" in proc.stdout  # b: 20 x 18 LR, one window
    rows = _table_rows(proc.stdout)
    assert [r[:4] for r in rows[:2]] == [["Mine/a", "44x48", "32", "8"], ["Mine/b.jpg", "18x20", "32", "8"]]
    assert rows[1][4:7] == ["inf", "inf", "0"]
    (scanned,) = [r for r in rows[2:] if r[0] == "Mine/a" and r[3] == "16"]
    assert scanned[4] != "inf"  # tiled: 48 LR rows in windows of 32


def test_tiling_bound_stops_on_a_checkpoint_it_was_given_and_cannot_read(tmp_path):
    # Given --checkpoint (or --which) that cannot be read, it measured init weights of the x2 demo architecture.
    for args, says in ((["--checkpoint=nope"], "nope: no such file or folder"),
                       (["--checkpoint=zoo:small_x4", "--which=ema"], "which 'ema' (--which) does not apply")):
        proc = _tiling_bound(tmp_path, *args, "--images=Set5/baby", "--sizes=8")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("tiling_bound: --checkpoint: ")
        assert says in proc.stderr and "INIT WEIGHTS" not in proc.stdout


def test_tiling_bound_refuses_an_infinite_budget(tmp_path):
    # --budget_gib=inf passed the validator (> 0), and part 2 doubled the image side for ever.
    proc = _tiling_bound(tmp_path, "--budget_gib=inf", "--images=Set5/baby", "--sizes=8")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "flag --budget_gib=inf: must be a positive finite number" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("shape", [(20, 100), (100, 20)])
def test_a_tile_shorter_than_only_one_side_still_tiles_that_side(params, shape):
    # A 20 x 100 image with tile 32: the short side fits one window, the long one needs four. Tiling only when the
    # tile was shorter than both sides would run a panorama whole, unbounded by the tile, and report no progress.
    image = _photo(*shape)
    calls = []
    tiled = upscale_image(params, image, tile=32, overlap=8, progress=lambda done, total: calls.append((done, total)))
    starts = tile_starts(100, 32, 8)
    assert starts == [0, 23, 45, 68]
    assert calls == [(i + 1, 4) for i in range(4)]
    # Blended by hand along the long side from each window's whole output (one window across the short side).
    axis = 0 if shape[0] > shape[1] else 1
    lr = image.astype(np.float32) / 255
    acc = np.zeros((2 * shape[0], 2 * shape[1], 3))
    weight = np.zeros((2 * shape[0], 2 * shape[1], 1))
    for start, w in zip(starts, blend_weights(starts, 32, 8, 2)):
        window = np.take(lr, range(start, start + 32), axis=axis)
        sr = np.asarray(test_inference.reference(params, window, config=TINY), np.float64)
        w = (w[:, None, None] if axis == 0 else w[None, :, None]).astype(np.float64)
        span = slice(2 * start, 2 * start + 64)
        where = (span, slice(None)) if axis == 0 else (slice(None), span)
        acc[where] += w * sr
        weight[where] += w
    expected = np.floor(np.clip(acc / weight, 0, 1) * 255 + 0.5)
    assert np.abs(tiled.astype(int) - expected).max() <= 1
    # The whole image differs: each window's GC context is its own.
    assert np.abs(tiled.astype(int) - upscale_image(params, image).astype(int)).max() > 0
