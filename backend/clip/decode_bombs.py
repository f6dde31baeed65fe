"""Decode-time bombs refused from the file's structure, before any decoder runs.

Some small files make decoders work for seconds: JPEGs whose headers are padded with megabytes of fill
bytes or millions of empty segments (Pillow walks JPEG headers byte by byte in Python), progressive
JPEGs with hundreds of scans (each scan decodes the whole picture again), and RLE-compressed BMPs
(Pillow's RLE decoder is pure Python and pads rows byte by byte). A walk over the segment structure
runs at C speed (regular expressions), stops at the first limit passed and costs well under a
millisecond for a photo.
"""

import re
import struct
from dataclasses import dataclass

FILL = re.compile(rb"\xff+")
# After a scan's entropy-coded data: the next 0xFF that is not a stuffed zero, a restart marker or fill.
ENTROPY_END = re.compile(rb"\xff(?![\x00\xd0-\xd7\xff])")
STANDALONE = {0x01} | set(range(0xD0, 0xD8))  # TEM and RSTn carry no length


@dataclass(frozen=True)
class Limits:
    max_segments: int = 1000  # a camera JPEG has a few dozen
    max_fill_bytes: int = 65_536  # legal padding before markers; encoders write almost none
    max_scan_pixels: int = 600_000_000  # scans × pixels: a 50 MP picture of 12 progressive scans
    max_rle_pixels: int = 4_000_000  # RLE BMPs go through a pure-Python decoder


SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (DHT, JPG and DAC share the range)


@dataclass
class JpegShape:
    segments: int = 0
    scans: int = 0
    fill_bytes: int = 0
    pixels: int = 0  # from the first frame header
    entropy_end: int = -1  # where the last scan's entropy-coded data stopped


def jpeg_shape(data: bytes, limits: Limits) -> JpegShape:
    """Count segments, scans and fill bytes, stopping early once a limit is passed."""
    shape, pos, size = JpegShape(), 2, len(data)
    while pos < size and shape.segments <= limits.max_segments and shape.fill_bytes <= limits.max_fill_bytes:
        run = FILL.match(data, pos)
        if run is None or run.end() >= size:
            break  # malformed or truncated: the decoder says so in its own words
        shape.fill_bytes += run.end() - pos - 1
        marker, pos = data[run.end()], run.end() + 1
        shape.segments += 1
        if marker == 0xD9:  # end of image
            break
        if marker in STANDALONE:
            continue
        if pos + 2 > size or (length := struct.unpack_from(">H", data, pos)[0]) < 2:
            break
        if marker in SOF and not shape.pixels and pos + 7 <= size:
            height, width = struct.unpack_from(">HH", data, pos + 3)
            shape.pixels = width * height
        pos += length
        if marker == 0xDA:  # start of scan: skip its entropy-coded data
            shape.scans += 1
            end = ENTROPY_END.search(data, pos)
            if end is None:
                break
            pos = shape.entropy_end = end.start()
    return shape


def plain_single_scan(data: bytes, shape: JpegShape) -> bool:
    """One scan whose entropy-coded data runs to the end-of-image marker closing the file: no stray or
    unknown marker inside it, nothing after it. libjpeg refuses a stray marker; nvJPEG may decode the
    garbage silently, so the device decoder takes only these and leaves the rest to Pillow's verdict."""
    return shape.scans == 1 and shape.entropy_end == len(data) - 2 and data.endswith(b"\xff\xd9")


def problem(fmt: str | None, data: bytes, limits: Limits) -> str | None:
    """Why this file would cost far more to decode than its pixel count says, or None."""
    if fmt == "JPEG":
        return jpeg_problem(data, limits)
    if fmt == "BMP":
        return bmp_problem(data, limits)
    return None


def jpeg_problem(data: bytes, limits: Limits) -> str | None:
    return shape_problem(jpeg_shape(data, limits), limits)


def shape_problem(shape: JpegShape, limits: Limits) -> str | None:
    """Why a JPEG of this shape (walked with these limits) would cost far more to decode, or None."""
    if shape.segments > limits.max_segments:
        return f"The JPEG holds over {limits.max_segments:,} segments; real pictures hold a few dozen."
    if shape.fill_bytes > limits.max_fill_bytes:
        return f"The JPEG is padded with over {limits.max_fill_bytes:,} fill bytes."
    if shape.scans * shape.pixels > limits.max_scan_pixels:
        return (
            f"The JPEG has {shape.scans} scans of {shape.pixels:,} pixels each: more decoding work than the "
            f"limit of {limits.max_scan_pixels:,} pixel-scans."
        )
    return None


def bmp_problem(data: bytes, limits: Limits) -> str | None:
    """RLE8/RLE4 (compression 1 or 2 in the info header) only up to max_rle_pixels."""
    if len(data) >= 34 and struct.unpack_from("<I", data, 14)[0] >= 40:
        width, height, _, _, compression = struct.unpack_from("<iiHHI", data, 18)
        pixels = abs(width * height)
        if compression in (1, 2) and pixels > limits.max_rle_pixels:
            return (
                f"Run-length-encoded BMPs are decoded up to {limits.max_rle_pixels:,} pixels; this one has {pixels:,}."
            )
    return None
