"""upscale_image (sizes, kinds, tiling, self-ensemble) and the upscaling CLI on a tiny model."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import skimage.data
from PIL import Image

from rnan_jax import RNANConfig, apply, checkpoint, degrade, ensemble, inference, init, metrics, upscale_image
from rnan_jax.inference import DEFAULT_OVERLAP, blend_weights, compiled_forward, tile_starts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)
# LR receptive field radius of TINY: head, c1, c2, dc, the group's and the global fusion conv3x3 and the
# upsampler conv (7 LR pixels), plus the tail conv at HR (half an LR pixel).
TINY_RADIUS = 7.5
# The least PSNR of tiled against whole-image output that tools/tiling_bound.py measured with the demo
# model (tools/BENCHMARKS.md, "Inference: tiling"), rounded down: a window of mostly flat sky gets a GC context
# unlike the whole image's. (This tiny model and image measure 56 dB.)
TILED_PSNR_BOUND = 39.0
# The reference: `apply` jitted on its own (eager Flax dispatch is slow on CPU).
reference = jax.jit(apply, static_argnames="config")


@pytest.fixture(scope="module")
def params():
    return init(jax.random.key(0), TINY)


@pytest.fixture(scope="module")
def params_without_gc(params):
    """TINY with the GC block's output conv zeroed: its contribution x + 0 makes the network local."""
    p = jax.tree_util.tree_map(lambda a: a, params)
    p["groups"]["gc"]["v2"] = jax.tree_util.tree_map(jnp.zeros_like, params["groups"]["gc"]["v2"])
    return p


def _photo(h, w):
    """A natural uint8 RGB crop (GC attention on noise is near uniform, so noise would hide tiling errors)."""
    return np.ascontiguousarray(skimage.data.astronaut()[100:100 + h, 150:150 + w])


@pytest.mark.parametrize("scale", [2, 3])
def test_output_size_is_scale_times_input_for_odd_sizes(scale):
    config = RNANConfig(**{**TINY.__dict__, "scale": scale})
    p = init(jax.random.key(1), config)
    image = _photo(13, 17)
    assert upscale_image(p, image, config=config).shape == (13 * scale, 17 * scale, 3)
    assert upscale_image(p, image[..., 0], tile=8, overlap=4).shape == (13 * scale, 17 * scale)


def test_kinds_in_are_kinds_out(params):
    image = _photo(11, 15)
    expected = np.asarray(reference(params, image.astype(np.float32) / 255, config=TINY))

    out = upscale_image(params, image)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, metrics.quantize(expected))

    out = upscale_image(params, image.astype(np.float64) / 255)
    assert out.dtype == np.float32 and out.shape == (22, 30, 3)
    np.testing.assert_allclose(out, expected, atol=1e-6)

    gray = image[..., 1]
    gray_ref = np.asarray(reference(params, np.repeat(gray[..., None], 3, -1).astype(np.float32) / 255,
                                    config=TINY))
    out = upscale_image(params, gray)
    assert out.dtype == np.uint8 and out.shape == (22, 30)
    np.testing.assert_array_equal(out, metrics.rgb_to_gray(metrics.quantize(gray_ref)))
    out = upscale_image(params, gray.astype(np.float32) / 255)
    np.testing.assert_allclose(out, gray_ref @ np.array([0.299, 0.587, 0.114], np.float32), atol=1e-6)


def test_rejects_what_it_cannot_upscale(params):
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 4\) \(RGBA: upscale the RGB channels"):
        upscale_image(params, np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(2, 8, 8, 3\) \(a batch: upscale each image, or call "
                                         r"rnan_jax.apply"):
        upscale_image(params, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(3, 8, 8\) \(channels first\? .*transpose\(1, 2, 0\)"):
        upscale_image(params, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(TypeError, match=r"image must be an array of pixels, got the path 'photo.png': read it first"):
        upscale_image(params, "photo.png")
    with pytest.raises(TypeError, match="uint8, uint16 or float"):
        upscale_image(params, np.zeros((8, 8, 3), np.int16))
    with pytest.raises(ValueError, match="overlap"):
        upscale_image(params, np.zeros((20, 20, 3), np.uint8), tile=8, overlap=8)


def test_a_model_whose_output_is_not_finite_is_refused_not_saved_black(params, tmp_path):
    """Non-finite parameters (a diverged or badly converted checkpoint): NaN outputs were clipped and rounded to
    black, written by upscale and scored by evaluate (a PSNR of a black image) with only numpy's warning."""
    from rnan_jax.evaluate import evaluate_model

    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["tail"]["bias"] = bad["tail"]["bias"].at[0].set(jnp.nan)
    for kwargs in ({}, {"tile": 16, "overlap": 4}):
        with pytest.raises(ValueError, match=r"^the model's output holds \d+ NaN or infinite value\(s\): its "
                                             "parameters are not finite, or its dtype overflowed$"):
            upscale_image(bad, _photo(24, 24), **kwargs)
    hr_dir = tmp_path / "benchmark" / "Mine" / "HR"
    hr_dir.mkdir(parents=True)
    Image.fromarray(_photo(24, 24)).save(hr_dir / "a.png")
    evaluation = evaluate_model(bad, TINY, ["Mine"], data_dir=str(tmp_path), progress=False, allow_incomplete=True)
    assert evaluation.scores == [] and len(evaluation.skipped) == 1
    assert "the model's output holds" in evaluation.skipped[0]


def test_a_small_tile_takes_the_overlap_the_cli_gives_it(params):
    """upscale_image(tile=16) raised "need 0 <= overlap < tile" with its own default overlap (32), which the CLI's
    --tile 16 fits to half the tile; both now take default_overlap(tile)."""
    from rnan_jax import inference

    assert [inference.default_overlap(t) for t in (None, 16, 64, 65, 512)] == [32, 8, 32, 32, 32]
    image = _photo(20, 30)
    np.testing.assert_array_equal(upscale_image(params, image, tile=16),
                                  upscale_image(params, image, tile=16, overlap=8))


@pytest.mark.parametrize("length,tile,overlap,scale", [(75, 40, 16, 2), (61, 40, 8, 3), (100, 24, 0, 2),
                                                       (50, 49, 20, 4), (301, 64, 32, 4)])
def test_windows_cover_and_weights_sum_to_one(length, tile, overlap, scale):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    total = np.zeros(scale * length)
    for start, w in zip(starts, blend_weights(starts, tile, overlap, scale)):
        total[scale * start:scale * (start + tile)] += w
        dead = scale * (overlap // 4)  # zero weight next to every inner window edge
        if start > 0:
            assert not w[:dead].any()
        if start + tile < length:
            assert not w[len(w) - dead:].any()
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_tiled_equals_whole_without_gc_when_overlap_covers_receptive_field(params_without_gc):
    image = _photo(61, 75).astype(np.float32) / 255
    overlap = 32
    assert overlap // 4 >= TINY_RADIUS  # the zero-weight margin of each window edge
    whole = upscale_image(params_without_gc, image)
    tiled = upscale_image(params_without_gc, image, tile=40, overlap=overlap)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    # Abutting windows (no overlap) show the zero padding at their edges: the margin above is what avoids it.
    assert np.abs(upscale_image(params_without_gc, image, tile=40, overlap=0) - whole).max() > 1e-3


def test_tiled_is_within_the_measured_bound_with_gc(params):
    image = _photo(90, 110)
    whole = upscale_image(params, image)
    tiled = upscale_image(params, image, tile=64)
    assert metrics.psnr(tiled, whole) > TILED_PSNR_BOUND


def test_a_large_image_compiles_once(params):
    config = RNANConfig(**{**TINY.__dict__, "features": 4})  # a config no other test uses: a fresh jit cache
    p = init(jax.random.key(2), config)
    upscale_image(p, _photo(70, 90), config=config, tile=40, overlap=DEFAULT_OVERLAP // 2)
    assert compiled_forward(config)._cache_size() == 1  # 3 x 4 windows, all 40 x 40


def test_self_ensemble_averages_the_eight_transforms(params):
    image = _photo(9, 14).astype(np.float32) / 255
    expected = ensemble.self_ensemble(lambda x: np.asarray(reference(params, x, config=TINY)), image)
    np.testing.assert_allclose(upscale_image(params, image, self_ensemble=True), expected, atol=1e-5)


def _write_checkpoint(workdir, params, config):
    """A training workdir as the trainer writes it: checkpoints/<step>/{params, meta}."""
    mgr = checkpoint.manager(os.path.join(workdir, checkpoint.CHECKPOINTS), async_save=False)
    mgr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                        meta=ocp.args.JsonSave(checkpoint.meta_for(config, 7))))
    mgr.wait_until_finished()
    mgr.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, params):
    path = str(tmp_path_factory.mktemp("run"))
    _write_checkpoint(path, params, TINY)
    return path


def _cli(*args, cache):
    env = dict(os.environ, RNAN_JAX_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "rnan_jax.upscale", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=env)


def test_cli_gray_rgba_16bit_and_a_corrupt_file(tmp_path, workdir, params):
    photos = tmp_path / "photos"
    photos.mkdir()
    rgb = _photo(12, 16)
    alpha = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (12, 1))
    Image.fromarray(rgb).save(photos / "rgb.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(photos / "gray.png")
    Image.fromarray(np.dstack([rgb, alpha])).save(photos / "rgba.png")
    deep = rgb[..., 2].astype(np.uint16) * 257 + 100  # 16-bit gray, not a plain 8-bit image scaled up
    Image.fromarray(deep).save(photos / "deep.png")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    single = tmp_path / "single.bmp"
    Image.fromarray(rgb[:, ::-1]).save(single)
    out = tmp_path / "out"

    proc = _cli("--checkpoint", workdir, str(photos), str(single), "--output", str(out), "--tile", "8",
                "--overlap", "4", cache=tmp_path / "xla")
    assert proc.returncode == 1, proc.stderr
    assert "broken.png: cannot read image" in proc.stderr
    assert "wrote 5 image(s)" in proc.stderr and "1 failed" in proc.stderr
    assert sorted(os.listdir(out)) == ["deep_x2.png", "gray_x2.png", "rgb_x2.png", "rgba_x2.png", "single_x2.png"]

    def expected(pixels):
        return upscale_image(params, pixels, tile=8, overlap=4)

    with Image.open(out / "gray_x2.png") as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), expected(rgb[..., 0]))
    with Image.open(out / "rgba_x2.png") as im:
        assert im.mode == "RGBA"
        got = np.asarray(im)
    filled = rgb.copy()
    filled[:, 0] = rgb[:, 1]  # column 0 is fully transparent: its colour is its visible neighbour's
    np.testing.assert_array_equal(got[..., :3], expected(filled))
    np.testing.assert_array_equal(got[..., 3], degrade.imresize(alpha, 2))
    with Image.open(out / "deep_x2.png") as im:
        assert im.mode == "I;16"  # 16-bit in, 16-bit out, computed from all 16 bits
        np.testing.assert_array_equal(np.asarray(im), expected(deep))
    with Image.open(out / "single_x2.png") as im:
        np.testing.assert_array_equal(np.asarray(im), expected(rgb[:, ::-1]))
    with Image.open(out / "rgb_x2.png") as im, Image.open(photos / "rgb.jpg") as src:
        assert im.size == (32, 24)
        np.testing.assert_array_equal(np.asarray(im), expected(np.asarray(src)))


def test_cli_never_overwrites_an_input(tmp_path, workdir):
    folder = tmp_path / "same"
    folder.mkdir()
    Image.fromarray(_photo(10, 10)).save(folder / "a.png")
    Image.fromarray(_photo(10, 10)[::-1]).save(folder / "a_x2.png")  # a.png's output name, and an input
    before = (folder / "a_x2.png").read_bytes()

    proc = _cli("--checkpoint", workdir, str(folder), "--output", str(folder), cache=tmp_path / "xla")
    assert proc.returncode == 1
    assert f"{folder / 'a.png'}: its output {folder / 'a_x2.png'} is an input file" in proc.stderr
    assert (folder / "a_x2.png").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["a.png", "a_x2.png", "a_x2_x2.png"]


def test_cli_wrong_checkpoint_is_one_clear_line(tmp_path):
    proc = _cli("--checkpoint", str(tmp_path / "nope"), str(tmp_path), "--output", str(tmp_path / "o"),
                cache=tmp_path / "xla")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"upscale: cannot load --checkpoint: {tmp_path / 'nope'}: no such file or folder"]


# Bad inputs (each a case that once crashed, misled or went silent).

def test_float_input_with_nan_or_inf_is_refused(params):
    image = _photo(8, 8).astype(np.float32) / 255
    image[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match=r"image holds 1 NaN or infinite value\(s\)"):
        upscale_image(params, image)
    image[3, 4, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        upscale_image(params, image)


def test_float_input_in_0_255_is_refused_with_the_fix(params):
    image = _photo(8, 8).astype(np.float32)  # forgot / 255
    with pytest.raises(ValueError,
                       match=r"values span \[.*\]; expected \[0, 1\] \(a 0\.\.255 image\? divide it by 255"):
        upscale_image(params, image)
    # Rounding noise just outside [0, 1] is accepted.
    ok = np.clip(image / 255, 0, 1) * (1 + 1e-5)
    assert upscale_image(params, ok).shape == (16, 16, 3)


def test_tiled_progress_counts_windows_and_output_is_banded(params):
    image = _photo(40, 50)
    calls = []
    tiled = upscale_image(params, image, tile=16, overlap=4, progress=lambda done, total: calls.append((done, total)))
    total = len(tile_starts(40, 16, 4)) * len(tile_starts(50, 16, 4))
    assert calls == [(i + 1, total) for i in range(total)]
    # The band-by-band assembly gives what blending whole float images gives.
    whole = np.zeros((80, 100, 3), np.float64)
    weight = np.zeros((80, 100, 1), np.float64)
    ys, xs = tile_starts(40, 16, 4), tile_starts(50, 16, 4)
    for y, wy in zip(ys, blend_weights(ys, 16, 4, 2)):
        for x, wx in zip(xs, blend_weights(xs, 16, 4, 2)):
            sr = np.asarray(reference(params, image[y:y + 16, x:x + 16].astype(np.float32)[None] / 255,
                                      config=TINY))[0]
            w = (wy[:, None] * wx[None, :])[..., None]
            whole[2 * y:2 * y + 32, 2 * x:2 * x + 32] += w * sr
            weight[2 * y:2 * y + 32, 2 * x:2 * x + 32] += w
    expected = metrics.quantize(whole / weight)
    assert np.abs(tiled.astype(int) - expected.astype(int)).max() <= 1


def test_tiled_host_memory_stays_near_the_output(params):
    """Host memory is the input, the uint8 output and one row of windows, not float copies of the image."""
    import tracemalloc

    image = np.ascontiguousarray(skimage.data.astronaut()[:300, :400])
    upscale_image(params, image, tile=24, overlap=8)  # compile first
    tracemalloc.start()
    upscale_image(params, image, tile=24, overlap=8)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    float_output = 600 * 800 * 3 * 4
    # Blending whole float32 images (then quantizing them in float64) peaked near 6 of these; by bands, 1.3.
    assert peak < 2 * float_output, peak


def test_out_of_device_memory_falls_back_to_tiles(params, monkeypatch, caplog):
    """A whole image that does not fit is upscaled in the largest fallback window that does, with a warning."""
    from rnan_jax import inference

    real = compiled_forward(TINY)

    def limited(config):
        def forward(p, x):
            if x.shape[-3] * x.shape[-2] > 70 * 70:
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 27648131844 bytes.")
            return real(p, x)
        return forward

    monkeypatch.setattr(inference, "compiled_forward", limited)
    monkeypatch.setattr(inference, "FALLBACK_TILES", (256, 128, 64, 32))
    image = _photo(100, 90)
    with caplog.at_level("WARNING"):
        out = upscale_image(params, image)
    assert "a 90x100 image does not fit in device memory whole; upscaling it in 64-pixel windows" in caplog.text
    monkeypatch.undo()
    np.testing.assert_array_equal(out, upscale_image(params, image, tile=64, overlap=DEFAULT_OVERLAP))


def test_on_cpu_a_whole_image_beyond_host_memory_is_tiled_before_it_runs(params, monkeypatch, caplog):
    """On CPU, running out of memory gets the process killed (no error to fall back on, the run's other images
    lost): the whole-image program's own memory analysis, against the memory available, picks windows first."""
    from rnan_jax import inference

    image = _photo(100, 90)
    memory = compiled_forward(TINY).lower(jax.device_put(params), jax.ShapeDtypeStruct((1, 100, 90, 3), np.float32)
                                          ).compile().memory_analysis()
    need = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    monkeypatch.setattr(inference, "FALLBACK_TILES", (256, 128, 64, 32))
    monkeypatch.setattr(inference, "host_memory_available", lambda: int(need / inference.HOST_MEMORY_SHARE * 0.9))
    with caplog.at_level("WARNING"):
        out = upscale_image(params, image)
    assert f"a 90x100 image needs about {need / 2**30:.1f} GiB of host memory whole" in caplog.text
    assert "upscaling it in 64-pixel windows (choose with --tile / tile=)" in caplog.text
    np.testing.assert_array_equal(out, upscale_image(params, image, tile=64, overlap=DEFAULT_OVERLAP))
    caplog.clear()
    monkeypatch.setattr(inference, "host_memory_available", lambda: int(need / inference.HOST_MEMORY_SHARE * 1.1))
    with caplog.at_level("WARNING"):
        upscale_image(params, image)  # it fits: the whole image, as before
    assert "windows" not in caplog.text


def test_exif_orientation_is_applied(tmp_path):
    from rnan_jax import images

    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :10] = 255  # a white left third
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    decoded = images.decode(tmp_path / "phone.jpg").pixels
    assert decoded.shape == (30, 10, 3)  # shown upright: portrait
    assert decoded[:10].mean() > 200 and decoded[20:].mean() < 50  # the white third is now on top


def test_cli_large_image_is_one_line_and_the_rest_goes_on(tmp_path, workdir):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_photo(40, 50)).save(folder / "big.png")
    Image.fromarray(_photo(10, 12)).save(folder / "small.png")
    proc = _cli("--checkpoint", workdir, str(folder), "--output", str(tmp_path / "out"),
                "--max_image_pixels", "1000", cache=tmp_path / "xla")
    assert proc.returncode == 1
    assert (f"{folder / 'big.png'}: 50x40 is 0.0 M pixels, above the limit of 0.0 M that guards against "
            "decompression bombs (the upscale CLI's --max_image_pixels raises it, 0 for no limit; in Python, "
            "decode's max_pixels)") in proc.stderr
    assert os.listdir(tmp_path / "out") == ["small_x2.png"]
    assert "Traceback" not in proc.stderr
    proc = _cli("--checkpoint", workdir, str(folder), "--output", str(tmp_path / "out"),
                "--max_image_pixels", "0", cache=tmp_path / "xla")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["big_x2.png", "small_x2.png"]


def test_default_pixel_limit_refuses_a_decompression_bomb(tmp_path, monkeypatch):
    from rnan_jax import images

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(images.ImageError, match="a.png: 8x8 is 0.0 M pixels, above the limit"):
        images.decode(tmp_path / "a.png", max_pixels=63)
    assert images.decode(tmp_path / "a.png", max_pixels=None).pixels.shape == (8, 8)
    assert images.DEFAULT_MAX_PIXELS == 2 * 89_478_485  # Pillow's bomb error threshold, now one number


@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_cli_unusable_output_folder_is_one_line(tmp_path, workdir, kind):
    Image.fromarray(_photo(10, 12)).save(tmp_path / "a.png")
    if kind == "file":
        (tmp_path / "afile").write_text("x")
        output = tmp_path / "afile" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write into a read-only folder")
        (tmp_path / "ro").mkdir(mode=0o500)
        output = tmp_path / "ro" / "out"
    proc = _cli("--checkpoint", workdir, str(tmp_path / "a.png"), "--output", str(output), cache=tmp_path / "xla")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines == [f"upscale: --output {output}: cannot create or write that folder (Not a directory)"], lines


def test_load_of_a_good_checkpoint_prints_no_warning(tmp_path, workdir):
    """Orbax's "Metadata file does not exist" warning and INFO lines are hidden without --verbosity."""
    Image.fromarray(_photo(10, 12)).save(tmp_path / "a.png")
    proc = _cli("--checkpoint", workdir, str(tmp_path / "a.png"), "--output", str(tmp_path / "o"),
                cache=tmp_path / "xla")
    assert proc.returncode == 0, proc.stderr
    assert "Metadata file does not exist" not in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line[:1] in "IW" and line[1:5].isdigit()], proc.stderr


def test_load_during_training_reads_the_step_that_replaced_the_one_it_found(tmp_path, params, monkeypatch):
    """A run training in the workdir saved a step and removed the one `load` had found (keep_checkpoints; best/
    keeps one) while it was read: load (and evaluate, upscale --which best mid-run) failed with "damaged
    checkpoint" for a step that was fine and gone."""
    mgr = checkpoint.manager(str(tmp_path / checkpoint.CHECKPOINTS), max_to_keep=1, async_save=False)
    newer = jax.tree_util.tree_map(lambda a: a + 1, params)

    def save(step, p):
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(p),
                                               meta=ocp.args.JsonSave(checkpoint.meta_for(TINY, step))))
        mgr.wait_until_finished()

    save(7, params)
    read_meta = checkpoint.read_meta

    def read_meta_while_training(directory, step):
        meta = read_meta(directory, step)
        if step == 7:
            save(8, newer)  # the trainer's next save, which removes step 7
        return meta

    monkeypatch.setattr(checkpoint, "read_meta", read_meta_while_training)
    loaded, config = checkpoint.load(str(tmp_path))
    assert config == TINY and os.listdir(tmp_path / checkpoint.CHECKPOINTS) == ["8"]
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(newer)):
        np.testing.assert_array_equal(a, b)
    mgr.close()


def test_cli_works_beside_a_clone_named_rnan_jax(tmp_path, workdir):
    """Run from the folder that holds a clone called rnan_jax (a namespace package that shadowed the
    editable install's `rnan_jax.load`)."""
    (tmp_path / "rnan_jax").mkdir()
    (tmp_path / "rnan_jax" / "README.md").write_text("a clone of the repository")
    Image.fromarray(_photo(10, 12)).save(tmp_path / "a.png")
    env = dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla"), PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.upscale", "--checkpoint", workdir, "a.png", "--output",
                           "out"], cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(tmp_path / "out") == ["a_x2.png"]


# 16-bit files, formats beyond the datasets', name collisions, small tiles, failed writes.

def _gradient16(h, w):
    """uint16 RGB whose samples mostly are not 8-bit values scaled up (multiples of 257)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 65535 // (w - 1), y * 65535 // (h - 1), (x + y) * 65535 // (h + w - 2)],
                    axis=-1).astype(np.uint16)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_round_trip(tmp_path, channels):
    from rnan_jax import images

    samples = np.random.default_rng(channels).integers(0, 65536, (19, 23, channels)).astype(np.uint16)
    pixels = samples[..., 0] if channels <= 2 else samples[..., :3]
    alpha = samples[..., -1] if channels in (2, 4) else None
    images.write_image(tmp_path / "a.png", pixels, alpha)
    with Image.open(tmp_path / "a.png") as im:  # a real 16-bit PNG: Pillow reads its header and 8-bit view
        assert im.size == (23, 19) and im.mode == {1: "I;16", 2: "RGBA", 3: "RGB", 4: "RGBA"}[channels]
        if channels == 1:
            np.testing.assert_array_equal(np.asarray(im), pixels)
        else:
            np.testing.assert_array_equal(np.asarray(im)[..., :3 if channels > 2 else 1],
                                          (samples[..., :3 if channels > 2 else 1] >> 8).astype(np.uint8))
    decoded = images.decode(tmp_path / "a.png", high_bit_depth=True)
    assert decoded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(decoded.pixels, pixels)
    if alpha is None:
        assert decoded.alpha is None
    else:
        np.testing.assert_array_equal(decoded.alpha, alpha)
    assert images.decode(tmp_path / "a.png").pixels.dtype == np.uint8  # the default stays 8 bits
    # 8-bit files decode as without high_bit_depth
    Image.fromarray((pixels >> 8).astype(np.uint8)).save(tmp_path / "b.png")
    assert images.decode(tmp_path / "b.png", high_bit_depth=True).pixels.dtype == np.uint8


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_read_as_8_bits_is_rounded_by_the_type_and_keeps_gray(tmp_path, channels):
    """The default (evaluation, training) path: 16 -> 8 bits as round(v / 257) whatever the image's values
    (a dark 16-bit image, every sample <= 255, came out as if 8-bit, up to 257x too bright; Pillow's own 8-bit
    view of colour truncates, 255 -> 0), and 16-bit gray + alpha stays gray (it came out RGB)."""
    from rnan_jax import images

    samples = np.random.default_rng(channels).integers(0, 256, (9, 11, channels)).astype(np.uint16)
    samples[0, 0] = 255  # truncation gives 0, rounding 1
    pixels = samples[..., 0] if channels <= 2 else samples[..., :3]
    alpha = samples[..., -1] if channels in (2, 4) else None
    images.write_image(tmp_path / "dark.png", pixels, alpha)
    decoded = images.decode(tmp_path / "dark.png")
    expected = np.rint(samples / 257.0).astype(np.uint8)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == pixels.shape
    np.testing.assert_array_equal(decoded.pixels, expected[..., 0] if channels <= 2 else expected[..., :3])
    if alpha is None:
        assert decoded.alpha is None
    else:
        np.testing.assert_array_equal(decoded.alpha, expected[..., -1])


def test_16bit_decoder_applies_exif_orientation_and_banded_encoder_agrees(tmp_path):
    from rnan_jax import images

    samples = _gradient16(10, 30)
    png = images.encode_png16(samples, rows_per_band=3)
    assert png == images.encode_png16(samples)  # bands do not change the file
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    tiff = exif.tobytes().removeprefix(b"Exif\x00\x00")  # PNG's eXIf holds the TIFF bytes alone (Pillow 10 adds it)
    (tmp_path / "r.png").write_bytes(png[:33] + images._png_chunk(b"eXIf", tiff) + png[33:])
    np.testing.assert_array_equal(images.decode(tmp_path / "r.png", high_bit_depth=True).pixels,
                                  np.rot90(samples, -1))


def test_upscale_image_keeps_16_bits(params):
    image = _gradient16(11, 15)
    expected = np.asarray(reference(params, image.astype(np.float32) / 65535, config=TINY), np.float64)
    out = upscale_image(params, image)
    assert out.dtype == np.uint16 and out.shape == (22, 30, 3)
    np.testing.assert_array_equal(out, np.floor(np.clip(expected, 0, 1) * 65535 + 0.5).astype(np.uint16))
    assert (out % 257 != 0).mean() > 0.9
    gray = upscale_image(params, image[..., 0])
    assert gray.dtype == np.uint16 and gray.shape == (22, 30)
    rgb = upscale_image(params, np.repeat(image[..., :1], 3, -1)).astype(np.int64)
    np.testing.assert_array_equal(gray, (2 * (rgb @ [299, 587, 114]) + 1000) // 2000)


def test_failed_write_leaves_no_partial_file_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    from rnan_jax import images

    path = tmp_path / "a.png"
    images.write_image(path, _photo(8, 8))
    before = path.read_bytes()

    def full_disk(im, fp, filename, *args):
        fp.write(b"\x89PNG half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(Image.SAVE, "PNG", full_disk)
    with pytest.raises(OSError, match="No space left"):
        images.write_image(path, _photo(8, 8)[::-1])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.png"]


_FULL_DISK = """
import runpy, sys
from rnan_jax import images

def write_image(path, *args, **kwargs):
    raise OSError(28, "No space left on device")

images.write_image = write_image
sys.argv = ["upscale", *sys.argv[1:]]
runpy.run_module("rnan_jax.upscale", run_name="__main__")
"""


def test_cli_stops_at_a_full_disk_rather_than_upscaling_every_image_for_nothing(tmp_path, workdir):
    """Every image was upscaled (minutes each for large photos and the paper's model) and then failed to be
    written, one by one."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(_photo(12, 16)).save(photos / f"{name}.png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, "--checkpoint", workdir, str(photos), "--output",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla")))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("failed: ") == 1 and "Traceback" not in proc.stderr
    assert f"failed: {photos / 'a.png'}: cannot write {out / 'a_x2.png'} (No space left on device)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"wrote 0 image(s) to {out}; 1 failed; stopped with the disk full: 2 not attempted")


def test_plan_names_inputs_that_differ_only_in_extension_apart(tmp_path):
    from rnan_jax import upscale

    a, b, c = str(tmp_path / "x" / "a.png"), str(tmp_path / "x" / "a.JPG"), str(tmp_path / "y" / "a.png")
    out = str(tmp_path / "out")
    jobs, errors, notes = upscale.plan([a, b, str(tmp_path / "b.png")], out, 2)
    assert jobs == [(a, f"{out}/a_png_x2.png"), (b, f"{out}/a_jpg_x2.png"),
                    (str(tmp_path / "b.png"), f"{out}/b_x2.png")]
    assert errors == [] and notes == [f"{a}: written as {out}/a_png_x2.png, since {b} would have the same output name",
                                      f"{b}: written as {out}/a_jpg_x2.png, since {a} would have the same output name"]
    # the same name in two folders: no extension tells them apart, so none is added, and the refused one gets no
    # note (both were noted "written as a_png_x2.png")
    jobs, errors, notes = upscale.plan([a, c], out, 2)
    assert jobs == [(a, f"{out}/a_x2.png")] and notes == []
    assert errors == [f"{c}: its output {out}/a_x2.png is also that of {a}; rename one of them"]
    jobs, errors, notes = upscale.plan([a, b, c], out, 2)
    assert jobs == [(a, f"{out}/a_x2.png"), (b, f"{out}/a_jpg_x2.png")]
    assert errors == [f"{c}: its output {out}/a_x2.png is also that of {a}; rename one of them"]
    assert notes == [f"{b}: written as {out}/a_jpg_x2.png, since {a}, {c} would have the same output name"]


def test_cli_16bit_gif_collisions_small_tile_and_failed_write(tmp_path, workdir, params):
    photos = tmp_path / "photos"
    photos.mkdir()
    from rnan_jax import images

    deep = _gradient16(12, 16)
    images.write_image(photos / "deep.png", deep)
    rgb = _photo(12, 16)
    Image.fromarray(rgb).save(photos / "a.png")
    Image.fromarray(rgb[::-1]).save(photos / "a.jpg", quality=95)
    frames = [Image.fromarray(rgb).convert("P"), Image.fromarray(rgb[::-1]).convert("P")]
    frames[0].save(photos / "anim.gif", save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    (out / "z_x2.png").mkdir(parents=True)  # a folder where z.png's output goes
    Image.fromarray(rgb).save(photos / "z.png")

    proc = _cli("--checkpoint", workdir, str(photos), "--output", str(out), "--tile", "8", cache=tmp_path / "xla")
    assert proc.returncode == 1, proc.stderr
    assert f"failed: {photos / 'z.png'}: cannot write {out / 'z_x2.png'} (Is a directory)" in proc.stderr
    assert f"note: {photos / 'a.jpg'}: written as {out / 'a_jpg_x2.png'}" in proc.stderr
    assert f"note: {photos / 'anim.gif'}: has 2 frames; upscaled the first" in proc.stderr
    assert "wrote 4 image(s)" in proc.stderr and "1 failed" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(out)) == ["a_jpg_x2.png", "a_png_x2.png", "anim_x2.png", "deep_x2.png", "z_x2.png"]

    def expected(pixels):  # --tile 8 without --overlap: overlap 4, half the tile
        return upscale_image(params, pixels, tile=8, overlap=4)

    sr = images.decode(out / "deep_x2.png", high_bit_depth=True).pixels
    assert sr.dtype == np.uint16 and sr.shape == (24, 32, 3)
    assert (sr % 257 != 0).any()
    np.testing.assert_array_equal(sr, expected(deep))
    with Image.open(out / "a_png_x2.png") as im:  # 8-bit in: what it was before 16-bit support
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), expected(rgb))
    with Image.open(photos / "anim.gif") as gif, Image.open(out / "anim_x2.png") as im:
        np.testing.assert_array_equal(np.asarray(im), expected(np.asarray(gif.convert("RGB"))))


def test_upscale_folder_scans_take_gif_but_dataset_scans_do_not(tmp_path):
    from rnan_jax import images

    Image.fromarray(_photo(8, 8)).save(tmp_path / "a.gif")
    (tmp_path / "notes.txt").write_text("not an image")
    assert images.list_images(tmp_path, images.READABLE_EXTENSIONS) == [str(tmp_path / "a.gif")]
    with pytest.raises(images.ImageError, match="folder holds no image files"):
        images.list_images(tmp_path)


def test_upscale_keeps_the_colour_profile_that_describes_the_pixels(tmp_path, params):
    """A phone photo's Display P3 (here: an sRGB profile) was dropped, so colour-managed viewers showed the output
    in other colours; a profile of another colour space (a CMYK file's, once converted to RGB) is not kept."""
    from PIL import ImageCms

    from rnan_jax import images
    from rnan_jax.upscale import upscale_file

    rgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    lab_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    pixels = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png", icc_profile=rgb_profile)
    Image.fromarray(pixels).save(tmp_path / "b.jpg", icc_profile=rgb_profile, quality=95)
    (tmp_path / "c.png").write_bytes(images.encode_png16(_gradient16(6, 7), icc_profile=rgb_profile))
    Image.fromarray(pixels[..., 0]).save(tmp_path / "d.png", icc_profile=rgb_profile)  # gray: not its space
    Image.fromarray(pixels).save(tmp_path / "e.png", icc_profile=lab_profile)
    for name, kept in (("a.png", True), ("b.jpg", True), ("c.png", True), ("d.png", False), ("e.png", False)):
        upscale_file(params, TINY, str(tmp_path / name), str(tmp_path / "out" / f"{name}.png"))
        with Image.open(tmp_path / "out" / f"{name}.png") as im:
            assert im.info.get("icc_profile") == (rgb_profile if kept else None), name
            assert im.size == (7 * TINY.scale, 6 * TINY.scale)
    assert images.decode(tmp_path / "out" / "c.png.png", high_bit_depth=True).pixels.dtype == np.uint16


def test_a_colour_key_transparency_comes_out_as_alpha(tmp_path, params):
    """An RGB or gray PNG with a tRNS colour key (one colour drawn transparent) lost its transparency: upscaled,
    the key colour is interpolated away, so it is read as an alpha channel, which the upscaler interpolates."""
    from rnan_jax import images
    from rnan_jax.upscale import upscale_file

    rgb = _photo(12, 16)
    rgb[:4, :5] = (10, 200, 30)  # the key colour, transparent
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(10, 200, 30))
    Image.fromarray(rgb[..., 1]).save(tmp_path / "gray.png", transparency=200)
    for name, pixels in (("rgb", rgb), ("gray", rgb[..., 1])):
        decoded = images.decode(tmp_path / f"{name}.png")
        np.testing.assert_array_equal(decoded.pixels, pixels)
        np.testing.assert_array_equal(decoded.alpha, np.where(pixels == 200 if name == "gray" else
                                                              (pixels == (10, 200, 30)).all(-1), 0, 255))
        upscale_file(params, TINY, str(tmp_path / f"{name}.png"), str(tmp_path / "out" / f"{name}.png"))
        with Image.open(tmp_path / "out" / f"{name}.png") as im:
            assert im.mode == ("RGBA" if name == "rgb" else "LA") and im.size == (32, 24)
            assert np.asarray(im)[0, 0, -1] == 0 and np.asarray(im)[-1, -1, -1] == 255


def test_a_one_bit_png_keeps_its_colour_key_transparency(tmp_path):
    """A 1-bit PNG (mode "1") with a tRNS key lost it: decoded without alpha, upscaled to an opaque gray PNG."""
    from rnan_jax import images

    bits = _photo(12, 16)[..., 0] > 128
    Image.fromarray(bits).convert("1").save(tmp_path / "one.png", transparency=0)
    decoded = images.decode(tmp_path / "one.png")
    np.testing.assert_array_equal(decoded.pixels, np.where(bits, 255, 0))
    np.testing.assert_array_equal(decoded.alpha, np.where(bits, 255, 0))  # the black pixels are the key


def test_the_cpu_memory_check_compiles_the_program_that_then_runs(params, caplog):
    """On CPU `upscale_image` compiles the whole-image program to read its memory needs first; it compiled it for
    a batch of one, [1, h, w, 3], while the call runs on [h, w, 3]: every new image size compiled twice (3.2 s
    instead of 1.7 for the demo model's validation image)."""
    import logging

    import jax

    from rnan_jax import inference

    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles():
        upscale_image(params, _photo(37, 29))
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(apply)")]
    assert inference.host_memory_available() is not None and len(compiles) == 1, compiles


def test_an_unlistable_folder_is_one_error_and_the_other_inputs_go_on(tmp_path, monkeypatch):
    # os.listdir's PermissionError (another user's folder; root reads any, so it is simulated) was a traceback
    # from expand_inputs that ended the run before any image, where a missing folder is one line.
    from rnan_jax import upscale

    locked, photo = tmp_path / "locked", tmp_path / "a.png"
    locked.mkdir()
    Image.fromarray(_photo(4, 4)).save(photo)
    listdir = os.listdir

    def no_entry(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", no_entry)
    files, errors = upscale.expand_inputs([str(locked), str(photo)])
    assert files == [str(photo)]
    assert errors == [f"{locked}: cannot list the folder (Permission denied)"]
    # a URL: it was "no such file" of an object that is there
    assert upscale.expand_inputs(["gs://bucket/in/x.png", str(photo)]) == ([str(photo)], [
        "input gs://bucket/in/x.png: a URL, but this takes a local path only (copy the files here first, e.g. "
        "gcloud storage cp -r, and give the local path)"])


def test_a_bfloat16_image_is_a_float_image(params):
    # upscale_image takes float images, but refused a bfloat16 one (a JAX pipeline's) with "image must be uint8,
    # uint16 or float, got bfloat16": NumPy does not count ml_dtypes' bfloat16 as floating.
    image = jnp.asarray(_photo(6, 7), jnp.float32) / 255
    half = image.astype(jnp.bfloat16)
    expected = np.asarray(reference(params, np.asarray(half, np.float32), config=TINY))
    for given in (half, np.asarray(half)):
        out = upscale_image(params, given)
        assert out.dtype == np.float32 and out.shape == (12, 14, 3)
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_a_palette_pil_image_is_refused_not_upscaled_as_gray_indices(params, tmp_path):
    # np.asarray of a palette image (a GIF, many PNGs) is its palette indices, [H, W] uint8: upscale_image took
    # them for a gray image and returned gray garbage (index 3 -> grey level 3). The path error's own advice,
    # np.asarray(PIL.Image.open(path)), led there.
    rgb = _photo(6, 7)
    Image.fromarray(rgb).quantize(4).save(tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as im:
        with pytest.raises(ValueError, match=r"a PIL image of mode P, .* pass image.convert\('RGB'\)"):
            upscale_image(params, im)
        np.testing.assert_array_equal(upscale_image(params, im.convert("RGB")),
                                      upscale_image(params, np.asarray(im.convert("RGB"))))
    np.testing.assert_array_equal(upscale_image(params, Image.fromarray(rgb)), upscale_image(params, rgb))
    with pytest.raises(TypeError, match=r"np.asarray\(PIL.Image.open\(path\).convert\('RGB'\)\)"):
        upscale_image(params, str(tmp_path / "a.gif"))


def test_apply_refuses_a_minus_one_to_one_image_but_takes_an_output_fed_back(params):
    # Many SR codebases feed [-1, 1]: apply took it without a word (its check was for 0..255 only) and returned
    # garbage. An unclipped output, a little below 0 in places, is still taken, and traced values are not checked.
    lr = _photo(6, 7).astype(np.float32) / 255
    with pytest.raises(ValueError, match=r"got values down to -0\.\d+ \(a \[-1, 1\] image\? pass \(lr \+ 1\) / 2\)"):
        apply(params, lr * 2 - 1)
    again = np.asarray(apply(params, lr - 0.05))
    assert again.shape == (12, 14, 3)
    assert jax.jit(apply)(params, lr * 2 - 1).shape == (12, 14, 3)


def test_a_big_endian_16bit_image_is_a_16bit_image(params):
    # Big-endian samples (FITS data, a 16-bit PGM's bytes, a big-endian TIFF opened by Pillow as I;16B) were
    # refused with "image must be uint8, uint16 or float, got >u2", and the PIL image with advice, convert('RGB'),
    # that clips every 16-bit value above 255 to white.
    deep = _photo(6, 7)[..., 1].astype(np.uint16) * 257 + 99
    rgb = np.dstack([deep, deep[::-1], deep[:, ::-1]])
    pil = Image.frombytes("I;16B", (7, 6), deep.astype(">u2").tobytes())
    for given, native in ((deep.astype(">u2"), deep), (pil, deep), (rgb.astype(">u2"), rgb)):
        out = upscale_image(params, given)
        assert out.dtype == np.uint16 and out.shape == (12, 14) + native.shape[2:]
        np.testing.assert_array_equal(out, upscale_image(params, native))
    np.testing.assert_array_equal(upscale_image(params, rgb.astype(">f4") / np.float32(65535)),
                                  upscale_image(params, rgb.astype(np.float32) / 65535))


_HOST_MEMORY_SHORT = """
import runpy, sys
import numpy as np
from rnan_jax import inference

upscale_image = inference.upscale_image

def short_of_memory(params, image, **kwargs):  # what NumPy raises for an image too large for the host
    if np.shape(image)[0] > 20:
        raise MemoryError(
            "Unable to allocate 412. MiB for an array with shape (6000, 6000, 3) and data type float32")
    return upscale_image(params, image, **kwargs)

inference.upscale_image = short_of_memory
sys.argv = ["upscale", *sys.argv[1:]]
runpy.run_module("rnan_jax.upscale", run_name="__main__")
"""


def test_cli_an_image_too_large_for_host_memory_is_one_line_and_the_rest_goes_on(tmp_path, workdir, params):
    """NumPy's MemoryError (a host array too large for the machine: `ulimit -v 2000000` and a 6000 x 6000 photo gave
    it) ended the run with a traceback, and the images after that one were not attempted."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo(24, 16)).save(photos / "a_large.png")
    Image.fromarray(_photo(12, 16)).save(photos / "b_small.png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _HOST_MEMORY_SHORT, "--checkpoint", workdir, str(photos),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla")))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("failed: ") == 1
    assert (f"failed: {photos / 'a_large.png'}: out of host memory (Unable to allocate 412. MiB for an array with "
            "shape (6000, 6000, 3) and data type float32); --tile 512 keeps less of the image in memory at once"
            ) in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"wrote 1 image(s) to {out}; 1 failed"
    with Image.open(out / "b_small_x2.png") as im:
        np.testing.assert_array_equal(np.asarray(im), upscale_image(params, _photo(12, 16)))


def _fake_proc_and_cgroups(tmp_path, cgroup_lines, folders):
    """A /proc (meminfo: 8 GiB available) and a /sys/fs/cgroup tree: `folders` maps a folder under the cgroup root
    to its files' texts."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       16777216 kB\nMemAvailable:    8388608 kB\n")
    (proc / "self" / "cgroup").write_text("".join(line + "\n" for line in cgroup_lines))
    (proc / "self" / "status").write_text("Name:\tpython\nVmSize:\t 1048576 kB\n")
    for folder, files in folders.items():
        (tmp_path / "cg" / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (tmp_path / "cg" / folder / name).write_text(text)
    return str(proc), str(tmp_path / "cg")


MiB = 1 << 20


def test_host_memory_available_is_bounded_by_the_cgroup_limit_and_ulimit(tmp_path, monkeypatch):
    """A container's, SLURM job's or pod's memory limit (cgroup v2 or v1, set on the process's cgroup or an
    ancestor) bounds the memory judged available; it read only MemAvailable, so a whole image that did not fit
    the job's limit was tried and the run killed."""
    # cgroup v2: the limit on the parent (the job), "max" on the process's own cgroup (the step); file cache that
    # the kernel reclaims first (inactive_file) does not count as used
    proc, root = _fake_proc_and_cgroups(tmp_path, ["0::/job/step"], {
        "job": {"memory.max": str(1024 * MiB), "memory.current": str(800 * MiB),
                "memory.stat": f"anon 1\ninactive_file {300 * MiB}\n"},
        "job/step": {"memory.max": "max", "memory.current": str(700 * MiB)}})
    monkeypatch.setattr(inference, "_PROC", proc)
    monkeypatch.setattr(inference, "_CGROUP_ROOT", root)
    assert inference.host_memory_available() == 524 * MiB
    # cgroup v1, a container seeing its own cgroup at the mount's root (the host path is not under it); v1's "no
    # limit" (about 2**63) on the others is no limit
    proc, root = _fake_proc_and_cgroups(tmp_path / "v1", ["5:cpu:/x", "4:memory:/docker/abc"], {
        "memory": {"memory.limit_in_bytes": str(2048 * MiB), "memory.usage_in_bytes": str(1536 * MiB),
                   "memory.stat": f"cache 5\ntotal_inactive_file {100 * MiB}\n"}})
    monkeypatch.setattr(inference, "_PROC", proc)
    monkeypatch.setattr(inference, "_CGROUP_ROOT", root)
    assert inference.host_memory_available() == 612 * MiB
    (tmp_path / "v1" / "cg" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert inference.host_memory_available() == 8192 * MiB  # MemAvailable alone
    # ulimit -v: the address space left (the limit less VmSize, 1 GiB here)
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1280 * MiB, resource.RLIM_INFINITY))
    assert inference.host_memory_available() == 256 * MiB


def test_a_folder_s_files_of_formats_a_scan_does_not_take_are_named_in_a_note(tmp_path):
    """A folder holding a.png, b.jp2 and c.ico: the run said 'wrote 1 image(s)' and nothing of the other two,
    which Pillow reads when named as files."""
    from rnan_jax import upscale

    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "c.ico")
    (tmp_path / "b.jp2").write_bytes(b"x")  # by its extension: not opened
    (tmp_path / "notes.txt").write_text("x")  # not an image format: no note
    (tmp_path / ".hidden.ico").write_bytes(b"x")
    assert upscale.expand_inputs([str(tmp_path)]) == ([str(tmp_path / "a.png")], [])
    assert upscale.left_out_notes([str(tmp_path), str(tmp_path / "a.png"), "gs://b/x"]) == [
        f"{tmp_path}: left out 2 file(s) of formats a folder scan does not take (b.jp2, c.ico): name them as "
        "inputs to upscale them"]


def test_self_ensemble_compiles_only_the_model_for_each_orientation(params, caplog):
    """The 8 outputs were undone and summed on the device: 7 small programs (rot90, flip, add, divide) compiled for
    every new image size besides the model's two orientations."""
    import logging

    image = _photo(23, 19)  # a size no other test upscales
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles():
        out = upscale_image(params, image, self_ensemble=True)
    compiles = [r.getMessage().split(" with ")[0] for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert compiles == ["Compiling jit(apply)"] * 2, compiles  # (23, 19) and (19, 23)
    expected = ensemble.self_ensemble(lambda x: np.asarray(reference(params, x, config=TINY)),
                                      image.astype(np.float32) / 255)
    np.testing.assert_array_equal(out, metrics.quantize(expected))


def test_compiled_programs_per_architecture_are_bounded(monkeypatch):
    """Every distinct image size kept its compiled program for good (5-10 MB of host memory each for the small
    zoo models): a folder of photos of many sizes grew the process without bound."""
    config = RNANConfig(**{**TINY.__dict__, "features": 6, "gc_reduction": 3})  # a fresh jit cache
    p = init(jax.random.key(3), config)
    monkeypatch.setattr(inference, "MAX_COMPILED_SHAPES", 2, raising=False)
    for size in (8, 9, 10, 11, 12):
        image = _photo(size, 7)
        out = upscale_image(p, image, config=config)
        assert compiled_forward(config)._cache_size() <= 3
    np.testing.assert_array_equal(
        out, metrics.quantize(np.asarray(reference(p, image.astype(np.float32) / 255, config=config))))


def test_float_input_below_zero_is_refused_but_rounding_noise_is_not(params):
    # A [-0.2, 1] image (a normalisation gone wrong) is not an image in [0, 1]: refused before the model sees it
    # (apply itself only refuses values below -0.5).
    image = _photo(8, 8).astype(np.float32) / 255
    image[2, 3, 1], image[4, 5, 0] = -0.2, 1.0
    with pytest.raises(ValueError, match=r"^float image values span \[-0\.2, 1\]; expected \[0, 1\]$"):
        upscale_image(params, image)
    ok = np.clip(image, 0, 1) - 1e-5
    np.testing.assert_allclose(upscale_image(params, ok), np.asarray(reference(params, ok, config=TINY)), atol=1e-6)


def test_on_cpu_the_window_for_host_memory_is_the_largest_whose_share_fits(params, monkeypatch, caplog):
    """The whole image's memory, spread over its area, says what a window needs: with 0.5 of it available (after
    HOST_MEMORY_SHARE), 128 x 128 windows of a 150 x 140 image need 0.78 of it and do not fit, 64 x 64 ones (0.2) do."""
    image = _photo(150, 140)
    memory = compiled_forward(TINY).lower(jax.device_put(params), jax.ShapeDtypeStruct((150, 140, 3), np.float32)
                                          ).compile().memory_analysis()
    need = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    monkeypatch.setattr(inference, "FALLBACK_TILES", (256, 128, 64, 48))
    monkeypatch.setattr(inference, "host_memory_available", lambda: int(need / inference.HOST_MEMORY_SHARE * 0.5))
    calls = []
    with caplog.at_level("WARNING"):
        upscale_image(params, image, progress=lambda done, total: calls.append(total))
    assert "upscaling it in 64-pixel windows" in caplog.text
    assert calls[-1] == len(tile_starts(150, 64, DEFAULT_OVERLAP)) * len(tile_starts(140, 64, DEFAULT_OVERLAP)) == 16


def test_a_refused_float_image_names_its_own_span():
    """The span in the refusal was widened to 0 (min/max with initial=0): an image in [0.2, 200] read [0, 200]."""
    lr = np.full((2, 2, 3), 0.2, np.float32) * np.array([1, 1, 1000], np.float32)
    with pytest.raises(ValueError, match=r"float image values span \[0\.2, 200\]; expected \[0, 1\]"):
        inference.check_float_image(lr)
