"""Untrusted bytes -> a safe, upright RGB picture. Apart from request parsing because two decoders
share its rules (the format sniff, the pixel and aspect limits): Pillow here, and device_decode.py,
which must refuse and accept exactly what this module does."""

import io
import re
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from . import decode_bombs
from .decode_bombs import Limits
from .decode_gate import decode_cost
from .errors import BadImage

# Magic bytes -> Pillow format; nothing else is ever handed to a decoder.
MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
SUPPORTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"
MAX_ASPECT = 4  # longer/shorter side kept before the model's resize; the centre crop never sees more


def sniff(data: bytes) -> str | None:
    """The Pillow format the bytes start like, or None: only these ever reach a decoder."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in MAGIC:
        if data.startswith(magic):
            return fmt
    return None


@dataclass
class Opened:
    """A picture whose header is read and checked, pixels not yet decoded."""

    image: Image.Image
    fmt: str
    pixels: int  # as it will decode (after a JPEG's DCT-domain downscale)
    cost: int  # peak bytes its decoding will take (decode_gate.decode_cost)


def open_image(data: bytes, max_pixels: int, image_size: int, limits: Limits = Limits()) -> Opened:
    """Read and check untrusted bytes' header: bombs and oversized pictures are refused here, before
    any pixel is decoded."""
    fmt = sniff(data)
    if fmt is None:
        raise BadImage("invalid_image", f"The data is not an image we can read ({SUPPORTED}).")
    with _decoder_errors(fmt, max_pixels):
        problem = decode_bombs.problem(fmt, data, limits)
        if problem:
            raise BadImage("image_too_complex", problem)
        image = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = image.size
        if width < 1 or height < 1:
            raise BadImage("invalid_image", "The image has no pixels.")
        if width * height > max_pixels:
            raise BadImage(
                "image_too_large", f"The image is {width}×{height} pixels; the limit is {max_pixels:,} pixels."
            )
        if fmt == "PNG" and not _png_checksums_match(data):
            raise BadImage("invalid_image", "The PNG file is corrupt: a chunk's checksum does not match.")
        if fmt == "PNG":
            _png_key_as_decoded(image, data)
        if fmt == "JPEG" and min(width, height) >= 2 * image_size:
            image.draft("RGB", (image_size, image_size))  # DCT-domain downscale, short side stays >= model size
        width, height = image.size
        cost = decode_cost(image.mode, width, height)
        if _via_rgba(image):  # composited onto white through an RGBA copy of it
            cost += width * height * 4
        return Opened(image, fmt, width * height, cost)


def decode(opened: Opened, crop_extremes: bool = True) -> Image.Image:
    """Decode an opened picture into an upright RGB image."""
    with _decoder_errors(opened.fmt, None):
        image = ImageOps.exif_transpose(opened.image)
        image = _to_rgb(image)
        if crop_extremes:
            image = _crop_extreme_aspect(image)
        return image


def load_image(
    data: bytes, max_pixels: int, image_size: int, crop_extremes: bool = True, limits: Limits = Limits()
) -> Image.Image:
    """Decode untrusted bytes into an upright RGB image, refusing bombs before decoding pixels."""
    return decode(open_image(data, max_pixels, image_size, limits), crop_extremes)


@contextmanager
def _decoder_errors(fmt: str, max_pixels: int | None) -> Iterator[None]:
    """Whatever a decoder raises on bad data becomes a plain-worded BadImage."""
    try:
        yield
    except BadImage:
        raise
    except (Image.DecompressionBombError, MemoryError):
        limit = f"the limit of {max_pixels:,} pixels" if max_pixels else "the memory limit"
        raise BadImage("image_too_large", f"The image is over {limit}.") from None
    except Image.UnidentifiedImageError:  # its message names a Python object: say it plainly instead
        raise BadImage("invalid_image", f"The data starts like a {fmt} file but is not a valid one.") from None
    except Exception as exc:  # Pillow raises many types on corrupt data; all of them mean bad input
        reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(exc))[:120]  # no object addresses
        raise BadImage(
            "invalid_image", f"The {fmt} image could not be decoded ({type(exc).__name__}: {reason})."
        ) from None


def _png_checksums_match(data: bytes) -> bool:
    """Pillow checks the CRCs of the header chunks only and decodes pixel data (IDAT) with a bad CRC;
    like libpng, refuse it. zlib.crc32 runs at GB/s: well under a millisecond for a photo-sized PNG."""
    view, pos = memoryview(data), 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            return True  # truncated: the decoder reports that in its own words
        if zlib.crc32(view[pos + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            return False
        if kind == b"IEND":
            break
        pos = end + 4
    return True


def _png_key_as_decoded(image: Image.Image, data: bytes) -> None:
    """A grey or RGB PNG's tRNS chunk is a colour key: pixels of that value are transparent. Pillow keeps
    the key as written, but scales 2- and 4-bit grey pixels up to 0-255 and keeps only the high byte of
    16-bit RGB ones: put the key on the decoded pixels' scale, so that it matches them. (16-bit RGB: the
    pixels whose high bytes match, within 1/256 of the key colour, since the low bytes are gone.)"""
    key = image.info.get("transparency")
    if data[12:16] != b"IHDR" or len(data) < 26:
        return
    depth, colour_type = data[24], data[25]
    if colour_type == 0 and depth in (2, 4) and isinstance(key, int):
        top = (1 << depth) - 1
        image.info["transparency"] = (key & top) * 255 // top
    elif colour_type == 2 and depth == 16 and isinstance(key, tuple):
        image.info["transparency"] = tuple(value >> 8 for value in key)


def _colour_key(image: Image.Image) -> int | tuple[int, ...] | None:
    """The pixel value a colour key makes transparent (a grey or RGB PNG's tRNS), or None."""
    key = image.info.get("transparency")
    if image.mode == "RGB":
        return key if isinstance(key, tuple) and len(key) == 3 else None
    if image.mode in ("1", "L") or image.mode.startswith("I;16"):
        return key if isinstance(key, int) else None
    return None


def _via_rgba(image: Image.Image) -> bool:
    """Whether _to_rgb composites it onto white through an RGBA copy (16-bit grey keys go in place)."""
    if image.mode in ("PA", "LA", "La", "RGBa"):
        return True
    if image.mode == "P":
        return "transparency" in image.info
    return _colour_key(image) is not None and not image.mode.startswith("I;16")


def _to_rgb(image: Image.Image) -> Image.Image:
    pixels: np.ndarray  # uint8 or float32, by branch
    key = _colour_key(image)
    if image.mode == "RGB" and key is None:
        image.load()
        return image
    if image.mode.startswith("I;16"):  # 16-bit greyscale: scale, don't clip; in bands, no float copy
        wide, pixels = np.asarray(image), np.empty((image.height, image.width), np.uint8)
        del image  # the decoded frame: only the array is needed now
        for top in range(0, len(wide), 512):
            band = wide[top : top + 512]
            pixels[top : top + 512] = band.astype(np.uint32) * 255 // 65535
            if key is not None:  # the colour key's pixels are transparent: white, as below
                pixels[top : top + 512][band == key] = 255
        del wide
        return Image.fromarray(pixels, "L").convert("RGB")
    if image.mode in ("I", "F"):  # 32-bit greyscale: scale when it goes past 8 bits, else clip
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.max() > 255:
            pixels *= 255.0 / 65535.0
        pixels = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
        return Image.fromarray(pixels, "L").convert("RGB")
    if _via_rgba(image):  # a colour key becomes an alpha channel (Pillow's convert applies it)
        image = image.convert("RGBA")
    if image.mode == "RGBA":  # transparent areas on white, as a viewer shows them
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _crop_extreme_aspect(image: Image.Image) -> Image.Image:
    """Keep the centre of very long strips: the model's centre crop sees no more, and resizing a
    1×3000 strip to a 224-pixel short side would allocate hundreds of MB."""
    width, height = image.size
    if width > MAX_ASPECT * height:
        left = (width - MAX_ASPECT * height) // 2
        return image.crop((left, 0, left + MAX_ASPECT * height, height))
    if height > MAX_ASPECT * width:
        top = (height - MAX_ASPECT * width) // 2
        return image.crop((0, top, width, top + MAX_ASPECT * width))
    return image
