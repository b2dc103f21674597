"""engine/imaging.py: every test image is made here with Pillow; no binary fixtures."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import time
import warnings
import zlib

import pytest
from PIL import Image

from livegen.engine import imaging
from livegen.engine.imaging import (
    content_type_for,
    decode_image,
    encode_image,
    fit_size,
    parse_data_url,
    to_data_url,
)
from livegen.protocol.errors import InvalidImage, InvalidInput, PayloadTooLarge

# --- helpers -----------------------------------------------------------------------------------


def save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """An RGB image that does not compress well, so truncating it cuts into pixel data."""
    return Image.effect_noise(size, 64).convert("RGB")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is patched to claim ``width``×``height`` (CRC fixed up)."""
    data = bytearray(save(Image.new("1", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def pillow_allocations() -> int | None:
    stats = getattr(Image.core, "get_stats", None)
    return stats()["new_count"] if stats else None


def refused(data: bytes, **kwargs: object) -> InvalidImage:
    with pytest.raises(InvalidImage) as info:
        decode_image(data, **kwargs)  # type: ignore[arg-type]
    return info.value


# --- decode_image: accepted inputs -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_allowed_formats_to_rgb(fmt: str) -> None:
    out = decode_image(save(Image.new("RGB", (40, 24), (200, 30, 30)), fmt))
    assert out.mode == "RGB"
    assert out.size == (40, 24)
    r, g, b = out.getpixel((20, 12))  # type: ignore[misc]
    assert r > 180 and g < 60 and b < 60


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_alpha_is_composited_over_white(fmt: str) -> None:
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    params = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(save(img, fmt, **params))
    assert out.mode == "RGB"
    assert out.getpixel((8, 8)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_half_transparent_black_becomes_grey() -> None:
    out = decode_image(save(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"))
    r, g, b = out.getpixel((1, 1))  # type: ignore[misc]
    assert 120 <= r <= 135 and r == g == b


@pytest.mark.parametrize(
    "mode, color",
    [("P", None), ("L", 77), ("LA", (77, 255)), ("1", 1), ("RGB", (1, 2, 3))],
)
def test_other_png_modes_become_rgb(mode: str, color: object) -> None:
    img = noise((16, 16)).convert(mode) if color is None else Image.new(mode, (16, 16), color)  # type: ignore[arg-type]
    out = decode_image(save(img, "PNG"))
    assert out.mode == "RGB" and out.size == (16, 16)


def test_palette_transparency_is_white() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 1)
    out = decode_image(save(img, "PNG", transparency=0))
    assert out.getpixel((4, 4)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_cmyk_jpeg_becomes_rgb() -> None:
    out = decode_image(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("value, expected", [(65535, 255), (32768, 128), (0, 0)])
def test_16_bit_png_is_scaled_not_clipped(value: int, expected: int) -> None:
    data = save(Image.new("I;16", (8, 8), value), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((3, 3)) == (expected,) * 3


def test_exif_orientation_is_applied() -> None:
    # Left half red, right half blue; orientation 6 means "rotate 90° clockwise to display",
    # so the decoded image is portrait with red on top.
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(save(img, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)
    top = out.getpixel((10, 5))
    bottom = out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # type: ignore[index]
    assert bottom[2] > 200 and bottom[0] < 60  # type: ignore[index]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decoded_image_outlives_the_opened_file(fmt: str) -> None:
    """An upright RGB image is handed on without a pixel copy, as a new Image object: closing the
    opened one (as ``decode_image``'s ``with`` does) leaves it whole, and it holds no file."""
    src = noise((24, 16))
    data = save(src, fmt, **({"quality": 100} if fmt != "PNG" else {}))
    with imaging.open_image(data) as opened:
        out = imaging.decode_opened(opened)
        assert out is not opened
    assert getattr(out, "fp", None) is None
    assert out.size == (24, 16) and out.mode == "RGB"
    assert out.tobytes() == decode_image(data).tobytes()
    if fmt == "PNG":
        assert out.tobytes() == src.tobytes()
    before = out.getpixel((0, 0))
    out.paste((1, 2, 3), (0, 0, 4, 4))  # writable, and its own pixels
    assert out.getpixel((0, 0)) == (1, 2, 3) and decode_image(data).getpixel((0, 0)) == before


def test_multi_picture_jpeg_is_read_as_its_first_picture() -> None:
    first, second = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    data = save(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    r, _, b = decode_image(data).getpixel((8, 8))  # type: ignore[misc]
    assert r > 200 and b < 60


def test_result_does_not_depend_on_input_buffer() -> None:
    data = bytearray(save(noise((8, 8)), "PNG"))
    out = decode_image(bytes(data))
    before = out.tobytes()
    data[:] = b"\0" * len(data)
    assert out.tobytes() == before


def device_case(kind: str) -> bytes:
    img = noise((32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "baseline": lambda: save(img, "JPEG"),
        "progressive": lambda: save(img, "JPEG", progressive=True),
        "grayscale": lambda: save(img.convert("L"), "JPEG"),
        "exif-upright": lambda: save(img, "JPEG", exif=Image.Exif()),
        "exif-rotated": lambda: save(img, "JPEG", exif=exif),
        "cmyk": lambda: save(img.convert("CMYK"), "JPEG"),
        "multi-picture": lambda: save(img, "MPO", save_all=True, append_images=[img]),
        "trailing-bytes": lambda: save(img, "JPEG") + b"\0\0",
        "png": lambda: save(img, "PNG"),
        "webp": lambda: save(img, "WEBP"),
    }[kind]()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("baseline", True), ("progressive", True), ("grayscale", True), ("exif-upright", True),
     ("exif-rotated", False), ("cmyk", False), ("multi-picture", False), ("trailing-bytes", False),
     ("png", False), ("webp", False)],
)  # fmt: skip
def test_device_decodable_takes_plain_complete_upright_jpegs(kind: str, expected: bool) -> None:
    """What a GPU decoder may decode instead of Pillow: only what comes out the same (no EXIF
    rotation to apply, no CMYK, one picture) and what Pillow would not refuse as truncated."""
    data = device_case(kind)
    with imaging.open_image(data) as header:
        assert imaging.device_decodable(header, data) is expected


def test_open_image_checks_the_header_and_decodes_nothing() -> None:
    data = save(noise((64, 64)), "JPEG")
    with imaging.open_image(data[: len(data) // 2]) as header:  # pixel data cut: still opens
        assert header.size == (64, 64)
    with pytest.raises(InvalidImage, match="at most 1024 pixels"):
        imaging.open_image(data, max_pixels=1024)
    with pytest.raises(InvalidImage, match="empty"):
        imaging.open_image(b"")


# --- decode_image: refused inputs --------------------------------------------------------------


def test_empty_bytes() -> None:
    exc = refused(b"", field="mask_url")
    assert "mask_url is empty" in exc.message
    assert exc.loc == ("body", "mask_url")
    assert exc.http_status == 422


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_pixel_data(fmt: str) -> None:
    data = save(noise((128, 128)), fmt, **({"quality": 95} if fmt != "PNG" else {}))
    exc = refused(data[: len(data) // 2])
    assert "truncated or corrupt" in exc.message
    assert exc.__cause__ is not None


def test_truncated_header() -> None:
    exc = refused(save(noise(), "PNG")[:20])
    assert "truncated or corrupt" in exc.message
    assert exc.__cause__ is not None


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(fmt: str) -> None:
    exc = refused(save(Image.new("RGB", (8, 8)), fmt))
    assert f"in {fmt} format" in exc.message
    assert "PNG, JPEG or WebP" in exc.message
    assert exc.__cause__ is not None


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animations_are_refused(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    data = save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
    exc = refused(data)
    assert "animated" in exc.message and "3 frames" in exc.message


@pytest.mark.parametrize(
    "text, said",
    [
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML"),
        (b"hello, world", "not a PNG, JPEG or WebP image"),
    ],
)
def test_text_is_refused(text: bytes, said: str) -> None:
    exc = refused(text)
    assert said in exc.message
    assert text.decode() not in exc.message


def test_pixel_bomb_is_refused_from_the_header() -> None:
    bomb = png_claiming(20000, 20000)  # 400 megapixels: 1.2 GB as RGB
    assert len(bomb) < 200
    before = pillow_allocations()
    start = time.perf_counter()
    exc = refused(bomb)
    assert time.perf_counter() - start < 1.0
    assert pillow_allocations() == before  # not a single Pillow image buffer was allocated
    assert "pixels" in exc.message
    assert exc.__cause__ is not None


def test_our_limit_applies_below_pillows() -> None:
    # 25 megapixels: over our default of 4096², under Pillow's own warning threshold.
    bomb = png_claiming(5000, 5000)
    before = pillow_allocations()
    exc = refused(bomb)
    assert pillow_allocations() == before
    assert "5000×5000" in exc.message and "16777216" in exc.message


def test_one_bit_bomb_is_refused_whether_pillow_warns_or_raises() -> None:
    bomb = save(Image.new("1", (10000, 10000)), "PNG")  # 100 megapixels, ~15 kB compressed
    assert len(bomb) < 100_000
    # As configured for tests, Pillow's DecompressionBombWarning is an error...
    assert "pixels" in refused(bomb).message
    # ...and where it is only a warning, our own check refuses the image before it is decoded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        before = pillow_allocations()
        start = time.perf_counter()
        exc = refused(bomb)
        assert time.perf_counter() - start < 1.0
        assert pillow_allocations() == before
    assert "10000×10000" in exc.message


def test_long_strip_is_judged_by_pixel_count_only() -> None:
    """Only the pixel count is limited: a 1×100000 strip (100k pixels) passes the default."""
    data = save(Image.new("L", (1, 100_000), 200), "PNG")
    assert decode_image(data).size == (1, 100_000)
    assert "1×100000" in refused(data, max_pixels=99_999).message
    assert decode_image(data, max_pixels=100_000).size == (1, 100_000)


# --- parse_data_url ----------------------------------------------------------------------------


def test_data_url_round_trip() -> None:
    png = save(noise((8, 8)), "PNG")
    assert parse_data_url(to_data_url(png, "image/png"), max_bytes=len(png)) == ("image/png", png)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("data:;base64,aGk=", ("text/plain", b"hi")),
        ("data:IMAGE/PNG;Base64,aGk=", ("image/png", b"hi")),
        ("data:image/png;base64,aGk", ("image/png", b"hi")),  # missing padding tolerated
        ("data:image/png;base64,aGVs\r\nbG8=\n", ("image/png", b"hello")),  # line-wrapped
        ("data:image/png;base64,%2B%2F8%3D", ("image/png", b"\xfb\xff")),  # percent-encoded
        ("data:text/plain;charset=utf-8,hello%20world", ("text/plain", b"hello world")),
        ("data:,", ("text/plain", b"")),
    ],
)
def test_data_url_forms(url: str, expected: tuple[str, bytes]) -> None:
    assert parse_data_url(url, max_bytes=100) == expected


def test_oversized_data_url_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an oversized payload")

    payload = base64.b64encode(b"x" * 1001).decode()
    monkeypatch.setattr(imaging.base64, "b64decode", must_not_decode)
    with pytest.raises(PayloadTooLarge) as info:
        parse_data_url(f"data:image/png;base64,{payload}", max_bytes=1000)
    assert info.value.http_status == 413
    assert payload not in str(info.value)
    with pytest.raises(PayloadTooLarge):  # far too large: refused on length alone
        parse_data_url("data:image/png;base64," + "A" * 10_000_000, max_bytes=1000)
    with pytest.raises(PayloadTooLarge):
        parse_data_url("data:text/plain," + "x" * 1001, max_bytes=1000)


def test_data_url_at_the_limit_is_accepted() -> None:
    url = to_data_url(b"x" * 1000, "image/png")
    assert len(parse_data_url(url, max_bytes=1000)[1]) == 1000
    with pytest.raises(PayloadTooLarge):
        parse_data_url(url, max_bytes=999)


@pytest.mark.parametrize("payload", ["not*base64!", "aGk=aGk=", "é"])
def test_invalid_base64(payload: str) -> None:
    with pytest.raises(InvalidImage) as info:
        parse_data_url(f"data:image/png;base64,{payload}", max_bytes=100, field="mask_url")
    assert "not valid base64" in info.value.message
    assert info.value.loc == ("body", "mask_url")
    assert isinstance(info.value.__cause__, ValueError | binascii.Error)
    assert payload not in info.value.message


def test_malformed_data_url() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_data_url("data:image/png;base64", max_bytes=100)
    assert type(info.value) is InvalidInput
    assert "no ','" in info.value.message


# --- encoding and sizes ------------------------------------------------------------------------


def test_encode_jpeg_and_png() -> None:
    img = noise((32, 16))
    jpeg = encode_image(img, "jpeg", quality=80)
    png = encode_image(img, "png")
    assert jpeg[:3] == b"\xff\xd8\xff"
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).tobytes() == img.tobytes()
    assert decode_image(jpeg).size == (32, 16)


def test_encode_converts_modes_jpeg_cannot_hold() -> None:
    jpeg = encode_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "jpeg")
    assert Image.open(io.BytesIO(jpeg)).getpixel((4, 4))[0] > 245  # type: ignore[index]


def test_encode_refuses_unknown_format_and_quality() -> None:
    with pytest.raises(InvalidInput):
        encode_image(noise((8, 8)), "gif")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        encode_image(noise((8, 8)), "jpeg", quality=0)


def test_content_types() -> None:
    assert content_type_for("jpeg") == "image/jpeg"
    assert content_type_for("PNG") == "image/png"
    with pytest.raises(InvalidInput):
        content_type_for("gif")
    assert to_data_url(b"hi", "image/png") == "data:image/png;base64,aGk="


@pytest.mark.parametrize(
    "size, multiple, expected",
    [
        ((512, 512), 8, (512, 512)),
        ((513, 767), 8, (512, 760)),
        ((1, 100_000), 8, (8, 100_000)),
        ((100, 70), 64, (64, 64)),
        ((130, 200), 64, (128, 192)),
    ],
)
def test_fit_size(size: tuple[int, int], multiple: int, expected: tuple[int, int]) -> None:
    assert fit_size(size, multiple) == expected


def test_fit_size_rejects_bad_multiple() -> None:
    with pytest.raises(ValueError):
        fit_size((10, 10), 0)
