"""Image bytes in and out: decoding untrusted inputs, data URLs, and encoding outputs.

Pillow only (the server imports this module; it must never pull in torch).

Every input image goes through :func:`decode_image`, which treats the bytes as hostile:

1. it identifies the file from its header only, with Pillow restricted to PNG, JPEG and WebP
   (other formats are named from their magic bytes, never parsed);
2. it refuses more than ``max_pixels`` pixels *before* anything is decoded, so a small file that
   claims to be 20000×20000 costs a header read, not gigabytes;
3. it refuses animations, decodes, applies the EXIF orientation and returns 8-bit RGB.

Pillow's exceptions become :class:`InvalidImage` here, raised ``from`` the original.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import urllib.parse
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from livegen.protocol.errors import InvalidImage, InvalidInput, PayloadTooLarge

__all__ = [
    "ALLOWED_FORMATS",
    "check_data_url_size",
    "content_type_for",
    "decode_image",
    "decode_opened",
    "device_decodable",
    "encode_image",
    "fit_size",
    "open_image",
    "parse_data_url",
    "to_data_url",
]

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}

# Pillow's JPEG opener returns an "MPO" image for multi-picture JPEGs (many phone and
# stereo cameras write them). The first picture is an ordinary JPEG, so we accept it as one.
_JPEG_ALIASES = {"MPO"}
_EXIF_ORIENTATION = 0x0112

# What Pillow (or a broken file) may raise while parsing or decoding untrusted bytes.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def decode_image(data: bytes, *, max_pixels: int = 4096 * 4096, field: str = "image_url") -> Image.Image:
    """Decode untrusted PNG, JPEG or WebP bytes into a new 8-bit RGB image.

    Raises InvalidImage (422, ``loc=("body", field)``) for anything else: empty, unknown or
    refused formats, more than ``max_pixels`` pixels, animations, truncated or corrupt files.
    Only the pixel count is limited, not the shape: a 1×100000 strip passes the default limit.
    """
    with open_image(data, max_pixels=max_pixels, field=field) as img:
        return decode_opened(img, field=field)


def decode_opened(img: Image.Image, *, field: str = "image_url") -> Image.Image:
    """Step 3 of :func:`decode_image`, for an image :func:`open_image` returned (still open)."""
    loc = ("body", field)
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # upright (most images): nothing moves
        # A new Image object on the same pixels, not a copy of them (~0.1 ms of a 512² frame's
        # ~1.8 ms decode on the dev VM): the caller's ``with`` closes ``img``, not these.
        oriented = img._new(img.im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"{field} has too many pixels to decode", loc=loc) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"{field} is truncated or corrupt and cannot be decoded", loc=loc) from exc
    return _to_rgb(oriented)


def open_image(data: bytes, *, max_pixels: int = 4096 * 4096, field: str = "image_url") -> Image.Image:
    """Steps 1 and 2 of :func:`decode_image`: the header read and checked, nothing decoded yet.

    The caller closes the image (``with open_image(...) as img``). Same InvalidImage errors for
    what the header shows; a file whose header passes may still fail to decode.
    """
    loc = ("body", field)
    if not data:
        raise InvalidImage(f"{field} is empty", loc=loc)

    try:
        img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except UnidentifiedImageError as exc:
        raise InvalidImage(_unidentified_message(data, field), loc=loc) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit (about 89 or 179 megapixels) fired while reading the header. The
        # warning only arrives as an exception when warnings are errors (as under pytest);
        # otherwise our own, lower check below refuses the image.
        raise InvalidImage(f"{field} has too many pixels to decode", loc=loc) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"{field} is truncated or corrupt: its header cannot be read", loc=loc) from exc

    try:
        fmt = "JPEG" if img.format in _JPEG_ALIASES else img.format
        if fmt not in ALLOWED_FORMATS:  # Pillow was told to try only these; belt and braces
            raise InvalidImage(f"{field} is a {img.format} image; only PNG, JPEG or WebP images are accepted", loc=loc)
        width, height = img.size
        if width * height > max_pixels:
            raise InvalidImage(
                f"{field} is {width}×{height} ({width * height} pixels); images may have at most {max_pixels} pixels",
                loc=loc,
            )
        frames = int(getattr(img, "n_frames", 1))
        if fmt != "JPEG" and frames > 1:
            raise InvalidImage(
                f"{field} is an animated {fmt} with {frames} frames; send a single still image",
                loc=loc,
            )
    except BaseException:
        img.close()
        raise
    return img


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """Whether a GPU JPEG decoder (nvjpeg) gives what :func:`decode_image` gives for ``data``,
    whose header ``img`` is (from :func:`open_image`): a plain single-picture JPEG (not MPO), in
    YCbCr or grayscale (not CMYK, not Adobe-transformed), with no EXIF rotation to apply, and
    complete (it ends with the end-of-image marker; Pillow refuses a truncated file, a GPU
    decoder may not)."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or "adobe" in img.info:
        return False
    if not data.endswith(b"\xff\xd9"):
        return False
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:
        return False
    return orientation == 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over white."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        # Pillow's own conversion clips 16-bit values at 255 (nearly everything turns white);
        # scale 0..65535 down to 0..255 instead. 32-bit "I" images are scaled only if they use
        # more than 8 bits.
        lo, hi = img.getextrema()  # type: ignore[misc]
        if img.mode in _SIXTEEN_BIT_MODES or hi > 255:  # type: ignore[operator]
            img = img.point(lambda v: v / 256)  # type: ignore[arg-type, operator]
        return img.convert("L").convert("RGB")
    if img.mode == "F":
        return img.convert("L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _unidentified_message(data: bytes, field: str) -> str:
    """Why Pillow could not identify ``data``, naming the format from its magic bytes if we can.

    Only the plugins' ``accept`` functions run (prefix comparisons); no other parser sees the bytes.
    """
    prefix = data[:16]
    Image.init()
    for name, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix) is True:
                if name in ALLOWED_FORMATS or name in _JPEG_ALIASES:
                    return f"{field} looks like a {name} image but is truncated or corrupt"
                return f"{field} appears to be in {name} format; only PNG, JPEG or WebP images are accepted"
        except Exception:  # a plugin's sniffer failing just means "not this format"
            continue
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")) or b"<svg" in head:
        return f"{field} is SVG; only PNG, JPEG or WebP images are accepted"
    if head.startswith((b"<!doctype html", b"<html")):
        return f"{field} is an HTML page, not a PNG, JPEG or WebP image"
    return f"{field} is not a PNG, JPEG or WebP image"


_WHITESPACE = " \t\r\n\f\v"  # what base64 decoders skip (str.split()'s ASCII whitespace)


def _has_whitespace(text: str, start: int = 0) -> bool:
    """Whether ``text[start:]`` has ASCII whitespace. One ``find`` per character (a memchr,
    ~1 µs for a 64 KiB frame here) instead of a ``count`` or ``split`` (30–50 µs each)."""
    return any(text.find(c, start) >= 0 for c in _WHITESPACE)


def parse_data_url(url: str, *, max_bytes: int, field: str = "image_url") -> tuple[str, bytes]:
    """Split an RFC 2397 ``data:[<mime>][;base64],<payload>`` URL into ``(mime, bytes)``.

    The size is checked against ``max_bytes`` before anything is decoded (PayloadTooLarge).
    The mime type is lowercased, without parameters; RFC 2397's default is ``text/plain``.
    """
    loc = ("body", field)
    if url[:5].lower() != "data:":
        raise InvalidInput(f"{field} is not a data URL", loc=loc)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidInput(f"{field} is a malformed data URL: no ',' before the payload", loc=loc)

    params = [p.strip() for p in header.split(";")]
    mime = params[0].lower() or "text/plain"
    is_base64 = any(p.lower() == "base64" for p in params[1:])

    if not is_base64:
        # Each byte takes 1 to 3 characters (``%XX``), so at least len/3 bytes come out.
        if math.ceil(len(payload) / 3) > max_bytes:
            raise _too_large(field, max_bytes)
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > max_bytes:
            raise _too_large(field, max_bytes)
        return mime, data

    # Base64 packs 3 bytes in 4 characters. Refuse grossly oversized payloads before even
    # stripping whitespace; then compute the exact decoded length before decoding.
    encoded_limit = 4 * math.ceil(max_bytes / 3)
    if len(payload) > 2 * encoded_limit + 1024:
        raise _too_large(field, max_bytes)
    if "%" in payload:  # percent-encoded base64 ("%2B", "%3D"); '%' is not in the alphabet
        payload = urllib.parse.unquote(payload)
    if _has_whitespace(payload):  # line-wrapped base64 (the check is far cheaper than the split)
        payload = "".join(payload.split())
    if len(payload) % 4 in (2, 3):  # tolerate missing '=' padding
        payload += "=" * (4 - len(payload) % 4)
    padding = len(payload) - len(payload.rstrip("="))
    if len(payload) // 4 * 3 - min(padding, 2) > max_bytes:
        raise _too_large(field, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"{field} is a data URL whose payload is not valid base64", loc=loc) from exc
    return mime, data


def _too_large(field: str, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{field} is larger than the {max_bytes}-byte limit for input files")


def check_data_url_size(url: str, *, max_bytes: int, field: str = "image_url") -> None:
    """PayloadTooLarge when ``url`` is a base64 ``data:`` URL whose payload decodes to more than
    ``max_bytes``, counted without decoding or copying it (cheap enough for the event loop, so
    the queue refuses such an input at submit instead of storing it). Anything else passes:
    :func:`parse_data_url` still checks it exactly when the input is used."""
    if url[:5].lower() != "data:" or (comma := url.find(",", 5)) < 0:
        return
    if not any(p.strip().lower() == "base64" for p in url[5:comma].split(";")[1:]):
        return
    if url.find("%", comma) >= 0:  # percent-encoded base64: its size needs decoding
        return
    chars = len(url) - comma - 1
    if _has_whitespace(url, comma):
        chars -= sum(url.count(c, comma) for c in _WHITESPACE)
    tail = url[-8:].rstrip()
    chars -= len(tail) - len(tail.rstrip("="))
    if chars * 3 // 4 > max_bytes:
        raise _too_large(field, max_bytes)


def encode_image(img: Image.Image, fmt: Literal["jpeg", "png"], *, quality: int = 90) -> bytes:
    """Encode ``img`` as JPEG (``quality`` 1..100) or PNG; other modes are converted to RGB first.

    PNG uses ``compress_level=1``: generated images barely compress further, and a real-time
    server cares more about the milliseconds than the last few percent of bytes.
    """
    kind = fmt.lower()
    buf = io.BytesIO()
    if kind in ("jpeg", "jpg"):
        if not 1 <= quality <= 100:
            raise InvalidInput(f"JPEG quality must be in 1..100, got {quality}", loc=("body", "quality"))
        rgb = img if img.mode in ("RGB", "L") else _to_rgb(img)
        rgb.save(buf, format="JPEG", quality=quality)
    elif kind == "png":
        out = img if img.mode in ("RGB", "RGBA", "L", "LA") else _to_rgb(img)
        out.save(buf, format="PNG", compress_level=1)
    else:
        raise InvalidInput(f"output_format must be 'jpeg' or 'png', got {fmt!r}", loc=("body", "output_format"))
    return buf.getvalue()


def to_data_url(data: bytes, content_type: str) -> str:
    """``data:<content_type>;base64,<payload>``."""
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def content_type_for(fmt: str) -> str:
    """The media type for an output format: ``jpeg`` → ``image/jpeg``, ``png`` → ``image/png``."""
    kind = fmt.lower()
    if kind in ("jpeg", "jpg"):
        return "image/jpeg"
    if kind == "png":
        return "image/png"
    raise InvalidInput(f"output_format must be 'jpeg' or 'png', got {fmt!r}", loc=("body", "output_format"))


def fit_size(img_size: tuple[int, int], multiple: int = 8) -> tuple[int, int]:
    """Snap each side of ``(width, height)`` down to a multiple of ``multiple``, at least ``multiple``."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    width, height = img_size
    return (max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))
