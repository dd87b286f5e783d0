"""load_image: every input kind and image mode becomes RGB uint8 (H, W, 3); EXIF orientation is
applied; every failure is an ImageLoadError that names the file."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import captioner.data.images as images_module
from captioner.data.images import array_to_rgb, load_image, resize, to_rgb
from captioner.errors import CaptionerError, ImageLoadError


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_rgb(array: np.ndarray, height: int, width: int) -> None:
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.uint8
    assert array.shape == (height, width, 3)


@pytest.fixture
def pattern() -> np.ndarray:
    """A 12x20 RGB image with distinct pixels (exact in PNG)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)


# ---- input kinds ---------------------------------------------------------------------------
def test_path_str_bytes_pil_and_array_agree(tmp_path, pattern):
    path = tmp_path / "p.png"
    Image.fromarray(pattern).save(path)
    for source in (path, str(path), path.read_bytes(), Image.open(path), pattern):
        out = load_image(source)
        check_rgb(out, 12, 20)
        np.testing.assert_array_equal(out, pattern)


def test_jpeg_file(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (30, 10), (200, 40, 10)).save(path, quality=95)
    out = load_image(path)
    check_rgb(out, 10, 30)
    assert np.abs(out.astype(int) - (200, 40, 10)).max() <= 4


def test_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    out = load_image(path)
    check_rgb(out, 8, 16)
    assert (out == (255, 0, 0)).all()
    assert (load_image(path.read_bytes()) == (255, 0, 0)).all()


# ---- modes ---------------------------------------------------------------------------------
def test_grayscale(tmp_path):
    gray = np.arange(0, 240, 2, dtype=np.uint8).reshape(6, 20)
    path = tmp_path / "g.png"
    Image.fromarray(gray, mode="L").save(path)
    out = load_image(path)
    check_rgb(out, 6, 20)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_palette_without_transparency(tmp_path, pattern):
    image = Image.new("P", (4, 2))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    path = tmp_path / "p.png"
    image.save(path)
    out = load_image(path)
    check_rgb(out, 2, 4)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (200, 100, 50)
    assert tuple(out[1, 3]) == (10, 20, 30)


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.putdata([0, 1])
    path = tmp_path / "t.png"
    image.save(path, transparency=0)
    out = load_image(path)
    check_rgb(out, 1, 2)
    assert tuple(out[0, 0]) == (255, 255, 255)  # the transparent index
    assert tuple(out[0, 1]) == (255, 0, 0)


def test_rgba_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    rgba[0, 1] = (10, 20, 30, 255)  # opaque -> unchanged
    rgba[0, 2] = (0, 0, 0, 128)  # half transparent black -> mid grey
    rgba[1, :] = (0, 200, 0, 255)
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    for source in (path, Image.fromarray(rgba, mode="RGBA")):
        out = load_image(source)
        check_rgb(out, 2, 3)
        assert tuple(out[0, 0]) == (255, 255, 255)
        assert tuple(out[0, 1]) == (10, 20, 30)
        assert all(abs(int(v) - 127) <= 2 for v in out[0, 2])
        assert (out[1] == (0, 200, 0)).all()


def test_la_alpha_composited_on_white():
    la = Image.new("LA", (2, 1), (50, 255))
    la.putpixel((1, 0), (50, 0))
    out = load_image(la)
    check_rgb(out, 1, 2)
    assert tuple(out[0, 0]) == (50, 50, 50)
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink: white
    image.putpixel((0, 0), (0, 255, 255, 0))  # magenta + yellow: red
    image.putpixel((1, 0), (0, 0, 0, 255))  # black
    out = load_image(image)
    check_rgb(out, 4, 4)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert tuple(out[3, 3]) == (255, 255, 255)
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)
    from_file = load_image(path)
    check_rgb(from_file, 8, 8)
    assert np.abs(from_file.astype(int) - (255, 0, 0)).max() <= 8


def test_16_bit_grayscale_is_scaled_to_full_range(tmp_path):
    values = np.linspace(1000, 60000, 32).astype(np.uint16).reshape(4, 8)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    check_rgb(out, 4, 8)
    flat = out[:, :, 0].ravel().astype(int)
    assert flat.min() == 0 and flat.max() == 255
    assert (np.diff(flat) >= 0).all()  # monotonic: the gradient survives
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


def test_constant_16_bit_image_does_not_divide_by_zero():
    image = Image.fromarray(np.full((3, 3), 500, dtype=np.uint16))
    out = load_image(image)
    check_rgb(out, 3, 3)
    assert (out == 0).all()


def test_float_mode_image():
    image = Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32), mode="F")
    out = to_rgb(image)
    array = np.asarray(out)
    assert array.shape == (2, 2, 3)
    assert array[0, 0, 0] == 0 and array[1, 1, 0] == 255


# ---- EXIF orientation ----------------------------------------------------------------------
def exif_jpeg(path: Path, orientation: int) -> None:
    """40 wide x 20 high: left half red, right half blue, with an EXIF orientation tag."""
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)


def test_exif_orientation_6_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    exif_jpeg(path, 6)
    assert Image.open(path).size == (40, 20)  # stored landscape
    out = load_image(path)
    check_rgb(out, 40, 20)  # displayed portrait
    # orientation 6 = rotate 90 degrees clockwise to display: the left (red) half goes on top
    top, bottom = out[:16].astype(int), out[24:].astype(int)
    assert np.abs(top - (255, 0, 0)).max() < 40
    assert np.abs(bottom - (0, 0, 255)).max() < 40
    np.testing.assert_array_equal(load_image(path.read_bytes()), out)
    np.testing.assert_array_equal(load_image(Image.open(path)), out)


def test_exif_orientation_1_keeps_shape(tmp_path):
    path = tmp_path / "plain.jpg"
    exif_jpeg(path, 1)
    out = load_image(path)
    check_rgb(out, 20, 40)
    assert np.abs(out[:, :16].astype(int) - (255, 0, 0)).max() < 40


# ---- errors --------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError, match="file not found") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty file") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_empty_bytes():
    with pytest.raises(ImageLoadError, match="upload: empty file"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="photo.jpg: empty file"):
        load_image(b"", name="photo.jpg")


def test_directory(tmp_path):
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageLoadError, match="directory") as info:
        load_image(folder)
    assert str(folder) in str(info.value)


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageLoadError, match="not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageLoadError, match="upload: not an image"):
        load_image(path.read_bytes())


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)  # incompressible
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageLoadError, match="cut-upload"):
        load_image(data[: len(data) // 2], name="cut-upload")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(2)
    data = png_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (the pixel data is a stub)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def test_decompression_bomb_header(tmp_path):
    data = bomb_png(30000, 30000)
    assert len(data) < 200
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match="too large|over the limit") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageLoadError, match="bomb-upload"):
        load_image(data, name="bomb-upload")


@pytest.mark.parametrize("side", [12, 20, 40])  # 144 (warning band), 400, 1600 pixels
def test_pixel_limit_is_enforced(tmp_path, monkeypatch, side):
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side), (1, 2, 3)).save(path)
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageLoadError, match="too large|over the limit") as info:
        load_image(path)
    assert str(path) in str(info.value)
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", side * side)
    check_rgb(load_image(path), side, side)  # exactly at the limit is fine


def test_png_limit_message_is_ours(tmp_path):
    """Over the limit but under Pillow's own thresholds, and far over them: one clear message,
    never Pillow's "decompression bomb DOS attack" text."""
    for width, height in ((9000, 8000), (30000, 30000), (100_000, 100_000)):
        path = tmp_path / f"huge-{width}.png"
        path.write_bytes(bomb_png(width, height))
        with pytest.raises(ImageLoadError, match="too large|over the limit") as info:
            load_image(path)
        message = str(info.value)
        assert (
            message.startswith(str(path))
            and "DOS" not in message
            and "decompression" not in message
        )
        if width < 100_000:
            assert f"{width}x{height} PNG" in message and "64 MP" in message


# ---- large JPEGs: decoded reduced ----------------------------------------------------------
def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def grey_jpeg(width: int, height: int, scan: bool = True) -> bytes:
    """A valid baseline greyscale JPEG of any size, every pixel 128, written directly.

    Huffman tables with one 1-bit code each make every 8x8 block two zero bits ("DC unchanged",
    "end of block"), so a 100 MP image is ~0.4 MB of zero bytes and costs nothing to make.
    ``scan=False`` stops after the header, which is all the size checks read.
    """
    one_code = bytes([1] + [0] * 15) + b"\x00"  # one code of length 1, for symbol 0
    header = (
        b"\xff\xd8"
        + _segment(0xDB, b"\x00" + b"\x01" * 64)  # quantisation table 0: all ones
        + _segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + _segment(0xC4, b"\x00" + one_code)  # DC table 0
        + _segment(0xC4, b"\x10" + one_code)  # AC table 0
        + _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")  # one component, tables 0/0
    )
    if not scan:
        return header
    bits = 2 * (-(-width // 8)) * (-(-height // 8))
    data = bytes(bits // 8) + (bytes([0xFF >> (bits % 8)]) if bits % 8 else b"")  # 1-padded
    return header + data + b"\xff\xd9"


def test_100_megapixel_jpeg_is_decoded_reduced(tmp_path):
    data = grey_jpeg(12000, 8400)  # 100.8 MP, over the 64 MP that is ever decoded
    assert len(data) < 500_000
    path = tmp_path / "phone.jpg"
    path.write_bytes(data)
    assert Image.open(path).size == (12000, 8400)
    for source in (path, data):
        out = load_image(source)
        check_rgb(out, 1050, 1500)  # 1/8 scale: both sides still >= DRAFT_SIDE
        assert (out == 128).all()
    assert min(out.shape[:2]) >= images_module.DRAFT_SIDE >= 2 * 256


def test_jpeg_draft_scale_and_threshold(tmp_path, monkeypatch):
    """The reduction keeps >= DRAFT_SIDE a side, applies EXIF orientation, and leaves JPEGs at or
    under DRAFT_ABOVE_PIXELS decoded in full (thresholds scaled down to keep this tiny)."""
    path = tmp_path / "rot.jpg"
    exif_jpeg(path, 6)  # 40x20 stored, red left half, shown portrait
    monkeypatch.setattr(images_module, "DRAFT_SIDE", 10)
    monkeypatch.setattr(images_module, "DRAFT_ABOVE_PIXELS", 800)
    check_rgb(load_image(path), 40, 20)  # 800 pixels: not over the threshold, full size
    monkeypatch.setattr(images_module, "DRAFT_ABOVE_PIXELS", 799)
    out = load_image(path)
    check_rgb(out, 20, 10)  # scale 1/2 (1/4 would leave 5 < 10 pixels a side), then rotated
    assert np.abs(out[:6].astype(int) - (255, 0, 0)).max() < 60  # red still on top
    assert np.abs(out[14:].astype(int) - (0, 0, 255)).max() < 60


@pytest.mark.parametrize("progressive", [False, True])
def test_colour_jpeg_is_reduced_to_one_eighth(tmp_path, monkeypatch, progressive):
    path = tmp_path / "c.jpg"
    Image.new("RGB", (800, 640), (200, 40, 10)).save(path, quality=95, progressive=progressive)
    monkeypatch.setattr(images_module, "DRAFT_SIDE", 64)
    monkeypatch.setattr(images_module, "DRAFT_ABOVE_PIXELS", 1000)
    out = load_image(path.read_bytes())
    check_rgb(out, 80, 100)
    assert np.abs(out.astype(int) - (200, 40, 10)).max() <= 6


def test_jpeg_limits(tmp_path):
    """Refused from the header alone: over MAX_JPEG_PIXELS, or still over MAX_IMAGE_PIXELS at the
    reduction DRAFT_SIDE allows (a 1008 px high panorama cannot be reduced)."""
    cases = (
        ((40000, 30000), "1,200 MP\\) is over the limit of 1,000 MP for a JPEG"),
        ((65000, 1008), "even decoded at reduced size it is 65000x1008 \\(66 MP; the limit is 64"),
    )
    for (width, height), match in cases:
        path = tmp_path / f"{width}.jpg"
        path.write_bytes(grey_jpeg(width, height, scan=width == 65000))
        with pytest.raises(ImageLoadError, match=match) as info:
            load_image(path)
        assert str(info.value).startswith(f"{path}: a {width}x{height} JPEG")


def test_jpeg_header_claiming_more_pixels_than_its_bytes_can_hold_is_refused(tmp_path):
    """Issue 22: a 24 KB JPEG claiming 30000x30000 was captioned (libjpeg fills the missing
    data with grey). Over the 64 MP limit, a JPEG needs at least one bit per 8x8 block."""
    lying = grey_jpeg(30000, 30000, scan=False) + bytes(24_000) + b"\xff\xd9"
    assert len(lying) < 25_000
    for source in (lying, tmp_path / "lying.jpg"):
        if isinstance(source, Path):
            source.write_bytes(lying)
        with pytest.raises(ImageLoadError, match="30000x30000 JPEG .*cannot hold that many"):
            load_image(source)
    check_rgb(load_image(grey_jpeg(9000, 8000)), 1000, 1125)  # 72 MP, complete: still taken


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _two_page_tiff_second_without_width() -> bytes:
    buf = io.BytesIO()
    first, second = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    first.save(buf, "TIFF", save_all=True, append_images=[second])
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[ifd : ifd + 2])[0]
    second_ifd = struct.unpack("<I", data[ifd + 2 + 12 * count : ifd + 6 + 12 * count])[0]
    for i in range(struct.unpack("<H", data[second_ifd : second_ifd + 2])[0]):
        entry = second_ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 256:  # ImageWidth -> unknown tag
            data[entry : entry + 2] = struct.pack("<H", 999)
    return bytes(data)


def test_truncated_animated_gif_is_an_image_error_not_index_error():
    """Issue 22: Pillow raised IndexError counting the frames of a cut animated GIF."""
    data = _animated_gif()
    for cut in range(len(data) // 3, len(data)):
        try:
            out = load_image(data[:cut], name="anim.gif")
        except ImageLoadError as exc:
            assert str(exc).startswith("anim.gif: ")
        else:
            check_rgb(out, 32, 32)


def test_tiff_page_without_image_width_is_not_a_type_error():
    """Issue 22: a TIFF IFD without ImageWidth raised TypeError "Missing dimensions". Only the
    first page is read, so the picture on it is still captioned."""
    out = load_image(_two_page_tiff_second_without_width(), name="pages.tif")
    check_rgb(out, 8, 8)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_any_decoder_exception_becomes_an_image_error(monkeypatch):
    """Whatever a codec raises (here a ZeroDivisionError from inside load) is ImageLoadError."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")

    def broken_load(self):
        raise ZeroDivisionError("division by zero in a codec")

    monkeypatch.setattr(Image.Image, "load", broken_load)
    monkeypatch.setattr(images_module.ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(ImageLoadError, match="^x.png: corrupt or truncated image \\(division"):
        load_image(buf.getvalue(), name="x.png")


def test_max_side_decodes_reduced_and_keeps_orientation(tmp_path, monkeypatch):
    """``max_side`` (the web service's 1024 px): a JPEG is decoded at 1/8 scale, a PNG shrunk
    right after decoding; EXIF orientation is still applied after the shrink."""
    data = grey_jpeg(4096, 2048)
    image = images_module.open_image(data, "big.jpg", max_side=512)
    assert images_module.decoded_pixels(image) == 512 * 256  # what a server counts up front
    check_rgb(images_module.decode_image(image, "big.jpg", 512), 256, 512)
    png = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(png, "PNG")
    out = load_image(png.getvalue(), max_side=150)
    check_rgb(out, 100, 150)
    assert np.abs(out.astype(int) - (10, 200, 30)).max() <= 2
    path = tmp_path / "rot.jpg"
    exif_jpeg(path, 6)  # 40x20 stored, red left half, shown portrait
    out = load_image(path, max_side=20)
    check_rgb(out, 20, 10)
    assert np.abs(out[:6].astype(int) - (255, 0, 0)).max() < 60  # red still on top
    palette = Image.new("P", (64, 64), 3)
    palette.putpalette([0, 0, 0] * 3 + [200, 0, 0] + [0, 0, 0] * 252)
    buf = io.BytesIO()
    palette.save(buf, "GIF")
    out = load_image(buf.getvalue(), max_side=16)
    check_rgb(out, 16, 16)
    assert np.abs(out.astype(int) - (200, 0, 0)).max() <= 2
    buf = io.BytesIO()
    palette.save(buf, "GIF", transparency=3)  # all transparent: white, as at full size
    check_rgb(load_image(buf.getvalue(), max_side=16), 16, 16)
    assert (load_image(buf.getvalue(), max_side=16) == 255).all()
    ramp = (np.arange(40 * 80).reshape(40, 80) * 20).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")  # 16-bit grey: still scaled to the full range
    out = load_image(buf.getvalue(), max_side=40)
    check_rgb(out, 20, 40)
    assert out.min() == 0 and out.max() == 255


def test_custom_name_is_used_in_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="^my-label: file not found"):
        load_image(tmp_path / "x.png", name="my-label")


def test_image_load_error_is_a_captioner_error():
    assert issubclass(ImageLoadError, CaptionerError)


# ---- arrays --------------------------------------------------------------------------------
def test_array_layouts():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    for array in (gray, gray[:, :, None]):
        out = load_image(array)
        check_rgb(out, 2, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[:, :, c], gray)
    rgba = np.dstack([np.full((2, 3), v, np.uint8) for v in (10, 20, 30, 0)])
    out = load_image(rgba)
    check_rgb(out, 2, 3)
    assert (out == (10, 20, 30)).all()
    assert out.flags["C_CONTIGUOUS"]


def test_non_contiguous_array_is_made_contiguous(pattern):
    view = pattern[:, ::2]
    out = load_image(view)
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, view)


def test_float_arrays():
    unit = np.array([[[0.0, 0.5, 1.0]]], dtype=np.float32)  # [0, 1] range: scaled by 255
    np.testing.assert_array_equal(load_image(unit), [[[0, 128, 255]]])
    wide = np.array([[[0.0, 100.4, 300.0]]], dtype=np.float64)  # 0..255 range: rounded, clipped
    np.testing.assert_array_equal(load_image(wide), [[[0, 100, 255]]])
    negative = np.array([[[-5.0, 2.0, 3.0]]])
    np.testing.assert_array_equal(load_image(negative), [[[0, 2, 3]]])


def test_integer_arrays_are_clipped():
    array = np.array([[[-10, 128, 1000]]], dtype=np.int32)
    np.testing.assert_array_equal(load_image(array), [[[0, 128, 255]]])
    sixteen = np.array([[[0, 70, 255]]], dtype=np.uint16)
    np.testing.assert_array_equal(load_image(sixteen), [[[0, 70, 255]]])


@pytest.mark.parametrize("shape", [(5,), (2, 3, 2), (2, 3, 5), (1, 2, 3, 3), (0, 4, 3), (4, 0)])
def test_bad_array_shapes(shape):
    with pytest.raises(ImageLoadError, match="expected an") as info:
        load_image(np.zeros(shape, dtype=np.uint8), name="arr-name")
    assert "arr-name" in str(info.value)
    shown = shape if len(shape) != 2 else (*shape, 1)  # (H, W) is reported as (H, W, 1)
    assert f"got {shown}" in str(info.value)


@pytest.mark.parametrize("dtype", [bool, np.complex64, object, "U1"])
def test_bad_array_dtypes(dtype):
    with pytest.raises(ImageLoadError, match="unsupported array dtype"):
        load_image(np.zeros((2, 2, 3), dtype=dtype))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_arrays(bad):
    array = np.zeros((2, 2, 3), dtype=np.float32)
    array[1, 1, 2] = bad
    with pytest.raises(ImageLoadError, match="NaN or infinite") as info:
        load_image(array)
    assert "array" in str(info.value)


def test_array_to_rgb_default_name():
    with pytest.raises(ImageLoadError, match="^array: "):
        array_to_rgb(np.zeros((3,), dtype=np.uint8))


# ---- resize --------------------------------------------------------------------------------
def test_resize(pattern):
    assert resize(pattern, 12) is not pattern
    out = resize(pattern, 7)
    check_rgb(out, 7, 7)
    square = np.ascontiguousarray(pattern[:, :12])
    assert resize(square, 12) is square  # already the right size: untouched
    flat = np.full((5, 9, 3), 77, dtype=np.uint8)
    assert (resize(flat, 16) == 77).all()
