"""python -m rnan_jax.upscale on images with transparency: the colour hidden under fully transparent pixels."""
import jax
import numpy as np
import pytest
from PIL import Image

from rnan_jax import RNANConfig, images, init, upscale_image
from rnan_jax.upscale import fill_transparent, upscale_alpha, upscale_file

TINY = RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)
H, W = 14, 18


@pytest.fixture(scope="module")
def params():
    return init(jax.random.key(0), TINY)


def _disc_alpha(peak=255, dtype=np.uint8):
    """A disc with an antialiased rim (partial alpha) on a fully transparent background."""
    y, x = np.mgrid[0:H, 0:W]
    coverage = np.clip(5.5 - np.hypot(y - 6.5, x - 8.5), 0, 1)
    return np.rint(coverage * peak).astype(dtype)


def _rgba(path, colour, hidden, alpha):
    rgb = np.where((alpha > 0)[..., None], np.asarray(colour, alpha.dtype), np.asarray(hidden, alpha.dtype))
    images.write_image(path, rgb.astype(alpha.dtype), alpha)


def _la(path, gray, hidden, alpha):
    images.write_image(path, np.where(alpha > 0, gray, hidden).astype(np.uint8), alpha)


def _palette(path, colour, hidden, alpha):
    """A palette PNG: entry 0 (the background) fully transparent, entry 1 the opaque disc."""
    im = Image.fromarray((alpha == 255).astype(np.uint8), "P")
    im.putpalette(list(hidden) + list(colour))
    im.save(path, transparency=bytes([0, 255]))


def _colour_key(path, colour, hidden, alpha):
    """An RGB PNG whose tRNS colour key (the background's colour) is transparent."""
    Image.fromarray(np.where((alpha == 255)[..., None], np.uint8(colour), np.uint8(hidden))).save(
        path, transparency=tuple(hidden))


# (writer, visible colour, two hidden colours, alpha); each writes a disc of one colour on a hidden background
CASES = {
    "rgba8": (_rgba, (220, 120, 30), [(0, 0, 0), (255, 255, 255)], _disc_alpha()),
    "la8": (_la, 200, [0, 255], _disc_alpha()),
    "rgba16": (_rgba, (50000, 9000, 30000), [(0, 0, 0), (65535, 1234, 65535)], _disc_alpha(65535, np.uint16)),
    "palette": (_palette, (220, 120, 30), [(0, 0, 0), (255, 255, 255)], _disc_alpha() // 255 * 255),
    "colour_key": (_colour_key, (220, 120, 30), [(255, 0, 255), (0, 0, 0)], _disc_alpha() // 255 * 255),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_colour_hidden_under_transparent_pixels_does_not_reach_the_visible_ones(tmp_path, params, case):
    """A cut-out (a disc of one colour) on fully transparent pixels of another colour, black or white, a
    palette's transparent entry or a colour key's magenta: the network upscaled the hidden colour with the
    visible one, which bled into the disc's edge (dark or coloured fringes; a white disc on black had opaque
    pixels of 152/255). Now the colour is that of a flat image of the disc's colour, whatever was hidden."""
    write, colour, hiddens, alpha = CASES[case]
    outputs = []
    for k, hidden in enumerate(hiddens):
        write(tmp_path / f"{k}.png", colour, hidden, alpha)
        upscale_file(params, TINY, str(tmp_path / f"{k}.png"), str(tmp_path / f"{k}_x2.png"))
        outputs.append(images.decode(tmp_path / f"{k}_x2.png", high_bit_depth=True))
    decoded = images.decode(tmp_path / "0.png", high_bit_depth=True)
    flat = np.broadcast_to(np.asarray(colour, decoded.pixels.dtype), decoded.pixels.shape)
    expected = upscale_image(params, np.ascontiguousarray(flat), config=TINY)
    for out in outputs:
        assert out.pixels.dtype == decoded.pixels.dtype and out.pixels.shape == expected.shape
        np.testing.assert_array_equal(out.pixels, expected)
        np.testing.assert_array_equal(out.alpha, upscale_alpha(decoded.alpha, 2))


@pytest.mark.parametrize("gray", [False, True])
def test_an_opaque_alpha_gives_exactly_the_colour_of_the_image_without_it(tmp_path, params, gray):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (H, W) if gray else (H, W, 3), dtype=np.uint8)
    images.write_image(tmp_path / "plain.png", pixels)
    images.write_image(tmp_path / "opaque.png", pixels, np.full((H, W), 255, np.uint8))
    for name in ("plain", "opaque"):
        upscale_file(params, TINY, str(tmp_path / f"{name}.png"), str(tmp_path / f"{name}_x2.png"))
    plain, opaque = (images.decode(tmp_path / f"{n}_x2.png") for n in ("plain", "opaque"))
    assert plain.alpha is None and (opaque.alpha == 255).all()
    np.testing.assert_array_equal(opaque.pixels, plain.pixels)
    np.testing.assert_array_equal(plain.pixels, upscale_image(params, pixels, config=TINY))


def test_fill_transparent_takes_the_nearest_visible_pixel():
    pixels = np.array([[10, 20, 30, 40],
                       [50, 60, 70, 80],
                       [90, 100, 110, 120]], np.uint16)
    alpha = np.array([[0, 0, 0, 0],
                      [0, 1, 0, 0],
                      [0, 0, 0, 9]], np.uint16)
    np.testing.assert_array_equal(fill_transparent(pixels, alpha), [[60, 60, 60, 120],
                                                                    [60, 60, 60, 120],
                                                                    [60, 60, 120, 120]])
    rgb = np.dstack([pixels, pixels + 1, pixels + 2])
    np.testing.assert_array_equal(fill_transparent(rgb, alpha)[0, 0], [60, 61, 62])
    assert fill_transparent(pixels, alpha + 1) is pixels  # nothing fully transparent: untouched
    assert fill_transparent(pixels, alpha * 0) is pixels  # nothing visible: nothing to fill from


def test_upscale_file_keeps_the_resolution_dpi_turned_with_the_pixels(tmp_path, params):
    """A 300 dpi scan or photo came out without a resolution (no pHYs): editors and layout programs took it as
    72 or 96 dpi, so it printed at 3-4x the size of the upscaled image at the file's own dpi, which image editors
    keep when they scale. Kept now, x and y swapped where EXIF turns the image a quarter, also at 16 bits."""
    rng = np.random.default_rng(2)
    turned = Image.Exif()
    turned[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        tmp_path / "scan.jpg", dpi=(300, 200), exif=turned, quality=95)
    (tmp_path / "deep.png").write_bytes(images.encode_png16(
        rng.integers(0, 65536, (H, W, 4), dtype=np.uint16), dpi=(600, 600)))
    Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(tmp_path / "gray.tif", dpi=(240, 240))
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "none.png")
    expected = {"scan": (200, 300), "deep": (600, 600), "gray": (240, 240), "none": None}
    for src in ("scan.jpg", "deep.png", "gray.tif", "none.png"):
        name = src.split(".")[0]
        upscale_file(params, TINY, str(tmp_path / src), str(tmp_path / f"{name}_x2.png"))
        with Image.open(tmp_path / f"{name}_x2.png") as im:
            dpi = im.info.get("dpi")
            assert im.size == ((2 * H, 2 * W) if name == "scan" else (2 * W, 2 * H))
        if expected[name] is None:
            assert dpi is None
        else:
            np.testing.assert_allclose(dpi, expected[name], atol=0.01)


def test_a_cut_out_saved_as_a_32bit_bmp_keeps_its_transparency(tmp_path, params):
    """Pillow saves RGBA as a 32-bit BMP with alpha in each pixel's 4th byte, which it reads back as RGB: the
    upscaled cut-out came out opaque, its hidden background showing. It comes out as the same cut-out saved as PNG
    does."""
    alpha = _disc_alpha()
    rgba = np.dstack([np.where((alpha > 0)[..., None], np.uint8((220, 120, 30)), np.uint8(0)), alpha])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.bmp")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    for name in ("cut.bmp", "cut.png"):
        upscale_file(params, TINY, str(tmp_path / name), str(tmp_path / f"{name}_x2.png"))
    bmp, png = (images.decode(tmp_path / f"cut.{ext}_x2.png") for ext in ("bmp", "png"))
    assert bmp.alpha is not None
    np.testing.assert_array_equal(bmp.alpha, upscale_alpha(alpha, 2))
    np.testing.assert_array_equal(bmp.pixels, png.pixels)


def test_a_16bit_alpha_is_upscaled_rounded_to_nearest_and_clipped():
    """upscale_alpha of a uint16 alpha: MATLAB bicubic imresize in float, rounded to the nearest value (halves up,
    as MATLAB's uint16 output) and clipped to 0..65535; truncated, every value came out up to 1 lower (a bias of
    -0.5 on average). The 8-bit path agrees with it to within a 16-bit step of 257."""
    from rnan_jax import degrade

    alpha8, alpha16 = _disc_alpha(), _disc_alpha(65535, np.uint16)
    exact = degrade.imresize(alpha16.astype(np.float64), 2)
    out = upscale_alpha(alpha16, 2)
    assert out.dtype == np.uint16 and out.shape == (2 * H, 2 * W)
    np.testing.assert_array_equal(out, np.clip(np.floor(exact + 0.5), 0, 65535))
    assert (exact > 65535).any() or (exact < 0).any()  # the disc's rim overshoots: clipped
    assert abs(float((out - np.clip(exact, 0, 65535)).mean())) < 0.05  # no bias
    assert np.abs(upscale_alpha(alpha8, 2) * 257.0 - out).max() <= 257 + 128


@pytest.mark.parametrize("gray", [False, True])
def test_upscale_file_keeps_the_colour_profile(tmp_path, params, gray):
    """A photo in Display P3 or Adobe RGB (its ICC profile embedded) came out with its profile, so that viewers
    show its colours as the input's; without it they take the pixels for sRGB (duller or oversaturated)."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    profile = profile[:16] + b"GRAY" + profile[20:] if gray else profile
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, (H, W) if gray else (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p3.png", icc_profile=profile)
    upscale_file(params, TINY, str(tmp_path / "p3.png"), str(tmp_path / "p3_x2.png"))
    with Image.open(tmp_path / "p3_x2.png") as im:
        assert im.info.get("icc_profile") == profile and im.size == (2 * W, 2 * H)


@pytest.mark.parametrize("orientation", [5, 7])
def test_an_earlier_output_of_a_transposed_photo_is_recognised_by_its_upright_size(tmp_path, orientation):
    """EXIF orientations 5 and 7 (transpose, transverse) turn a photo sideways as 6 and 8 do: its upright size is its
    stored size swapped, and that times the scale is the size of its earlier output (a rerun with --output the input
    folder leaves it out and replaces it, rather than refusing the photo for an output that is an input file)."""
    from rnan_jax import upscale

    turned = Image.Exif()
    turned[0x0112] = orientation
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "b.jpg", exif=turned)  # upright 12 x 10
    Image.fromarray(np.zeros((24, 20, 3), np.uint8)).save(tmp_path / "b_x2.png")
    b, b_x2 = str(tmp_path / "b.jpg"), str(tmp_path / "b_x2.png")
    assert upscale.earlier_outputs([b, b_x2], str(tmp_path), 2) == {b_x2: b}
    jobs, errors, notes = upscale.plan([b, b_x2], str(tmp_path), 2)
    assert (jobs, errors) == ([(b, b_x2)], [])
    assert upscale.expand([str(tmp_path)])[0] == [b]


def test_a_folder_scan_keeps_a_same_size_file_named_x1_which_no_upscale_writes(tmp_path):
    """Scales are 2 to 4: `a_x1.png` the size of `a.png` (a user's copy so named) is no upscaled output, and a folder
    scan upscales it, without a note; `a_x3.png` 3 times the size is one, and is left out."""
    from rnan_jax import upscale

    for name, (h, w) in {"a.png": (5, 6), "a_x1.png": (5, 6), "a_x3.png": (15, 18)}.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name)
    files, errors, notes = upscale.expand([str(tmp_path)])
    assert files == [str(tmp_path / "a.png"), str(tmp_path / "a_x1.png")] and errors == []
    assert len(notes) == 1 and "left out 1 file(s)" in notes[0] and "a_x3.png" in notes[0]


def test_a_rerun_into_an_output_folder_inside_the_input_folder_names_no_subfolder_left_out(tmp_path):
    """`upscale photos/ --output photos/out`, run again: photos/out holds the first run's outputs, and is where this
    run writes, not a subfolder of images the folder scan left out; one that is (photos/2024) is still named."""
    import os
    import subprocess
    import sys

    from test_zoo import _save_steps

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _save_steps(tmp_path / "run" / "checkpoints", {4: 1}, TINY)
    photos = tmp_path / "photos"
    for folder in (photos / "out", photos / "2024"):
        folder.mkdir(parents=True)
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(photos / "a.png")
    Image.fromarray(np.zeros((12, 14, 3), np.uint8)).save(photos / "out" / "a_x2.png")
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(photos / "2024" / "b.png")
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.upscale", "--checkpoint", str(tmp_path / "run"),
                           str(photos), "--output", str(photos / "out"), "--noprogress"], cwd=repo,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {photos}: left out 1 subfolder(s) holding images (2024): a folder scan does not "
                     "recurse; name them as inputs to upscale their images"]
    assert proc.stderr.splitlines()[-1] == f"wrote 1 image(s) to {photos / 'out'}"
    assert sorted(os.listdir(photos / "out")) == ["a_x2.png"]
