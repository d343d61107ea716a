"""images.decode of 16-bit TIFFs (every layout and codec Pillow reads) and of 16-bit PNG colour keys, and the
upscaling CLI keeping a 16-bit TIFF at 16 bits."""
import io
import logging
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

import rnan_jax
from rnan_jax import images, upscale_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compressed(block: np.ndarray, compression: str) -> bytes:
    """uint8 [rows, bytes a row] as one TIFF strip or tile compressed by libtiff: the one strip of Pillow's 8-bit
    gray TIFF of those bytes (LZW and deflate compress the bytes, PackBits each row, whatever the samples)."""
    if compression == "raw":
        return block.tobytes()
    buf = io.BytesIO()
    Image.fromarray(block).save(buf, "TIFF", compression=compression)
    with Image.open(buf) as im:
        (offset,), (count,) = im.tag_v2[273], im.tag_v2[279]
    return buf.getvalue()[offset:offset + count]


def _tiff(samples: np.ndarray, *, byteorder: str = "<", compression: str = "raw", rows_per_strip: int = 3,
          tile: int | None = None, planar: bool = False, photometric: int | None = None,
          extra_sample: int | None = 2, orientation: int = 1) -> bytes:
    """A baseline TIFF of uint16 [H, W, C] samples (C: 1 or 2 gray, 3 or 4 RGB; the 2nd or 4th an extra sample,
    `extra_sample` 2 unassociated alpha, 1 premultiplied, 0 unspecified, None none: CMYK with `photometric` 5),
    in strips of `rows_per_strip` rows or `tile`-square tiles (edge tiles padded), the samples interleaved or
    `planar` (a plane a band)."""
    h, w, c = samples.shape
    planes = [samples[..., i:i + 1] for i in range(c)] if planar else [samples]
    if tile:
        padded = [np.pad(p, ((0, -h % tile), (0, -w % tile), (0, 0))) for p in planes]
        blocks = [p[y:y + tile, x:x + tile] for p in padded for y in range(0, h, tile) for x in range(0, w, tile)]
    else:
        blocks = [p[y:y + rows_per_strip] for p in planes for y in range(0, h, rows_per_strip)]
    payloads = [_compressed(np.ascontiguousarray(b, byteorder + "u2").view(np.uint8).reshape(len(b), -1),
                            compression) for b in blocks]
    body = bytearray(b"II*\x00" if byteorder == "<" else b"MM\x00*") + bytes(4)
    offsets = []
    for p in payloads:
        offsets.append(len(body))
        body += p + bytes(len(p) % 2)
    short, long = 3, 4
    code = {"raw": 1, "tiff_lzw": 5, "tiff_adobe_deflate": 8, "packbits": 32773}[compression]
    tags = {256: (long, [w]), 257: (long, [h]), 258: (short, [16] * c), 259: (short, [code]),
            262: (short, [photometric or (2 if c >= 3 else 1)]), 274: (short, [orientation]), 277: (short, [c]),
            284: (short, [2 if planar else 1])}
    if c in (2, 4) and extra_sample is not None:
        tags[338] = (short, [extra_sample])
    if tile:
        tags.update({322: (long, [tile]), 323: (long, [tile]), 324: (long, offsets),
                     325: (long, [len(p) for p in payloads])})
    else:
        tags.update({273: (long, offsets), 278: (long, [rows_per_strip]), 279: (long, [len(p) for p in payloads])})
    struct.pack_into(byteorder + "I", body, 4, len(body))
    values_at = len(body) + 2 + 12 * len(tags) + 4
    table, values = bytearray(struct.pack(byteorder + "H", len(tags))), bytearray()
    for tag, (kind, vals) in sorted(tags.items()):
        packed = struct.pack(byteorder + ("H" if kind == short else "I") * len(vals), *vals)
        if len(packed) <= 4:
            table += struct.pack(byteorder + "HHI", tag, kind, len(vals)) + packed.ljust(4, b"\x00")
        else:
            table += struct.pack(byteorder + "HHII", tag, kind, len(vals), values_at + len(values))
            values += packed
    return bytes(body + table + bytes(4) + values)


def _samples(h, w, c, seed=0):
    """Random uint16 samples: their low bytes matter (almost none is an 8-bit value scaled up, v = 257 k)."""
    return np.random.default_rng(seed).integers(0, 65536, (h, w, c)).astype(np.uint16)


def _with_alpha(decoded):
    """The decoded pixels with the alpha, if any, as a last channel."""
    return decoded.pixels if decoded.alpha is None else np.dstack([decoded.pixels, decoded.alpha])


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("channels,layout,compression", [
    *((channels, layout, compression) for compression in ("raw", "tiff_lzw", "packbits", "tiff_adobe_deflate")
      for channels, layout in ((3, "strips"), (4, "tiles"))),
    (3, "planar", "raw"),  # compressed planar: Pillow's libtiff decoder gives 8 bits only (the warning test)
])
def test_16bit_tiff_is_read_at_full_precision(tmp_path, caplog, byteorder, channels, layout, compression):
    """Pillow reads 16-bit RGB(A) TIFFs as 8 bits, the high byte of each sample (and the bands of an uncompressed
    planar one as garbage); `decode` gets all 16 bits, and rounds them for 8-bit use."""
    samples = _samples(7, 20, channels, seed=channels)  # tiles: two of 16 x 16, both padded
    path = tmp_path / "a.tif"
    path.write_bytes(_tiff(samples, byteorder=byteorder, compression=compression,
                           tile=16 if layout == "tiles" else None, planar=layout == "planar"))
    with caplog.at_level(logging.WARNING, logger="rnan_jax.images"):
        deep = images.decode(path, high_bit_depth=True)
        shallow = images.decode(path)
    assert not caplog.records
    assert deep.pixels.dtype == np.uint16 and deep.pixels.shape == (7, 20, 3)
    np.testing.assert_array_equal(_with_alpha(deep), samples)
    assert shallow.pixels.dtype == np.uint8
    np.testing.assert_array_equal(_with_alpha(shallow), np.floor(samples / 257 + 0.5).astype(np.uint8))


def test_16bit_tiff_premultiplied_alpha_unused_sample_and_orientation(tmp_path):
    """RGBa (premultiplied alpha) comes out straight, divided at 16 bits; an unspecified 4th sample (RGBX) is
    dropped; the EXIF orientation (6: rotate 90 degrees clockwise) is applied to all 16 bits."""
    straight = _samples(5, 6, 4, seed=3)
    straight[0, :, 3] = 0
    straight[1, :, 3] = 65535
    alpha = straight[..., 3:].astype(np.float64)
    premultiplied = np.dstack([np.floor(straight[..., :3] * alpha / 65535 + 0.5), alpha]).astype(np.uint16)
    (tmp_path / "a.tif").write_bytes(_tiff(premultiplied, byteorder=">", extra_sample=1))
    decoded = images.decode(tmp_path / "a.tif", high_bit_depth=True)
    colour = np.where(alpha > 0, np.floor(premultiplied[..., :3] * 65535.0 / np.maximum(alpha, 1) + 0.5), 0)
    np.testing.assert_array_equal(decoded.pixels, colour.astype(np.uint16))
    np.testing.assert_array_equal(decoded.alpha, straight[..., 3])
    np.testing.assert_array_equal(decoded.pixels[1], straight[1, :, :3])  # opaque: exactly the colour written

    (tmp_path / "x.tif").write_bytes(_tiff(straight, compression="tiff_lzw", extra_sample=0))
    np.testing.assert_array_equal(_with_alpha(images.decode(tmp_path / "x.tif", high_bit_depth=True)),
                                  straight[..., :3])
    (tmp_path / "r.tif").write_bytes(_tiff(straight, compression="tiff_adobe_deflate", orientation=6))
    np.testing.assert_array_equal(_with_alpha(images.decode(tmp_path / "r.tif", high_bit_depth=True)),
                                  np.rot90(straight, k=-1))


def test_16bit_tiff_pillow_reads_at_8_bits_warns_once_by_name(tmp_path, caplog):
    """A compressed planar 16-bit TIFF (libtiff in Pillow unpacks its bands' high bytes only) and a 16-bit CMYK
    one are read at 8 bits, with a warning naming the file, rather than silently."""
    samples = _samples(6, 5, 4, seed=4)
    (tmp_path / "planar.tif").write_bytes(_tiff(samples[..., :3], compression="tiff_lzw", planar=True))
    (tmp_path / "cmyk.tif").write_bytes(_tiff(samples, photometric=5, extra_sample=None))
    for name, mode in (("planar.tif", "RGB"), ("cmyk.tif", "CMYK")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rnan_jax.images"):
            decoded = images.decode(tmp_path / name, high_bit_depth=True)
        assert [r.getMessage() for r in caplog.records] == [
            f"{tmp_path / name}: a 16-bit {mode} TIFF, which Pillow reads at 8 bits (the high byte of each sample); "
            "read so"]
        assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (6, 5, 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnan_jax.images"):  # for 8 bits too: truncated
        np.testing.assert_array_equal(images.decode(tmp_path / "planar.tif").pixels, samples[..., :3] >> 8)
    assert "planar.tif: a 16-bit RGB TIFF" in caplog.text


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_colour_key_becomes_alpha_at_full_precision(tmp_path, channels):
    """A 16-bit gray or RGB PNG's tRNS colour key is a 16-bit value: pixels equal to it in all 16 bits are
    transparent, one that differs only in the low byte is not (it came out without alpha)."""
    samples = _samples(4, 5, channels, seed=5)
    key = samples[1, 2].copy()
    samples[3, 4] = key
    samples[0, 0] = key ^ 1  # the same high bytes
    png = images.encode_png16(samples)
    png = png[:33] + images._png_chunk(b"tRNS", struct.pack(f">{channels}H", *key)) + png[33:]
    (tmp_path / "k.png").write_bytes(png)
    transparent = np.ones((4, 5), bool)
    transparent[1, 2] = transparent[3, 4] = False
    deep = images.decode(tmp_path / "k.png", high_bit_depth=True)
    np.testing.assert_array_equal(deep.pixels, samples[..., 0] if channels == 1 else samples)
    assert deep.alpha is not None and deep.alpha.dtype == np.uint16
    np.testing.assert_array_equal(deep.alpha, np.where(transparent, 65535, 0))
    shallow = images.decode(tmp_path / "k.png")
    np.testing.assert_array_equal(shallow.alpha, np.where(transparent, 255, 0).astype(np.uint8))
    np.testing.assert_array_equal(shallow.pixels, np.floor(deep.pixels / 257 + 0.5).astype(np.uint8))


def test_upscale_cli_writes_a_16bit_png_for_a_16bit_tiff(tmp_path):
    """16-bit TIFF in (RGB LZW big-endian, RGBA PackBits tiled): 16-bit PNG out, computed from all 16 bits."""
    rgb = _samples(12, 14, 3, seed=6)
    rgba = _samples(12, 14, 4, seed=7)
    (tmp_path / "rgb.tif").write_bytes(_tiff(rgb, byteorder=">", compression="tiff_lzw"))
    (tmp_path / "rgba.tif").write_bytes(_tiff(rgba, compression="packbits", tile=16))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.upscale", "--checkpoint", "zoo:small_x2",
                           str(tmp_path / "rgb.tif"), str(tmp_path / "rgba.tif"), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla")))
    assert proc.returncode == 0, proc.stderr
    params, config = rnan_jax.load("zoo:small_x2")
    for name, samples in (("rgb", rgb), ("rgba", rgba)):
        png = (out / f"{name}_x2.png").read_bytes()
        assert png[24:26] == bytes([16, {3: 2, 4: 6}[samples.shape[-1]]])  # IHDR: 16 bits, RGB or RGBA
        written = images.decode(out / f"{name}_x2.png", high_bit_depth=True)
        assert written.pixels.dtype == np.uint16 and written.pixels.shape == (24, 28, 3)
        np.testing.assert_array_equal(written.pixels, upscale_image(params, samples[..., :3], config=config))
    assert images.decode(out / "rgba_x2.png", high_bit_depth=True).alpha.dtype == np.uint16


def _tiff12(values: np.ndarray) -> bytes:
    """A little-endian 12-bit gray TIFF (one uncompressed strip, samples packed MSB first, 3 bytes for 2) of
    values [H, W] < 4096, W even: the layout of machine-vision and microscope cameras' files."""
    h, w = values.shape
    a = values.reshape(h, w // 2, 2).astype(np.uint32)
    packed = np.stack([a[..., 0] >> 4, (a[..., 0] & 15) << 4 | a[..., 1] >> 8, a[..., 1] & 255], -1)
    data = packed.astype(np.uint8).tobytes()
    body = bytearray(b"II*\x00" + bytes(4)) + data + bytes(len(data) % 2)
    struct.pack_into("<I", body, 4, len(body))
    tags = {256: (4, w), 257: (4, h), 258: (3, 12), 259: (3, 1), 262: (3, 1), 273: (4, 8), 277: (3, 1),
            278: (4, h), 279: (4, len(data))}
    table = bytearray(struct.pack("<H", len(tags)))
    for tag, (kind, value) in sorted(tags.items()):
        table += struct.pack("<HHI", tag, kind, 1) + struct.pack("<H" if kind == 3 else "<I", value).ljust(4, b"\x00")
    return bytes(body + table + bytes(4))


def test_12bit_tiff_is_scaled_by_its_depth_not_read_16_times_too_dark(tmp_path):
    """Pillow gives a 12-bit TIFF's samples as 0..4095 in a 16-bit mode; taken as 16-bit, the image was 16 times
    too dark (4095 -> 16 of 255). By its depth: 4095 is white, at 16 bits and at 8."""
    values = np.random.default_rng(5).integers(0, 4096, (4, 6)).astype(np.uint16)
    values[0, :2] = (0, 4095)
    path = tmp_path / "g12.tif"
    path.write_bytes(_tiff12(values))
    deep, shallow = images.decode(path, high_bit_depth=True), images.decode(path)
    np.testing.assert_array_equal(deep.pixels, np.floor(values * (65535 / 4095) + 0.5).astype(np.uint16))
    np.testing.assert_array_equal(shallow.pixels, np.floor(values * (255 / 4095) + 0.5).astype(np.uint8))
    assert (deep.pixels[0, 0], deep.pixels[0, 1], shallow.pixels[0, 1]) == (0, 65535, 255)


def test_float_and_32bit_tiffs_outside_the_range_are_clipped_with_a_warning_by_name(tmp_path, caplog):
    """A float TIFF outside [0, 1] (HDR, or 0..255) came out nearly white without a word, a NaN as an arbitrary
    value with numpy's RuntimeWarning, a 32-bit integer one above 65535 clipped silently: now each is said."""
    hdr = np.linspace(6, 1000, 64, dtype=np.float32).reshape(8, 8)
    holes = np.full((8, 8), 0.5, np.float32)
    holes[0, :3] = (np.nan, np.inf, -np.inf)
    wide = (np.arange(64, dtype=np.int32) * 5000).reshape(8, 8)
    for name, a, mode in (("hdr", hdr, "F"), ("holes", holes, "F"), ("wide", wide, "I"),
                          ("fine", np.full((8, 8), 0.25, np.float32), "F")):
        Image.fromarray(a, mode=mode).save(tmp_path / f"{name}.tif")
    with caplog.at_level(logging.WARNING, logger="rnan_jax.images"), warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast" for the NaN
        hdr8 = images.decode(tmp_path / "hdr.tif").pixels
        holes16 = images.decode(tmp_path / "holes.tif", high_bit_depth=True).pixels
        wide16 = images.decode(tmp_path / "wide.tif", high_bit_depth=True).pixels
        fine8 = images.decode(tmp_path / "fine.tif").pixels
    assert hdr8.dtype == np.uint8 and (hdr8 == 255).all()
    assert holes16[0, :4].tolist() == [0, 65535, 0, 32768] and holes16.dtype == np.uint16
    assert wide16.max() == 65535 and wide16[0, :3].tolist() == [0, 5000, 10000]
    assert (fine8 == 64).all()
    assert [r.getMessage().replace(str(tmp_path), "T") for r in caplog.records] == [
        "T/hdr.tif: float samples in [6, 1000], read as [0, 1]: clipped",
        "T/holes.tif: float samples in [0.5, 0.5] and 3 NaN or infinite (NaN read as 0), read as [0, 1]: clipped",
        "T/wide.tif: 32-bit integer samples in [0, 315000], read as 16-bit: clipped to [0, 65535]"]


def test_folder_scans_leave_out_hidden_files_such_as_macos_appledouble(tmp_path):
    # A folder copied from a Mac holds `._photo.png` (metadata, not a PNG) beside each image, and `.DS_Store`:
    # the upscaling CLI reported each as failed (exit status 1), and one in a benchmark folder left the set unscored.
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "._photo.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60))
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    expected = [str(tmp_path / "photo.png")]
    assert images.list_images(tmp_path) == expected
    assert images.list_images(tmp_path, images.READABLE_EXTENSIONS) == expected



def test_folder_scans_leave_out_folders_named_like_images(tmp_path):
    # A folder named like an image (album.png/, or a link to one) was listed as an image and then skipped as
    # unreadable ("Is a directory"): evaluate left the set holding it unscored, upscale exited 1, and an LR folder's
    # X2/0001x2.png/ was taken as 0001's LR file over 0001.png beside it.
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "album.png").mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "album.png" / "inner.png")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "album.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")  # still listed: skipped by name when read
    expected = [str(tmp_path / "broken.png"), str(tmp_path / "photo.png")]
    assert images.list_images(tmp_path) == expected
    assert images.list_images(tmp_path, images.READABLE_EXTENSIONS) == expected
    (tmp_path / "lr" / "0001x2.png").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "lr" / "0001.png")
    assert images.find_image(str(tmp_path / "lr"), ("0001x2", "0001")) == str(tmp_path / "lr" / "0001.png")
    with pytest.raises(images.ImageError, match="folder holds no image files"):
        images.list_images(tmp_path / "lr" / "0001x2.png")

def _broken_second_frame(first: np.ndarray, second: np.ndarray, tag: int, value: int) -> bytes:
    """A two-frame little-endian TIFF (Pillow's) whose second IFD's SHORT `tag` holds `value`; a value of 0 for
    tag 0 empties the IFD."""
    buf = io.BytesIO()
    Image.fromarray(first).save(buf, "TIFF", save_all=True, append_images=[Image.fromarray(second)])
    b = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", b, 4)[0]
    ifd = struct.unpack_from("<I", b, ifd + 2 + 12 * struct.unpack_from("<H", b, ifd)[0])[0]
    if tag == 0:
        struct.pack_into("<H", b, ifd, 0)
    for i in range(struct.unpack_from("<H", b, ifd)[0]):
        if struct.unpack_from("<H", b, ifd + 2 + 12 * i)[0] == tag:
            struct.pack_into("<H", b, ifd + 2 + 12 * i + 8, value)
    return bytes(b)


@pytest.mark.parametrize("tag,value", [(0, 0), (259, 12345), (262, 77)])  # Pillow: TypeError, KeyError, SyntaxError
def test_a_broken_later_frame_does_not_lose_the_first(tmp_path, tag, value):
    # Counting the frames of a multi-page TIFF whose second page is broken raised TypeError or KeyError out of
    # decode (a traceback that ended the upscaling run, the images after it not attempted); a SyntaxError was
    # caught but left the image set up as the broken page, of another size: "tile cannot extend outside image".
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for h, w in ((6, 7), (9, 5)))
    path = tmp_path / "pages.tif"
    path.write_bytes(_broken_second_frame(first, second, tag, value))
    decoded = images.decode(path)
    assert decoded.frames == 1
    np.testing.assert_array_equal(decoded.pixels, first)


def test_a_gif_cut_short_anywhere_gives_its_first_frame_or_one_clear_error(tmp_path):
    # An animated GIF cut short (a partial download) inside its second frame raised IndexError or struct.error
    # while its frames were counted: a traceback that ended the upscaling run.
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)).quantize(4) for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    with Image.open(buf) as im:
        first = np.asarray(im.convert("RGB"))
    path, complete = tmp_path / "cut.gif", 0
    for cut in range(len(data) // 3, len(data)):
        path.write_bytes(data[:cut])
        try:
            decoded = images.decode(path)
        except images.ImageError as e:
            assert str(e).startswith(f"{path}: cannot read image (")
            continue
        np.testing.assert_array_equal(decoded.pixels, first)
        complete += 1
    assert complete > 30  # every cut after the first frame's data


def test_a_malformed_exif_block_still_turns_the_image_upright(tmp_path):
    # Orientation 6 beside a tag of the wrong type (PhotometricInterpretation as text): Pillow reads the block but
    # cannot write it back into the turned image, and decode raised struct.error (a traceback in the CLI).
    exif = (b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + struct.pack("<H", 2) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)
            + struct.pack("<HHI4s", 0x0106, 2, 4, b"Cam\x00") + bytes(4))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    for name, options in (("a.webp", {"lossless": True}), ("a.png", {})):
        Image.fromarray(pixels).save(tmp_path / name, exif=exif, **options)
        np.testing.assert_array_equal(images.decode(tmp_path / name).pixels, np.rot90(pixels, -1))
    Image.fromarray(pixels).save(tmp_path / "a.jpg", exif=exif)
    assert images.decode(tmp_path / "a.jpg").pixels.shape == (5, 4, 3)


def test_pillow_s_corrupt_exif_warning_names_each_file_also_from_threads(tmp_path, caplog):
    # Pillow warns "Corrupt EXIF data.  Expecting to read 12 bytes but only got 2." without the file's name, and
    # Python shows it once per line of Pillow: of a folder of such photos, one line said something was wrong,
    # not which. The pipeline decodes in threads, where warnings.catch_warnings cannot tell files apart.
    import concurrent.futures

    exif = (b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + struct.pack("<H", 5) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)
            + b"\x00\x00")  # 5 tags announced, 1 there: the orientation (6) is still read
    paths = [tmp_path / f"p{i}.jpg" for i in range(6)]
    for i, path in enumerate(paths):
        Image.fromarray(np.full((4, 6, 3), 40 * i, np.uint8)).save(path, exif=exif if i % 2 else b"")
    with caplog.at_level(logging.WARNING, logger="rnan_jax.images"), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            shapes = list(pool.map(lambda p: images.decode(p).pixels.shape, paths * 3))
        assert [images.exif_orientation(p) for p in paths] == [1, 6] * 3
    assert shapes == [(4, 6, 3), (6, 4, 3)] * 9
    assert not [w for w in shown if "EXIF" in str(w.message)]
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"{paths[i]}: Corrupt EXIF data. Expecting to read 12 bytes but only got 2. (Pillow, reading its metadata)"
        for i in (1, 3, 5)]
    with pytest.warns(UserWarning, match="Corrupt EXIF data"), Image.open(paths[1]) as im:  # not ours: Pillow's own
        im.getexif()


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_an_uncompressed_tiff_turned_sideways_by_exif_comes_out_upright_not_scrambled(tmp_path, mode, orientation):
    # Pillow memory-maps a one-strip uncompressed TIFF opened by its path, and (Pillow 13) with the size it has
    # already turned for orientations 5-8: an 8-bit gray, RGBA or 16-bit gray scan stored sideways came out with
    # its pixels scrambled, at the unturned size.
    rng = np.random.default_rng(orientation)
    shape = (6, 10, 4) if mode == "RGBA" else (6, 10)
    pixels = rng.integers(0, 65536 if mode == "I;16" else 256, shape).astype(np.uint16 if mode == "I;16" else np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "a.tif", exif=exif.tobytes())  # mode: L, RGBA or I;16
    upright = np.asarray(Image.fromarray(pixels).transpose(images._UPRIGHT[orientation]))
    decoded = images.decode(tmp_path / "a.tif", high_bit_depth=True)
    np.testing.assert_array_equal(_with_alpha(decoded), upright)


def test_upscale_folder_scans_take_jfif_jpe_and_apng_files(tmp_path):
    """Files Pillow reads under the other names of JPEG and PNG were left out of an upscaled folder without a word
    (the run said it wrote 1 image and exited 0)."""
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), np.uint8)
    for name, fmt in (("a.jfif", "JPEG"), ("b.JPE", "JPEG"), ("c.apng", "PNG"), ("d.png", "PNG")):
        Image.fromarray(rgb).save(tmp_path / name, format=fmt)
    found = images.list_images(tmp_path, images.READABLE_EXTENSIONS)
    assert [os.path.basename(p) for p in found] == ["a.jfif", "b.JPE", "c.apng", "d.png"]
    assert images.decode(found[2]).pixels.tolist() == rgb.tolist()
    assert images.decode(found[0]).pixels.shape == (12, 10, 3)
    assert [os.path.basename(p) for p in images.list_images(tmp_path)] == ["d.png"]  # training, benchmark scans


def test_a_16_bit_colour_ppm_keeps_its_low_bits(tmp_path):
    """A binary PPM of more than 8 bits a sample (what dcraw -4 writes) was read at 8 bits by Pillow: the
    upscaled 16-bit PNG lost its low bits without a word. maxval below 65535 is scaled to full range."""
    rgb = np.random.default_rng(0).integers(0, 65536, (4, 5, 3)).astype(">u2")
    (tmp_path / "a.ppm").write_bytes(b"P6\n5 4\n65535\n" + rgb.tobytes())
    decoded = images.decode(tmp_path / "a.ppm", high_bit_depth=True)
    assert decoded.pixels.dtype == np.uint16 and decoded.pixels.tolist() == rgb.tolist()
    assert images.decode(tmp_path / "a.ppm").pixels.tolist() == np.rint(rgb / 257.0).astype(np.uint8).tolist()
    ten = np.random.default_rng(1).integers(0, 1024, (3, 2, 3)).astype(">u2")
    (tmp_path / "b.ppm").write_bytes(b"P6 2 3 1023\n" + ten.tobytes())
    assert images.decode(tmp_path / "b.ppm", high_bit_depth=True).pixels.tolist() == \
        np.rint(ten * (65535 / 1023)).astype(np.uint16).tolist()
    Image.fromarray(rgb[..., 0].astype(np.uint8)).convert("RGB").save(tmp_path / "c.ppm")  # 8-bit: as it was
    assert images.decode(tmp_path / "c.ppm", high_bit_depth=True).pixels.dtype == np.uint8


def test_a_rerun_into_the_input_folder_leaves_out_its_earlier_outputs_rather_than_upscaling_them(tmp_path):
    """`upscale photos/ --output photos/` run twice: the second run took the first's `a_x2.png` as an input, wrote
    `a_x2_x2.png` from it, and refused `a.png` (its output an input file). An input that is where another input's
    output goes (named with the extension or without) and is that input's size times the scale is left out with a
    note, and replaced; one of another size is a user's own file, still never overwritten."""
    from rnan_jax import upscale

    def save(name, h, w, **kwargs):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name, **kwargs)
        return str(tmp_path / name)

    turned = Image.Exif()
    turned[0x0112] = 6  # stored 10 x 12, upright 12 x 10
    a_png, a_jpg, b, c = save("a.png", 10, 12), save("a.jpg", 10, 12), save("b.jpg", 10, 12, exif=turned), \
        save("c.png", 10, 12)
    earlier = [save("a_png_x2.png", 20, 24), save("a_x2.png", 20, 24), save("b_x2.png", 24, 20)]
    c_own = save("c_x2.png", 10, 12)  # not c.png's size times 2: the user's own, named so
    out = str(tmp_path)
    files = images.list_images(tmp_path, images.READABLE_EXTENSIONS)
    jobs, errors, notes = upscale.plan(files, out, 2)
    assert jobs == [(a_jpg, f"{out}/a_jpg_x2.png"), (a_png, f"{out}/a_png_x2.png"), (b, f"{out}/b_x2.png"),
                    (c_own, f"{out}/c_x2_x2.png")]
    assert errors == [f"{c}: its output {c_own} is an input file; not overwriting it (choose another --output)"]
    assert notes[0] == ("left out 3 input(s) that are earlier outputs of other inputs (named after them, 2x their "
                        f"size): {', '.join(earlier)}")


def test_upscale_says_which_subfolders_holding_images_a_folder_scan_left_out(tmp_path):
    """`upscale photos/` with photos/2023/*.jpg beside photos/cover.jpg said 'wrote 1 image(s)' and nothing of the
    subfolders, which a folder scan does not enter. A note names them; not the --output folder inside the input
    folder (a rerun), nor hidden or image-less subfolders."""
    from rnan_jax import upscale

    pixels = np.zeros((4, 5, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cover.jpg")
    for sub in ("2023", "2024", ".git", "notes", "out"):
        (tmp_path / sub).mkdir()
    Image.fromarray(pixels).save(tmp_path / "2023" / "a.jpg")
    Image.fromarray(pixels).save(tmp_path / "2024" / "b.png")
    Image.fromarray(pixels).save(tmp_path / ".git" / "c.png")
    (tmp_path / "notes" / "x.txt").write_text("x")
    Image.fromarray(pixels).save(tmp_path / "out" / "cover_x2.png")
    assert upscale.left_out_notes([str(tmp_path)], str(tmp_path / "out")) == [
        f"{tmp_path}: left out 2 subfolder(s) holding images (2023, 2024): a folder scan does not recurse; name them "
        "as inputs to upscale their images"]
    assert upscale.left_out_notes([str(tmp_path / "2023")], str(tmp_path / "out")) == []


def test_upscale_refuses_an_output_named_like_an_image_file(tmp_path):
    """`--output big.jpg` (as other upscalers take an output file) made a folder big.jpg/ holding a_x2.png and
    said 'wrote 1 image(s) to big.jpg'. Refused in one line before any work, nothing made; an existing folder of
    such a name is still taken."""
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "a.png")

    def run(output):
        return subprocess.run([sys.executable, "-m", "rnan_jax.upscale", "--checkpoint", "zoo:small_x2",
                               str(tmp_path / "a.png"), "--output", str(output)], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla")))

    proc = run(tmp_path / "big.jpg")
    assert proc.returncode == 2 and not (tmp_path / "big.jpg").exists()
    assert proc.stderr.strip().splitlines() == [
        f"upscale: --output {tmp_path / 'big.jpg'}: is the folder the upscaled images go into (as "
        "<name>_x<scale>.png), not an image file; name a folder"]
    (tmp_path / "album.png").mkdir()
    proc = run(tmp_path / "album.png")
    assert proc.returncode == 0, proc.stderr
    assert images.decode(tmp_path / "album.png" / "a_x2.png").pixels.shape == (12, 14, 3)


def _cmyk_profile(lab_of, *, intent: int = 1) -> bytes:
    """A CMYK ICC v2 output profile whose A2B0 (lut8, a 2-point grid: exact at 0 and 255 of each ink) gives the Lab
    (D50) `lab_of(c, m, y, k)` for each ink in {0, 1}; `intent` its rendering intent (1: relative colorimetric)."""
    def tag(body):
        return body + b"\0" * (-len(body) % 4)

    def s15(*values):
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    desc = tag(b"desc" + bytes(4) + struct.pack(">I", 5) + b"CMYK\0" + bytes(8) + bytes(3) + bytes(67))
    white = tag(b"XYZ " + bytes(4) + s15(0.9642, 1.0, 0.8249))
    clut = bytes(round(v) for c in (0, 1) for m in (0, 1) for y in (0, 1) for k in (0, 1)
                 for v in (lambda L, a, b: (L * 255 / 100, a + 128, b + 128))(*lab_of(c, m, y, k)))
    ramp = bytes(range(256))
    a2b0 = tag(b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + s15(1, 0, 0, 0, 1, 0, 0, 0, 1) + ramp * 4 + clut + ramp * 3)
    tags = [(b"desc", desc), (b"wtpt", white), (b"A2B0", a2b0)]
    table, body, offset = struct.pack(">I", len(tags)), b"", 128 + 4 + 12 * len(tags)
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"lcms" + struct.pack(">I", 0x02100000) + b"prtr" + b"CMYK"
              + b"Lab " + bytes(12) + b"acsp" + bytes(24) + struct.pack(">I", intent) + s15(0.9642, 1.0, 0.8249)
              + bytes(48))
    assert len(header) == 128
    return header + table + body


def _srgb_of_gray(lightness):
    """The sRGB value of a neutral CIE L* (relative colorimetric: L* 100 is white)."""
    y = ((lightness + 16) / 116) ** 3
    return 255 * (1.055 * y ** (1 / 2.4) - 0.055 if y > 0.0031308 else 12.92 * y)


def test_a_cmyk_jpeg_is_converted_through_its_embedded_profile(tmp_path, caplog):
    """Pillow's CMYK -> RGB conversion (R = 255 - C - K) ignores the file's ICC profile: a print JPEG came out in
    other colours than any colour-managed viewer shows (here a profile's 20% gray ink read as black, its cyan as
    (0, 255, 255)). Converted through the profile to sRGB; without a profile, or with one LittleCMS cannot use
    (a warning names the file), as before."""
    def lab_of(c, m, y, k):  # K: a gray of L* 20; C: a blue-green of L* 60
        return (20, 0, 0) if k else (100 - 40 * c - 30 * m - 10 * y, -30 * c + 60 * m, -40 * c + 70 * y)

    profile = _cmyk_profile(lab_of)
    cmyk = np.zeros((16, 48, 4), np.uint8)  # white (no ink), K, C: flat 8x8 blocks, near exact at quality 100
    cmyk[:, 16:32, 3] = 255
    cmyk[:, 32:, 0] = 255
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "print.jpg", icc_profile=profile, quality=100)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "print.tif", icc_profile=profile)
    for name in ("print.jpg", "print.tif"):
        decoded = images.decode(tmp_path / name)
        white, gray, cyan = (decoded.pixels[8, x].astype(int) for x in (8, 24, 40))
        assert white.tolist() == [255, 255, 255] and decoded.icc_profile is None
        assert np.abs(gray - _srgb_of_gray(20)).max() <= 1  # 48: what the profile says, not 0
        assert cyan[2] > cyan[1] + 30 > cyan[0] + 30 and 140 < cyan[1] < 180, cyan  # not (0, 255, 255)
    assert np.asarray(Image.open(tmp_path / "print.jpg").convert("RGB"))[8, 24].tolist() == [0, 0, 0]  # Pillow's

    Image.fromarray(cmyk, "CMYK").save(tmp_path / "plain.jpg", quality=100)  # no profile: Pillow's, as before
    assert images.decode(tmp_path / "plain.jpg").pixels[8, ::16].tolist() == [[255, 255, 255], [0, 0, 0],
                                                                             [0, 255, 255]]
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "broken.jpg", icc_profile=profile[:128] + bytes(20), quality=100)
    with caplog.at_level(logging.WARNING, logger="rnan_jax.images"):
        assert images.decode(tmp_path / "broken.jpg").pixels[8, ::16].tolist() == [[255, 255, 255], [0, 0, 0],
                                                                                  [0, 255, 255]]
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'broken.jpg'}: its CMYK colour profile cannot be applied (cannot build transform): converted "
        "to RGB without it, so its colours may be off"]


def _mpo_types(path, mp_type):
    """Rewrites the MP type of every picture in the Multi-Picture index of an MPO that Pillow wrote."""
    data = bytearray(path.read_bytes())
    tiff = data.index(b"MPF\0") + 4  # the index is a little-endian TIFF IFD
    ifd = tiff + struct.unpack_from("<I", data, tiff + 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        tag, _, count, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * i)
        if tag == 0xB002:  # MP Entry: 16 bytes a picture, the first 4 its attribute (flags, type)
            for entry in range(tiff + value, tiff + value + count, 16):
                attribute = struct.unpack_from("<I", data, entry)[0]
                struct.pack_into("<I", data, entry, attribute & 0xFF000000 | mp_type)
    path.write_bytes(bytes(data))


def test_a_phone_jpeg_with_a_gain_map_is_one_frame_and_a_stereo_mpo_two(tmp_path):
    """A phone photo with a gain map or depth map beside it (Pillow opens it as MPO: a primary picture and one of
    type Undefined) counted 2 frames: upscale said "has 2 frames; upscaled the first" of an ordinary photo. Its
    frames are its views: 1 there, 2 for a stereo pair (both pictures of type Disparity), whose note holds."""
    photo = np.random.default_rng(0).integers(0, 256, (16, 24, 3), np.uint8)
    gain_map = Image.fromarray(np.full((8, 12), 40, np.uint8)).convert("RGB")
    Image.fromarray(photo).save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[gain_map],
                                quality=100)
    with Image.open(tmp_path / "phone.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2
        first = np.asarray(im.convert("RGB"))
    decoded = images.decode(tmp_path / "phone.jpg")
    assert decoded.frames == 1 and decoded.pixels.tolist() == first.tolist()
    (tmp_path / "stereo.mpo").write_bytes((tmp_path / "phone.jpg").read_bytes())
    _mpo_types(tmp_path / "stereo.mpo", 0x020002)  # Multi-Frame Image: Disparity
    with Image.open(tmp_path / "stereo.mpo") as im:
        assert [e["Attribute"]["MPType"] for e in im.mpinfo[0xB002]] == ["Multi-Frame Image: (Disparity)"] * 2
    assert images.decode(tmp_path / "stereo.mpo").frames == 2


def test_a_folder_scan_leaves_out_upscaled_outputs_of_any_scale_beside_their_sources(tmp_path):
    """`upscale photos/` at x2, photos/ holding a.png and a_x4.png (an earlier x4 run's output, --output photos/):
    a_x4.png was upscaled too, to a_x4_x2.png, without a word (the rerun rule knew only the run's own scale). Our
    outputs of any scale (NAME_x<s>.png or NAME_<ext>_x<s>.png, s times NAME's size) are left out of a scan with
    one note; a file named _x4 of another size is the user's own, and a file named as an input is upscaled."""
    from rnan_jax import upscale

    def save(name, h, w):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name)
        return str(tmp_path / name)

    a, b = save("a.png", 10, 12), save("b.jpg", 6, 8)
    a_x4, a_x4_x2, b_x3 = save("a_x4.png", 40, 48), save("a_x4_x2.png", 80, 96), save("b_jpg_x3.png", 18, 24)
    c, c_x2 = save("c.png", 5, 5), save("c_x2.png", 7, 7)  # not c's size times 2
    assert upscale.expand_inputs([str(tmp_path)]) == ([a, b, c, c_x2], [])
    files, errors, notes = upscale.expand([str(tmp_path)])
    assert (files, errors) == ([a, b, c, c_x2], [])
    assert notes == [f"{tmp_path}: left out 3 file(s) that are upscaled outputs of its other images (NAME_x<scale>"
                     ".png, <scale> times NAME's size: a_x4.png, a_x4_x2.png, b_jpg_x3.png): name them as inputs to "
                     "upscale them (one that is where an input's output goes, --output this folder, is replaced "
                     "instead)"]
    files, errors, notes = upscale.expand([str(tmp_path), a_x4])  # named: upscaled, and not counted as left out
    assert files == [a, a_x4, b, c, c_x2] and notes[0].startswith(f"{tmp_path}: left out 2 file(s)")
    assert upscale.expand([a_x4, str(tmp_path)])[0] == [a_x4, a, b, c, c_x2]
    assert upscale.expand([a, a_x4_x2, b_x3]) == ([a, a_x4_x2, b_x3], [], [])  # no folder scan: as named


def test_a_link_and_its_target_in_a_scan_are_one_image_with_a_note(tmp_path):
    """photos/ holding z.png and a.png -> z.png: one output, a_x2.png, and no word of z.png, which the user looks
    for as z_x2.png. Still one image (the run does not upscale a file twice), now with a note naming both."""
    from rnan_jax import upscale

    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "z.png")
    os.symlink("z.png", tmp_path / "a.png")
    a, z = str(tmp_path / "a.png"), str(tmp_path / "z.png")
    assert upscale.expand([str(tmp_path)]) == ([a], [], [
        f"1 input(s) are the same file as an earlier one under another name (a link), and are upscaled once, under "
        f"the earlier name: {z} (= {a})"])
    assert upscale.expand([z, str(tmp_path), z]) == ([z], [], [
        f"1 input(s) are the same file as an earlier one under another name (a link), and are upscaled once, under "
        f"the earlier name: {a} (= {z})"])  # the same path twice, or as a file and in its folder: no note
    assert upscale.expand([str(tmp_path), z])[2] == [
        f"1 input(s) are the same file as an earlier one under another name (a link), and are upscaled once, under "
        f"the earlier name: {z} (= {a})"]  # in the folder and named: one note
    assert upscale.expand([str(tmp_path / "sub" / ".." / "z.png"), z]) == (
        [str(tmp_path / "sub" / ".." / "z.png")], [], [])  # not a link: the same name, spelled another way


def test_outputs_whose_names_differ_only_in_case_are_refused_as_one_file(tmp_path):
    """x/a.png and y/A.png (or a.png and A.png in one folder of a case-sensitive disk) written to a macOS or Windows
    disk or share: a_x2.png and A_x2.png are one file there, so the second replaced the first, both reported
    written. Refused as two inputs with the same output name are, or named by extension where that tells them
    apart (a.png, A.jpg); an output that is an input file but for case is not written over it."""
    from rnan_jax import upscale

    a, big_a, big_a_jpg = str(tmp_path / "x" / "a.png"), str(tmp_path / "y" / "A.png"), str(tmp_path / "y" / "A.jpg")
    out = str(tmp_path / "out")
    jobs, errors, notes = upscale.plan([a, big_a], out, 2)
    assert jobs == [(a, f"{out}/a_x2.png")] and notes == []
    assert errors == [f"{big_a}: its output {out}/A_x2.png differs only in case from {out}/a_x2.png, that of {a}, "
                      "which a case-insensitive disk (macOS, Windows) takes for the same file; rename one of them"]
    jobs, errors, notes = upscale.plan([a, big_a_jpg], out, 2)
    assert jobs == [(a, f"{out}/a_png_x2.png"), (big_a_jpg, f"{out}/A_jpg_x2.png")] and errors == []
    mine = str(tmp_path / "x" / "A_X2.png")  # the user's file, where a.png's output goes with --output x/
    jobs, errors, notes = upscale.plan([a, mine], str(tmp_path / "x"), 2)
    assert jobs == [(mine, str(tmp_path / "x" / "A_X2_x2.png"))]
    assert errors == [f"{a}: its output {tmp_path / 'x' / 'a_x2.png'} differs only in case from the input file "
                      f"{mine}, which a case-insensitive disk (macOS, Windows) takes for the same file; not "
                      "overwriting it (choose another --output)"]


def _bmp32(rgba: np.ndarray, *, top_down: bool = False) -> bytes:
    """A 32-bit BI_RGB BMP (40-byte header) whose 4th byte a pixel is `rgba`'s alpha, as Pillow writes RGBA."""
    h, w = rgba.shape[:2]
    rows = rgba[..., [2, 1, 0, 3]]
    data = (rows if top_down else rows[::-1]).tobytes()
    header = struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, 32, 0, len(data), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(data), 0, 0, 14 + 40) + header + data


def test_a_32bit_bmp_whose_fourth_byte_is_alpha_keeps_it(tmp_path):
    """Pillow saves RGBA as a 32-bit BI_RGB BMP with alpha in the 4th byte and reads it back as RGB: a cut-out
    upscaled from one came out with its hidden background. That byte is alpha now, as browsers take it, unless it
    is 0 everywhere (unused, as the format says) or 255 everywhere (opaque)."""
    rgba = np.random.default_rng(3).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "pillow.bmp")
    (tmp_path / "top_down.bmp").write_bytes(_bmp32(rgba, top_down=True))
    for name in ("pillow.bmp", "top_down.bmp"):
        decoded = images.decode(tmp_path / name)
        np.testing.assert_array_equal(decoded.pixels, rgba[..., :3])
        assert decoded.alpha is not None, name
        np.testing.assert_array_equal(decoded.alpha, rgba[..., 3])
    for unused in (0, 255):
        (tmp_path / f"{unused}.bmp").write_bytes(_bmp32(np.dstack([rgba[..., :3], np.full((5, 7), unused, np.uint8)])))
        decoded = images.decode(tmp_path / f"{unused}.bmp")
        assert decoded.alpha is None
        np.testing.assert_array_equal(decoded.pixels, rgba[..., :3])
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.bmp")  # 24 bits: no 4th byte
    assert images.decode(tmp_path / "rgb.bmp").alpha is None


def test_upscale_says_which_parameters_auto_chose(tmp_path):
    """--which auto (the default) reads the EMA of a run trained with one, else the newest parameters: evaluate
    names the choice (`Scored: --checkpoint RUN --which ema`), upscale said nothing of it. It says so, in the same
    words, once."""
    from test_zoo import _save_steps

    config = rnan_jax.RNANConfig(scale=2, features=8, num_groups=1, num_blocks=1, gc_reduction=2)
    _save_steps(tmp_path / "run" / "checkpoints", {4: 1}, config)
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "a.png")
    proc = subprocess.run([sys.executable, "-m", "rnan_jax.upscale", "--checkpoint", str(tmp_path / "run"),
                           str(tmp_path / "a.png"), "--output", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RNAN_JAX_CACHE=str(tmp_path / "xla")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "--which" in line]
    assert lines == [f"Upscaling with: --checkpoint {tmp_path / 'run'} --which ema (step 4)"]
    assert os.listdir(tmp_path / "out") == ["a_x2.png"]


def _pgm(path, samples: np.ndarray, maxval: int) -> None:
    h, w = samples.shape
    with open(path, "wb") as f:
        f.write(f"P5\n{w} {h}\n{maxval}\n".encode() + samples.astype(">u2" if maxval > 255 else "u1").tobytes())


def test_a_dark_16bit_pgm_stays_dark_and_16_bits(tmp_path):
    """A 16-bit PGM (Pillow's mode I, which does not say its depth) whose samples were all <= 255 was taken for an
    8-bit image: 100/65535 read as 100/255, and upscaled as an 8-bit PNG. Its maxval says 16 bits."""
    dark = np.array([[0, 100, 200, 255], [128, 129, 50, 7]], np.uint16)
    _pgm(tmp_path / "dark.pgm", dark, 65535)
    np.testing.assert_array_equal(images.decode(tmp_path / "dark.pgm").pixels, np.rint(dark / 257.0))
    deep = images.decode(tmp_path / "dark.pgm", high_bit_depth=True).pixels
    assert deep.dtype == np.uint16
    np.testing.assert_array_equal(deep, dark)
    bright = dark * 250  # above 255: read as 16-bit before too
    _pgm(tmp_path / "bright.pgm", bright, 65535)
    np.testing.assert_array_equal(images.decode(tmp_path / "bright.pgm").pixels, np.rint(bright / 257.0))
    ten = np.array([[0, 1, 2, 1023]], np.uint16)  # a 10-bit PGM: Pillow scales maxval to 65535
    _pgm(tmp_path / "ten.pgm", ten, 1023)
    np.testing.assert_array_equal(images.decode(tmp_path / "ten.pgm").pixels, np.rint(ten * 255.0 / 1023))
    eight = np.array([[0, 100, 255]], np.uint8)  # an 8-bit PGM as it was
    _pgm(tmp_path / "eight.pgm", eight, 255)
    np.testing.assert_array_equal(images.decode(tmp_path / "eight.pgm").pixels, eight)
    assert images.decode(tmp_path / "eight.pgm", high_bit_depth=True).pixels.dtype == np.uint8
    (tmp_path / "plain.pgm").write_bytes(b"P2\n3 1\n65535\n0 100 255\n")  # a plain (ASCII) 16-bit PGM
    assert images.decode(tmp_path / "plain.pgm").pixels.tolist() == [[0, 0, 1]]
    assert images.decode(tmp_path / "plain.pgm", high_bit_depth=True).pixels.tolist() == [[0, 100, 255]]


def test_8bit_alpha_beside_16bit_pixels_is_written_at_full_scale(tmp_path):
    """`write_image` of uint16 pixels with a uint8 alpha: the alpha goes to 16 bits x257, so that 255 (opaque) is
    65535, not 65280 (x256: every pixel slightly transparent), and 128 is 32896."""
    pixels = np.array([[[0, 1000, 65535], [300, 40000, 7]]], np.uint16)
    alpha = np.array([[255, 128]], np.uint8)
    images.write_image(tmp_path / "a.png", pixels, alpha)
    decoded = images.decode(tmp_path / "a.png", high_bit_depth=True)
    np.testing.assert_array_equal(decoded.pixels, pixels)
    assert decoded.alpha.dtype == np.uint16 and decoded.alpha.tolist() == [[65535, 32896]]


def test_16bit_pixels_written_to_an_8bit_format_are_rounded_from_16_bits(tmp_path):
    """`write_image` of uint16 to a format without 16-bit colour (BMP here): each sample round(x / 257), the
    inverse of x257 (200 -> 1, 60000 -> 233, 65535 -> 255), not its high byte (200 -> 0, 60000 -> 234)."""
    pixels = np.array([[[200, 60000, 65535], [0, 32896, 128]]], np.uint16)
    alpha = np.array([[60000, 200]], np.uint16)
    images.write_image(tmp_path / "a.bmp", pixels)
    assert images.decode(tmp_path / "a.bmp").pixels.tolist() == [[[1, 233, 255], [0, 128, 0]]]
    images.write_image(tmp_path / "a.tif", pixels, alpha)
    decoded = images.decode(tmp_path / "a.tif")
    assert decoded.pixels.tolist() == [[[1, 233, 255], [0, 128, 0]]] and decoded.alpha.tolist() == [[233, 1]]


def test_the_resolution_is_turned_with_every_quarter_turn_and_written_at_16_bits_as_pillow_writes_it(tmp_path):
    """EXIF orientations 5 to 8 turn the image a quarter (5 and 7 with a flip), so x and y dpi swap: 6 and 8 only
    were swapped. encode_png16's pHYs holds the pixels per metre rounded, as Pillow writes them: 72 dpi is 2835
    (72.009 dpi read back), not 2834 (71.98)."""
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "a.jpg", dpi=(300, 200), exif=exif)
        decoded = images.decode(tmp_path / "a.jpg")
        turned = orientation >= 5
        assert decoded.pixels.shape[:2] == ((12, 8) if turned else (8, 12))
        np.testing.assert_allclose(decoded.dpi, (200, 300) if turned else (300, 200), atol=0.01)
    for dpi in [(72, 96), (300, 150.5)]:
        (tmp_path / "deep.png").write_bytes(images.encode_png16(np.zeros((2, 3, 3), np.uint16), dpi=dpi))
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "pillow.png", dpi=dpi)
        with Image.open(tmp_path / "deep.png") as deep, Image.open(tmp_path / "pillow.png") as pillow:
            assert deep.info["dpi"] == pillow.info["dpi"]
        np.testing.assert_allclose(images.decode(tmp_path / "deep.png").dpi, dpi, atol=0.02)


def test_a_colour_profile_is_kept_only_for_pixels_of_its_colour_space(tmp_path):
    """An embedded ICC profile goes with the pixels only where its colour space (bytes 16-20 of its header) is
    theirs: an RGB profile in a gray image (or a gray one in an RGB image), which a PNG may not hold (libpng:
    "RGB color space not permitted on grayscale PNG"), is dropped, not written into the upscaled file."""
    from PIL import ImageCms

    rgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    gray_profile = rgb_profile[:16] + b"GRAY" + rgb_profile[20:]
    rgb, gray = np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), np.uint8)
    for pixels, profile, kept in [(rgb, rgb_profile, True), (gray, gray_profile, True),
                                  (gray, rgb_profile, False), (rgb, gray_profile, False)]:
        Image.fromarray(pixels).save(tmp_path / "a.jpg", icc_profile=profile)
        assert images.decode(tmp_path / "a.jpg").icc_profile == (profile if kept else None), (pixels.ndim, kept)


def test_a_32bit_integer_tiff_is_8_bit_up_to_255_and_16_bit_above(tmp_path):
    """Pillow's mode I (a 32-bit integer TIFF) does not say its depth: samples up to 255 (255 included) are 8-bit
    values, any above 255 make it 16-bit."""
    for samples, expected in [([[0, 128, 255]], [[0, 128, 255]]), ([[0, 128, 256]], [[0, 0, 1]]),
                              ([[0, 32896, 65535]], [[0, 128, 255]])]:
        Image.fromarray(np.array(samples, np.int32), "I").save(tmp_path / "i.tif")
        assert images.decode(tmp_path / "i.tif").pixels.tolist() == expected, samples


def test_a_16bit_gray_and_alpha_png_keeps_both_low_bytes(tmp_path):
    """A 16-bit gray + alpha PNG (Pillow unpacks LA;16B to 8 bits) is read at full precision: gray and alpha each
    from their own high and low byte; at 8 bits each rounded from 16."""
    rng = np.random.default_rng(4)
    samples = rng.integers(0, 65536, (5, 7, 2), dtype=np.uint16)
    (tmp_path / "la.png").write_bytes(images.encode_png16(samples))
    deep = images.decode(tmp_path / "la.png", high_bit_depth=True)
    assert deep.pixels.dtype == np.uint16 and deep.alpha.dtype == np.uint16
    np.testing.assert_array_equal(deep.pixels, samples[..., 0])
    np.testing.assert_array_equal(deep.alpha, samples[..., 1])
    shallow = images.decode(tmp_path / "la.png")
    np.testing.assert_array_equal(shallow.pixels, np.rint(samples[..., 0] / 257.0))
    np.testing.assert_array_equal(shallow.alpha, np.rint(samples[..., 1] / 257.0))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_write_image_embeds_the_colour_profile_in_every_png_it_writes(tmp_path, dtype, channels):
    """The colour profile given to `write_image` (the upscale CLI's: the input's Display P3 or Adobe RGB) is in the
    file, read back by Pillow as it was given, at 8 and 16 bits, gray or colour, with or without alpha."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    if channels <= 2:
        profile = profile[:16] + b"GRAY" + profile[20:]
    samples = np.random.default_rng(5).integers(0, np.iinfo(dtype).max, (3, 4, channels), dtype=dtype)
    colour = samples[..., 0] if channels in (1, 2) else samples[..., :3]
    images.write_image(tmp_path / "a.png", colour, samples[..., -1] if channels in (2, 4) else None,
                       icc_profile=profile)
    with Image.open(tmp_path / "a.png") as im:
        assert im.info.get("icc_profile") == profile
    decoded = images.decode(tmp_path / "a.png", high_bit_depth=True)
    assert decoded.icc_profile == profile
    np.testing.assert_array_equal(decoded.pixels, colour)


def test_inputs_told_apart_by_extension_are_named_with_it_in_lower_case(tmp_path):
    """`a.PNG` and `a.JPG` (a camera's upper-case extensions) beside each other: written as a_png_x2.png and
    a_jpg_x2.png, as the README says, whatever the case of the extension."""
    from rnan_jax import upscale

    a_png, a_jpg = str(tmp_path / "a.PNG"), str(tmp_path / "a.JPG")
    out = str(tmp_path / "out")
    jobs, errors, notes = upscale.plan([a_png, a_jpg], out, 2)
    assert errors == [] and jobs == [(a_png, f"{out}/a_png_x2.png"), (a_jpg, f"{out}/a_jpg_x2.png")]


@pytest.mark.parametrize("ext", [".png", ".tif", ".pbm"])
def test_a_1bit_image_is_black_and_white_not_black(tmp_path, ext):
    """A bilevel image (a 1-bit scan, fax or PBM: Pillow's mode 1, booleans) reads as 0 and 255, and at 16 bits
    as 8-bit does (0 and 255: one bit is not deep)."""
    bits = np.array([[0, 1, 1], [1, 0, 0]], bool)
    Image.fromarray(bits).save(tmp_path / f"a{ext}")
    with Image.open(tmp_path / f"a{ext}") as im:
        assert im.mode == "1"
    for high_bit_depth in (False, True):
        decoded = images.decode(tmp_path / f"a{ext}", high_bit_depth=high_bit_depth)
        assert decoded.pixels.dtype == np.uint8 and decoded.pixels.tolist() == [[0, 255, 255], [255, 0, 0]]
