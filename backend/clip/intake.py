"""Image intake: every accepted request form -> image bytes + raw options; bytes -> a safe RGB image."""
import base64
import binascii
import io
import json
import re
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

from . import structure
from .decode_gate import decode_cost
from .structure import Limits

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
DATA_URL = re.compile(r"^data:([\w.+/-]*)((?:;[\w=.+-]+)*?)(;base64)?,", re.I)
OPTION_KEYS = ("top_k", "labels", "label_set")
FORM_EXTRA_PARTS = 8  # form parts beyond the images: options, a url, a browser's submit button


class ClientError(Exception):
    """Bad input: becomes a JSON error with this status, never a 500."""

    def __init__(self, status, code, message, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def sniff(data):
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in MAGIC:
        if data.startswith(magic):
            return fmt
    return None


# ---- request -> images + options -------------------------------------------------------------

class Intake:
    """What one request asks: `images` (bytes, or a ClientError per bad item), `urls`, `options`."""

    def __init__(self):
        self.images = []
        self.urls = []
        self.options = MultiDict()


def parse_request(event, max_images):
    """Sort the body into images, URLs and options by content type, sniffing raw bodies."""
    intake = Intake()
    for key in OPTION_KEYS:
        for value in event.query.getlist(key):
            intake.options.add(key, value)
    mimetype, params = parse_options_header(event.headers.get("Content-Type", ""))
    body = event.body
    if mimetype == "multipart/form-data":
        _from_form(intake, body, mimetype, params, max_images)
    elif sniff(body):  # raw image bytes, whatever the Content-Type says
        intake.images.append(body)
    elif mimetype == "application/x-www-form-urlencoded" and _from_form(intake, body, mimetype, params, max_images):
        pass
    elif mimetype == "application/json" or body.lstrip()[:1] == b"{":
        _from_json(intake, body, max_images)
    elif body.strip():  # base64 or a data URL (curl -d sends these as a urlencoded "form")
        intake.images.append(decode_text(body))
    if not intake.images and not intake.urls:
        raise ClientError(400, "missing_image", "No image in the request: send image bytes, a multipart "
                          "field named 'image', base64 or a data URL, or JSON {\"image\": …}.")
    if len(intake.images) + len(intake.urls) > max_images:
        raise _too_many(max_images)
    return intake


def _too_many(max_images):
    return ClientError(400, "too_many_images", f"At most {max_images} images per request.")


def _from_form(intake, body, mimetype, params, max_images):
    """Adds the form's images, URLs and options; False if it held neither image nor url field."""
    # Parts are counted while parsing: 300,000 tiny parts are refused at the first one too many.
    parser = FormDataParser(max_form_memory_size=len(body) + 1, silent=False,
                            max_form_parts=max_images + FORM_EXTRA_PARTS)
    try:
        _, form, files = parser.parse(io.BytesIO(body), mimetype, len(body), params)
    except RequestEntityTooLarge:
        raise ClientError(400, "too_many_parts", f"The form has more than {max_images + FORM_EXTRA_PARTS} "
                          f"parts; send at most {max_images} images and the options.") from None
    except ValueError as exc:
        raise ClientError(400, "invalid_form", f"The form data could not be parsed ({exc}).") from None
    for key in OPTION_KEYS:
        for value in form.getlist(key):
            intake.options.add(key, value)
    for storage in files.getlist("image"):
        data = storage.read()
        if data:  # a browser sends an empty part when no file was chosen
            intake.images.append(data)
    for text in form.getlist("image"):
        if text.strip():
            intake.images.append(decode_text(text.encode()))
    intake.urls.extend(u.strip() for u in form.getlist("url") if u.strip())
    return "image" in files or "image" in form or "url" in form


def _from_json(intake, body, max_images):
    try:
        doc = json.loads(body)
        if b"\\u" in body:  # "\ud800" is valid JSON but no text: refuse lone surrogates anywhere
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError(400, "invalid_json", "The JSON holds a string that is not valid Unicode text.") from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[…" nested 100,000 deep
        raise ClientError(400, "invalid_json", "The body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise ClientError(400, "invalid_json", "The JSON body must be an object, e.g. {\"image\": \"<base64>\"}.")
    for key in OPTION_KEYS:
        if key in doc:
            intake.options.setlist(key, [doc[key]])  # the body's value wins over the query's
    items = []
    if "image" in doc:
        items.append(doc["image"])
    if "images" in doc:
        if not isinstance(doc["images"], list):
            raise ClientError(400, "invalid_json", "'images' must be a list of base64 strings or data URLs.")
        items.extend(doc["images"])
    if len(items) > max_images:  # counted before any is decoded: a million-item list costs nothing more
        raise _too_many(max_images)
    for item in items:
        if not isinstance(item, str):
            raise ClientError(400, "invalid_json", "Each image must be a base64 string or a data URL.")
        intake.images.append(decode_text(item.encode()))
    if "url" in doc:
        if not isinstance(doc["url"], str) or not doc["url"].strip():
            raise ClientError(400, "invalid_json", "'url' must be a non-empty string.")
        intake.urls.append(doc["url"].strip())


def decode_text(text):
    """Base64 or a data URL -> image bytes, or a ClientError describing why not."""
    try:
        text = text.decode("ascii").strip()
    except UnicodeDecodeError:
        return ClientError(400, "invalid_image", f"The body is not an image we can read ({SUPPORTED}).")
    match = DATA_URL.match(text)
    if match:
        if not match.group(3):
            return ClientError(400, "invalid_image", "Only base64 data URLs are supported.")
        text = text[match.end():]
    text = re.sub(r"\s+", "", text.replace(" ", "+"))  # a form's '+' arrives as a space
    try:
        data = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return ClientError(400, "invalid_image", f"The body is neither an image ({SUPPORTED}) nor valid base64.")
    if not sniff(data):
        return ClientError(400, "invalid_image", f"The base64 data is not an image we can read ({SUPPORTED}).")
    return data


# ---- bytes -> RGB image ------------------------------------------------------------------------

@dataclass
class Opened:
    """A picture whose header is read and checked, pixels not yet decoded."""
    image: Image.Image
    fmt: str
    pixels: int     # as it will decode (after a JPEG's DCT-domain downscale)
    cost: int       # peak bytes its decoding will take (decode_gate.decode_cost)


def open_image(data, max_pixels, image_size, limits=Limits()):
    """Read and check untrusted bytes' header: bombs and oversized pictures are refused here, before
    any pixel is decoded."""
    fmt = sniff(data)
    if fmt is None:
        raise ClientError(400, "invalid_image", f"The data is not an image we can read ({SUPPORTED}).")
    with _decoder_errors(fmt, max_pixels):
        problem = structure.problem(fmt, data, limits)
        if problem:
            raise ClientError(400, "image_too_complex", problem)
        image = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = image.size
        if width < 1 or height < 1:
            raise ClientError(400, "invalid_image", "The image has no pixels.")
        if width * height > max_pixels:
            raise ClientError(413, "image_too_large",
                              f"The image is {width}×{height} pixels; the limit is {max_pixels:,} pixels.")
        if fmt == "PNG" and not _png_checksums_match(data):
            raise ClientError(400, "invalid_image", "The PNG file is corrupt: a chunk's checksum does not match.")
        if fmt == "JPEG" and min(width, height) >= 2 * image_size:
            image.draft("RGB", (image_size, image_size))  # DCT-domain downscale, short side stays >= model size
        width, height = image.size
        return Opened(image, fmt, width * height, decode_cost(image.mode, width, height))


def decode(opened, crop_extremes=True):
    """Decode an opened picture into an upright RGB image."""
    with _decoder_errors(opened.fmt, None):
        image = ImageOps.exif_transpose(opened.image)
        image = _to_rgb(image)
        if crop_extremes:
            image = _crop_extreme_aspect(image)
        return image


def load_image(data, max_pixels, image_size, crop_extremes=True, limits=Limits()):
    """Decode untrusted bytes into an upright RGB image, refusing bombs before decoding pixels."""
    return decode(open_image(data, max_pixels, image_size, limits), crop_extremes)


@contextmanager
def _decoder_errors(fmt, max_pixels):
    """Whatever a decoder raises on bad data becomes a plain-worded ClientError."""
    try:
        yield
    except ClientError:
        raise
    except (Image.DecompressionBombError, MemoryError):
        limit = f"the limit of {max_pixels:,} pixels" if max_pixels else "the memory limit"
        raise ClientError(413, "image_too_large", f"The image is over {limit}.") from None
    except Image.UnidentifiedImageError:  # its message names a Python object: say it plainly instead
        raise ClientError(400, "invalid_image", f"The data starts like a {fmt} file but is not a valid one.") \
            from None
    except Exception as exc:  # Pillow raises many types on corrupt data; all of them mean bad input
        reason = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(exc))[:120]  # no object addresses
        raise ClientError(400, "invalid_image", f"The {fmt} image could not be decoded ({type(exc).__name__}: "
                          f"{reason}).") from None


def _png_checksums_match(data):
    """Pillow checks the CRCs of the header chunks only and decodes pixel data (IDAT) with a bad CRC;
    like libpng, refuse it. zlib.crc32 runs at GB/s: well under a millisecond for a photo-sized PNG."""
    view, pos = memoryview(data), 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            return True  # truncated: the decoder reports that in its own words
        if zlib.crc32(view[pos + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            return False
        if kind == b"IEND":
            break
        pos = end + 4
    return True


def _to_rgb(image):
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode.startswith("I;16"):  # 16-bit greyscale: scale, don't clip; in bands, no float copy
        wide, pixels = np.asarray(image), np.empty((image.height, image.width), np.uint8)
        del image  # the decoded frame: only the array is needed now
        for top in range(0, len(wide), 512):
            pixels[top:top + 512] = wide[top:top + 512].astype(np.uint32) * 255 // 65535
        del wide
        return Image.fromarray(pixels, "L").convert("RGB")
    if image.mode in ("I", "F"):  # 32-bit greyscale: scale when it goes past 8 bits, else clip
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.max() > 255:
            pixels *= 255.0 / 65535.0
        pixels = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
        return Image.fromarray(pixels, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":  # transparent areas on white, as a viewer shows them
        canvas = Image.new("RGB", image.size, (255, 255, 255))
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _crop_extreme_aspect(image):
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
