"""MATLAB bicubic `imresize`: hand-computed weights, mirroring, sizes, rounding, and Pillow in the interior."""
import numpy as np
import pytest
from PIL import Image

from rnan_jax import degrade

SCALES = [1 / 4, 1 / 3, 1 / 2, 2, 3, 4]


@pytest.mark.parametrize("scale", SCALES)
def test_constant_image_stays_constant(scale):
    image = np.full((13, 17, 3), 137, np.uint8)
    out = degrade.imresize(image, scale)
    np.testing.assert_array_equal(out, 137)
    np.testing.assert_allclose(degrade.imresize(image.astype(np.float64) / 255, scale), 137 / 255, atol=1e-12)


def test_scale_one_is_identity():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (11, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(degrade.imresize(image, 1), image)
    x = rng.random((11, 9))
    np.testing.assert_array_equal(degrade.imresize(x, 1.0), x)


@pytest.mark.parametrize(
    "shape,scale,expected",
    [((13, 17), 1 / 2, (7, 9)), ((255, 12), 1 / 3, (85, 4)), ((13, 17), 3, (39, 51)), ((8, 5), 1 / 4, (2, 2))],
)
def test_output_size_is_ceil(shape, scale, expected):
    assert degrade.imresize(np.zeros(shape, np.uint8), scale).shape == expected


def test_hand_computed_upscale_weights():
    # x2 up: output 1 sits at input 0.75 (1-based); kernel at distances 1.75, 0.75, 0.25, 1.25 from inputs
    # -1, 0, 1, 2 gives -0.0234375, 0.2265625, 0.8671875, -0.0703125, and -1 -> 2, 0 -> 1 by mirroring.
    m = degrade.resize_matrix(4, 8, 2.0)
    np.testing.assert_array_equal(m[0], [1.09375, -0.09375, 0, 0])
    np.testing.assert_array_equal(m[3], [-0.0703125, 0.8671875, 0.2265625, -0.0234375])
    np.testing.assert_array_equal(m[7], m[0][::-1])
    out = degrade.imresize(np.array([[1.0, 2.0, 3.0, 4.0]]), 2)
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out[0], out[1])
    assert out[0, 0] == 0.90625 and out[0, 3] == 2.25


def test_hand_computed_antialiased_downscale_weights():
    # x1/2: the kernel is stretched to 8 input pixels: weights 0.5 * cubic(d / 2) at d = 0.5, 1.5, 2.5, 3.5 are
    # 0.43359375, 0.11328125, -0.03515625, -0.01171875 on each side of the output's centre. Output 1 sits at
    # input 1.5 (1-based): inputs 0, -1, -2 fold onto 1, 2, 3. Output 2 sits at 3.5: only input 0 folds (onto 1).
    m = degrade.resize_matrix(8, 4, 0.5)
    np.testing.assert_array_equal(m[0], [0.546875, 0.3984375, 0.1015625, -0.03515625, -0.01171875, 0, 0, 0])
    np.testing.assert_array_equal(
        m[1], [-0.046875, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625, -0.01171875, 0]
    )
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-15)


def test_uint8_rounds_halves_up_and_clips():
    # Output 1 of [2, 18, ...] x2 is 1.09375 * 2 - 0.09375 * 18 = 0.5 exactly: MATLAB rounds it to 1.
    out = degrade.imresize(np.array([[2, 18, 40, 40]], np.uint8), 2)
    assert out.dtype == np.uint8 and out[0, 0] == 1
    # Overshoot at a sharp edge clips instead of wrapping: outputs 2, 3, 6, 7 are -765/128, -2295/128, 34935/128
    # and 33405/128 (exact sums of the cubic weights with symmetric mirroring), i.e. below 0 and above 255.
    edge = degrade.imresize(np.array([[0, 0, 255, 255]], np.uint8), 2)
    np.testing.assert_array_equal(edge, [[0, 0, 0, 52, 203, 255, 255, 255]] * 2)
    assert degrade.imresize(np.array([[0.0, 0.0, 1.0, 1.0]]), 2).max() > 1.0


@pytest.mark.parametrize("scale,pad", [(1 / 2, 8), (1 / 4, 16), (2, 4), (3, 4)])
def test_border_is_symmetric_mirroring(scale, pad):
    # Resizing an image padded with numpy's 'symmetric' mode (..., 2, 1, 1, 2, ...) and cutting the pad's share
    # out of the result must give the resize of the unpadded image: the border is mirrored the same way.
    rng = np.random.default_rng(1)
    x = rng.random((20, 24, 3))
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    out = degrade.imresize(x, scale)
    cut = round(pad * scale)
    np.testing.assert_allclose(degrade.imresize(padded, scale)[cut:-cut, cut:-cut], out, atol=1e-12)


@pytest.mark.parametrize("scale", SCALES)
def test_interior_matches_pillow_bicubic(scale):
    # Pillow's bicubic uses the same kernel (a = -0.5, widened when downscaling) but renormalizes at the
    # border instead of mirroring: the interiors agree to float32 precision, the borders do not.
    rng = np.random.default_rng(2)
    x = rng.random((48, 36)).astype(np.float32)
    ours = degrade.imresize(x.astype(np.float64), scale)
    h, w = ours.shape
    pillow = np.asarray(Image.fromarray(x, "F").resize((w, h), Image.BICUBIC), np.float64)
    m = 3 if scale < 1 else 3 * scale
    np.testing.assert_allclose(ours[m:-m, m:-m], pillow[m:-m, m:-m], atol=1e-6)
    assert np.abs(ours - pillow).max() > 1e-3


@pytest.mark.parametrize("scale", [0.75, 1.5, 2.5])
def test_interior_matches_pillow_at_non_integer_scales(scale):
    # Sizes chosen so that in * scale is whole (Pillow places samples by out / in, MATLAB by the given scale).
    # Here the kernel's taps do not sum to 1 by themselves: the weights must be normalized as MATLAB's are.
    rng = np.random.default_rng(5)
    x = rng.random((48, 36)).astype(np.float32)
    ours = degrade.imresize(x.astype(np.float64), scale)
    h, w = ours.shape
    assert (h, w) == (48 * scale, 36 * scale)
    pillow = np.asarray(Image.fromarray(x, "F").resize((w, h), Image.BICUBIC), np.float64)
    np.testing.assert_allclose(ours[8:-8, 8:-8], pillow[8:-8, 8:-8], atol=1e-6)


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 1 / 2, 3])
def test_uint8_output_is_the_float_result_rounded_once(scale):
    # The intermediate between the two axes stays in float (as BasicSR's MATLAB port, which matches MATLAB's
    # uint8 output on Set5/Set14): rounding it to integers first changes some output pixels.
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    expected = np.clip(np.floor(degrade.imresize(image.astype(np.float64), scale) + 0.5), 0, 255)
    np.testing.assert_array_equal(degrade.imresize(image, scale), expected)


def test_bicubic_lr_crops_then_downscales():
    rng = np.random.default_rng(3)
    hr = rng.integers(0, 256, (31, 26, 3), dtype=np.uint8)
    lr = degrade.bicubic_lr(hr, 3)
    assert lr.shape == (10, 8, 3) and lr.dtype == np.uint8
    np.testing.assert_array_equal(lr, degrade.imresize(hr[:30, :24], 1 / 3))
    assert degrade.bicubic_lr(hr[..., 0], 2).shape == (15, 13)


def test_channels_are_resized_independently():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (15, 12, 3), dtype=np.uint8)
    out = degrade.imresize(x, 1 / 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], degrade.imresize(x[..., c], 1 / 3))


@pytest.mark.parametrize("s", [2, 3, 4])
def test_output_length_of_the_paper_scales_is_integer_arithmetic(s):
    for n in range(1, 2001):
        assert degrade.output_length(n, 1 / s) == -(-n // s)
        assert degrade.output_length(n, s) == n * s


def test_output_length_keeps_float_noise_as_matlab():
    # MATLAB's imresize: output_size = ceil(scale .* size) of the plain double product; 50 * 1.1 is
    # 55.00000000000001 in IEEE double, so MATLAB gives 56 rows (rounding the product first gave 55).
    assert 50 * 1.1 > 55
    assert degrade.output_length(50, 1.1) == 56
    assert degrade.imresize(np.zeros((50, 20), np.uint8), 1.1).shape == (56, 22)
    assert degrade.output_length(255, 1 / 3) == 85


def test_antialias_false_downscales_with_the_plain_cubic_kernel():
    # MATLAB imresize(x, 1/2, 'bicubic', 'Antialiasing', false): output 1 sits at input 1.5 (1-based) and the
    # kernel keeps its width 4: cubic(1.5) = -0.0625 and cubic(0.5) = 0.5625 at inputs 0..3, input 0 folding onto
    # 1 (the antialiased weights are 0.546875, 0.3984375, ... as above). The flag was not pinned: ignoring it (for
    # one axis or both) went unnoticed.
    m = degrade.resize_matrix(8, 4, 0.5, False)
    np.testing.assert_array_equal(m[0], [0.5, 0.5625, -0.0625, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(m[1], [0, -0.0625, 0.5625, 0.5625, -0.0625, 0, 0, 0])
    np.testing.assert_array_equal(m[3], m[0][::-1])
    # x1/4: output 1 sits at input 2.5, between inputs 2 and 3
    np.testing.assert_array_equal(degrade.resize_matrix(12, 3, 0.25, False)[0],
                                  [-0.0625, 0.5625, 0.5625, -0.0625] + [0] * 8)
    x = np.random.default_rng(7).random((8, 8, 2))
    expected = np.einsum("ai,bj,ijc->abc", m, m, x)
    np.testing.assert_allclose(degrade.imresize(x, 0.5, antialias=False), expected, atol=1e-14)
    assert np.abs(degrade.imresize(x, 0.5) - expected).max() > 0.01
    u8 = (x[..., 0] * 255).astype(np.uint8)
    np.testing.assert_array_equal(degrade.imresize(u8, 0.5, antialias=False),
                                  np.clip(np.floor(m @ u8.astype(np.float64) @ m.T + 0.5), 0, 255))
    # Upscaling never antialiases: the flag changes nothing there.
    np.testing.assert_array_equal(degrade.imresize(x, 3, antialias=False), degrade.imresize(x, 3))


def test_a_zero_scale_and_a_batch_are_refused_in_one_line():
    # A [1, H, W, 3] batch (a model's input) was resized along its batch and height axes without the check.
    with pytest.raises(ValueError, match=r"^scale must be positive, got 0$"):
        degrade.imresize(np.zeros((8, 8), np.uint8), 0)
    with pytest.raises(ValueError, match=r"^imresize expects \[H, W\] or \[H, W, C\], got shape \(1, 8, 8, 3\)$"):
        degrade.imresize(np.zeros((1, 8, 8, 3), np.uint8), 0.5)


def test_an_image_smaller_than_the_scale_is_refused_in_one_line():
    # Cropped to a multiple of the scale, a 1x5 image at x2 has no pixels left: it was an IndexError (index 0 is
    # out of bounds for axis 0 with size 0) from deep inside the resize.
    with pytest.raises(ValueError, match=r"^bicubic_lr: image is 5x1, smaller than the scale x2$"):
        degrade.bicubic_lr(np.zeros((1, 5, 3), np.uint8), 2)
    with pytest.raises(ValueError, match=r"^bicubic_lr: image is 3x4, smaller than the scale x4$"):
        degrade.bicubic_lr(np.zeros((4, 3), np.uint8), 4)
    with pytest.raises(ValueError, match=r"^imresize: the image has no pixels, shape \(0, 4\)$"):
        degrade.imresize(np.zeros((0, 4), np.uint8), 0.5)
    np.testing.assert_array_equal(degrade.bicubic_lr(np.full((4, 5), 9, np.uint8), 4), [[9]])  # one pixel is enough


def test_resizing_keeps_no_dense_matrix_in_memory():
    # Each image size resized kept its dense [out, in] float64 matrices cached (up to 64 sizes): 27 MB here, 416 MB
    # for a 3000x2000 image at x4 (an RGBA photo's alpha in upscale), all kept for the rest of the run.
    import gc
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = degrade.imresize(np.zeros((611, 703), np.uint8), 4)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before - out.nbytes
    finally:
        tracemalloc.stop()
    assert out.shape == (2444, 2812)
    assert retained < 2 * 2**20, retained
