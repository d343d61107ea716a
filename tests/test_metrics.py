"""PSNR/SSIM on Y against independent computations (scikit-image), and the conventions around them."""
import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest
from skimage import color, data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from rnan_jax import metrics


def _pair(seed=0, shape=(64, 80)):
    """A natural uint8 RGB image and a noisy copy of it."""
    hr = data.astronaut()[100 : 100 + shape[0], 150 : 150 + shape[1]]
    rng = np.random.default_rng(seed)
    sr = np.clip(hr.astype(np.int16) + rng.integers(-12, 13, hr.shape), 0, 255).astype(np.uint8)
    return sr, hr


def _skimage_ssim(a, b):
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )


def test_quantize():
    x = np.array([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.3])
    np.testing.assert_array_equal(metrics.quantize(x), [0, 0, 1, 2, 128, 255, 255])
    assert metrics.quantize(jnp.asarray(x, jnp.float32)).dtype == np.uint8


def test_quantize_rounds_the_exact_value_of_a_float32_input():
    # float32(128.5 / 255) is 0.50392156839..., whose exact product with 255 is just below 128.5: it quantizes to
    # 128. A float32 product rounds to 128.5 and would give 129 (so would many (k + 0.5) / 255 for k >= 128).
    x = np.array([(k + 0.5) / 255 for k in range(256)], np.float32)
    exact = [math.floor(Fraction(float(v)) * 255 + Fraction(1, 2)) for v in x]
    assert exact[128] == 128
    np.testing.assert_array_equal(metrics.quantize(x), np.minimum(exact, 255))
    np.testing.assert_array_equal(metrics.quantize(jnp.asarray(x)), np.minimum(exact, 255))


def test_rgb_to_y_and_gray_known_values():
    rgb = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [10, 20, 30]], np.uint8)
    # (65.481 * 10 + 128.553 * 20 + 24.966 * 30) / 255 = 3974.85 / 255 = 15.58764...
    np.testing.assert_array_equal(metrics.rgb_to_y(rgb), [16, 235, 81, 32])
    np.testing.assert_allclose(metrics.rgb_to_y(rgb, rounded=False), [16, 235, 81.481, 31.587647058823], atol=1e-11)
    # 0.299 * 255 = 76.245; 2.99 + 11.74 + 3.42 = 18.15
    np.testing.assert_array_equal(metrics.rgb_to_gray(rgb), [0, 255, 76, 18])


def _exact_rounded_y(rgb):
    # Y * 255000 is an integer: round it half up without floats.
    rgb = rgb.astype(np.int64)
    n = 16 * 255000 + 65481 * rgb[..., 0] + 128553 * rgb[..., 1] + 24966 * rgb[..., 2]
    return (2 * n + 255000) // 510000


def test_y_matches_skimage_rgb2ycbcr():
    _, hr = _pair()
    np.testing.assert_allclose(metrics.rgb_to_y(hr, rounded=False), color.rgb2ycbcr(hr)[..., 0], atol=1e-9)


def test_rounded_y_rounds_exact_halves_up():
    # Colours whose Y is exactly k + 1/2 exist (a float evaluation of the formula misrounds some of them).
    grid = np.stack(np.meshgrid(np.arange(256), np.arange(0, 256, 3), np.arange(0, 256, 5), indexing="ij"), -1)
    rgb = grid.reshape(-1, 3).astype(np.uint8)
    n = 16 * 255000 + rgb.astype(np.int64) @ np.array([65481, 128553, 24966])
    ties = rgb[(2 * n) % 510000 == 255000]
    assert len(ties) > 0
    np.testing.assert_array_equal(metrics.rgb_to_y(ties), _exact_rounded_y(ties))
    np.testing.assert_array_equal(metrics.rgb_to_y(ties), metrics.rgb_to_y(ties, rounded=False) + 0.5)
    np.testing.assert_array_equal(metrics.rgb_to_y(rgb), _exact_rounded_y(rgb))


@pytest.mark.parametrize("shave", [0, 2, 4])
def test_psnr_y_matches_skimage(shave):
    sr, hr = _pair()
    sl = slice(shave, -shave or None)
    y_sr = _exact_rounded_y(sr)[sl, sl].astype(np.float64)
    y_hr = _exact_rounded_y(hr)[sl, sl].astype(np.float64)
    expected = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    assert metrics.psnr_y(sr, hr, shave) == pytest.approx(expected, abs=1e-10)
    assert 28 < expected < 40


def test_psnr_y_with_unrounded_y_matches_skimage():
    sr, hr = _pair(2)
    y_sr, y_hr = (color.rgb2ycbcr(x)[..., 0][2:-2, 2:-2] for x in (sr, hr))
    expected = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    assert metrics.psnr_y(sr, hr, 2, rounded_y=False) == pytest.approx(expected, abs=1e-10)
    assert metrics.psnr_y(sr, hr, 2, rounded_y=False) != pytest.approx(metrics.psnr_y(sr, hr, 2), abs=1e-3)


def test_gray_output_against_colour_reference_is_scored_on_y_of_the_gray_replicated():
    # Y of (g, g, g) is 16 + 219 g / 255 (the coefficients sum to 219), rounded.
    sr, hr = _pair(3)
    gray = sr[..., 1]
    y_gray = np.floor(16 + 219 * gray.astype(np.float64) / 255 + 0.5)[2:-2, 2:-2]
    expected = peak_signal_noise_ratio(_exact_rounded_y(hr)[2:-2, 2:-2].astype(np.float64), y_gray, data_range=255)
    assert metrics.psnr_y(gray, hr, 2) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("rounded", [True, False])
def test_ssim_y_matches_skimage_reference_configuration(rounded):
    sr, hr = _pair(1)
    if rounded:
        y_sr, y_hr = (_exact_rounded_y(x)[3:-3, 3:-3].astype(np.float64) for x in (sr, hr))
    else:
        y_sr, y_hr = (color.rgb2ycbcr(x)[..., 0][3:-3, 3:-3] for x in (sr, hr))
    expected = _skimage_ssim(y_hr, y_sr)
    assert metrics.ssim_y(sr, hr, 3, rounded_y=rounded) == pytest.approx(expected, abs=1e-7)
    assert 0.5 < expected < 0.99


def test_ssim_of_unrelated_and_shifted_images():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 256, (2, 40, 50)).astype(np.float64)
    assert metrics.ssim(a, b) == pytest.approx(_skimage_ssim(a, b), abs=1e-7)
    assert metrics.ssim(a, a + 7.0) == pytest.approx(_skimage_ssim(a, a + 7.0), abs=1e-7)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    _, hr = _pair()
    assert metrics.psnr_y(hr, hr, 2) == math.inf
    assert metrics.ssim_y(hr, hr, 2) == pytest.approx(1.0, abs=1e-12)


def test_grayscale_reference_is_scored_on_gray_values():
    rng = np.random.default_rng(6)
    hr = rng.integers(0, 256, (30, 30), dtype=np.uint8)
    sr = np.clip(hr.astype(np.int16) + rng.integers(-5, 6, hr.shape), 0, 255).astype(np.uint8)
    expected = peak_signal_noise_ratio(hr[2:-2, 2:-2], sr[2:-2, 2:-2], data_range=255)
    assert metrics.psnr_y(sr, hr, 2) == pytest.approx(expected, abs=1e-10)
    # An RGB output with three equal channels reduces to the same gray values.
    assert metrics.psnr_y(np.repeat(sr[..., None], 3, -1), hr, 2) == pytest.approx(expected, abs=1e-10)
    assert metrics.ssim_y(sr, hr, 2) == pytest.approx(_skimage_ssim(hr[2:-2, 2:-2], sr[2:-2, 2:-2]), abs=1e-7)
    # Through the Y formula the same pixels would read differently (it compresses 0..255 into 16..235).
    assert metrics.psnr_y(np.repeat(sr[..., None], 3, -1), np.repeat(hr[..., None], 3, -1), 2) != pytest.approx(
        expected, abs=0.5
    )


def test_rgb_output_reduced_to_gray_for_gray_reference():
    rng = np.random.default_rng(7)
    sr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    hr = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    gray = np.floor(0.299 * sr[..., 0] + 0.587 * sr[..., 1] + 0.114 * sr[..., 2] + 0.5)
    expected = peak_signal_noise_ratio(hr.astype(np.float64), gray, data_range=255)
    assert metrics.psnr_y(sr, hr, 0) == pytest.approx(expected, abs=1e-10)


def test_shaved_border_does_not_count():
    sr, hr = _pair()
    damaged = sr.copy()
    damaged[:3] = 0
    damaged[:, -3:] = 255
    assert metrics.psnr_y(damaged, hr, 3) == metrics.psnr_y(sr, hr, 3)
    assert metrics.psnr_y(damaged, hr, 2) < metrics.psnr_y(sr, hr, 2)


def test_rejects_float_and_mismatched_inputs():
    sr, hr = _pair()
    with pytest.raises(TypeError, match="uint8"):
        metrics.psnr_y(sr / 255.0, hr, 2)
    with pytest.raises(ValueError, match="differ in size"):
        metrics.psnr_y(sr[:-1], hr, 2)
    with pytest.raises(ValueError, match="SSIM needs"):
        metrics.ssim_y(sr[:14, :14], hr[:14, :14], 2)


@pytest.mark.parametrize("size,shave", [((4, 30), 2), ((30, 6), 3), ((5, 5), 3)])
def test_shaving_everything_is_refused_rather_than_scored_nan(size, shave):
    sr, hr = _pair(shape=size)
    with pytest.raises(ValueError, match="too small to shave"):
        metrics.psnr_y(sr, hr, shave)
    sr, hr = np.zeros((2, 2 * shave + 1, 2 * shave + 1, 3), np.uint8)  # one pixel left: Y 16 against Y 235
    hr[shave, shave] = 255
    assert metrics.psnr_y(sr, hr, shave) == pytest.approx(20 * math.log10(255 / 219), abs=1e-12)


def test_psnr_of_uint8_arrays_and_other_peaks():
    # Differences of -10 and +10 levels: mse 100 (uint8 subtraction would wrap -10 to 246).
    a, b = np.array([[10, 200]], np.uint8), np.array([[20, 190]], np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    # Peak 1 (float images in [0, 1], as tools/tiling_bound.py compares them): mse 0.01 is 20 dB.
    assert metrics.psnr(np.array([0.1, 0.5]), np.array([0.2, 0.4]), peak=1.0) == pytest.approx(20.0, abs=1e-12)
    # SSIM's constants scale with the peak: on a 0..1 scale it equals the 0..255 value, as skimage's does.
    rng = np.random.default_rng(8)
    x, y = rng.integers(0, 256, (2, 24, 30)).astype(np.float64)
    expected = structural_similarity(x / 255, y / 255, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)
    assert metrics.ssim(x / 255, y / 255, peak=1.0) == pytest.approx(expected, abs=1e-7)
    assert metrics.ssim(x / 255, y / 255, peak=1.0) == pytest.approx(metrics.ssim(x, y), abs=1e-12)


def test_psnr_refuses_arrays_of_different_shapes_rather_than_broadcasting():
    """[H, W] against [H, W, 1] (a gray plane kept with its channel axis) broadcast to [H, H, W] and gave a number
    for pixel pairs that do not correspond (9.47 dB here, for planes 12.4 dB apart on average per channel)."""
    x = np.random.default_rng(0).random((40, 40, 3))
    gray = x.mean(-1, keepdims=True)
    with pytest.raises(ValueError, match=r"psnr compares two same-shaped arrays, got \(40, 40\) and \(40, 40, 1\)"):
        metrics.psnr(x[..., 0], gray, peak=1.0)
    with pytest.raises(ValueError, match="same-shaped"):
        metrics.psnr(x, gray, peak=1.0)
    assert metrics.psnr(x[..., 0], gray[..., 0], peak=1.0) == pytest.approx(
        10 * math.log10(1 / np.mean((x[..., 0] - gray[..., 0]) ** 2)), abs=1e-12)


def test_a_gray_image_with_its_channel_axis_is_scored_as_gray():
    """[H, W, 1] (a gray output kept with its channel axis, as a model's or torch's) was an IndexError traceback
    (index 1 out of bounds) from psnr_y/ssim_y, also inside evaluate (which lost every score made before it)."""
    rng = np.random.default_rng(3)
    hr = rng.integers(0, 256, (40, 44), dtype=np.uint8)
    sr = np.clip(hr.astype(np.int16) + rng.integers(-6, 7, hr.shape), 0, 255).astype(np.uint8)
    expected = peak_signal_noise_ratio(hr[2:-2, 2:-2], sr[2:-2, 2:-2], data_range=255)
    for a, b in ((sr[..., None], hr), (sr, hr[..., None]), (sr[..., None], hr[..., None])):
        assert metrics.psnr_y(a, b, 2) == pytest.approx(expected, abs=1e-9)
        assert metrics.ssim_y(a, b, 2) == pytest.approx(metrics.ssim_y(sr, hr, 2), abs=1e-12)
    rgb_sr, rgb_hr = _pair()
    assert metrics.psnr_y(rgb_sr[..., 1:2], rgb_hr, 2) == metrics.psnr_y(rgb_sr[..., 1], rgb_hr, 2)
    for bad in (np.zeros((40, 44, 2), np.uint8), np.zeros((40, 44, 4), np.uint8), np.zeros((1, 40, 44, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"metrics compare \[H, W, 3\] or gray \[H, W\] \(or \[H, W, 1\]\) images"):
            metrics.psnr_y(bad, hr, 2)


def test_quantize_refuses_nan_rather_than_making_it_black():
    """A NaN (a diverged model's output) was cast to 0, a black pixel: scored as a number, with only numpy's
    RuntimeWarning."""
    with pytest.raises(ValueError, match=r"the image holds 2 NaN value\(s\)"):
        metrics.quantize(np.array([[0.5, np.nan], [np.nan, 1.0]]))
    np.testing.assert_array_equal(metrics.quantize(np.array([np.inf, -np.inf])), [255, 0])  # clipped, as before


def test_ssim_of_an_11_pixel_plane_is_its_one_window():
    """The smallest plane SSIM takes (benchmark_sets.min_side: scale shaved from each border of 2 * scale + 11
    pixels): one window, Wang et al.'s formula with the Gaussian weights summed by hand. Refusing it went unnoticed."""
    sr, hr = _pair(4, shape=(15, 15))
    a, b = (_exact_rounded_y(x)[2:-2, 2:-2].astype(np.float64) for x in (sr, hr))
    r = np.arange(11) - 5.0
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    var_a, var_b = (w * a * a).sum() - mu_a**2, (w * b * b).sum() - mu_b**2
    cov = (w * a * b).sum() - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    expected = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    assert metrics.ssim_y(sr, hr, 2) == pytest.approx(expected, abs=1e-12)
    assert metrics.ssim_y(sr, hr, 2) == pytest.approx(_skimage_ssim(b, a), abs=1e-7)
    assert 0.5 < expected < 0.999


def test_luminance_pair_compares_rounded_y_unless_told():
    """figures.py scores through luminance_pair's default: it must be the rounded Y of psnr_y's default (and of
    Table 1), not RCAN's fractional Y."""
    sr, hr = _pair(5)
    a, b = metrics.luminance_pair(sr, hr, 3)
    np.testing.assert_array_equal(a, _exact_rounded_y(sr)[3:-3, 3:-3])
    np.testing.assert_array_equal(b, _exact_rounded_y(hr)[3:-3, 3:-3])
    a, b = metrics.luminance_pair(sr, hr, 3, rounded_y=False)
    np.testing.assert_allclose(a, color.rgb2ycbcr(sr)[3:-3, 3:-3, 0], atol=1e-9)
    np.testing.assert_allclose(b, color.rgb2ycbcr(hr)[3:-3, 3:-3, 0], atol=1e-9)


def test_quantize_refuses_an_integer_image():
    """quantize(uint8 [0, 128, 255]) gave [0, 255, 255]: an image quantized already, clipped to [0, 1] and x255."""
    with pytest.raises(TypeError, match=r"quantize takes a float image in \[0, 1\], got uint8"):
        metrics.quantize(np.array([0, 128, 255], np.uint8))
    np.testing.assert_array_equal(metrics.quantize(np.array([0, 0.5, 1], np.float32)), [0, 128, 255])
    np.testing.assert_array_equal(metrics.quantize(jnp.array([0, 0.5, 1], jnp.bfloat16)), [0, 128, 255])
