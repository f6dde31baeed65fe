"""The door: a request -> its pictures (one Item each, in input order) and its validated options.

Every accepted form (raw bytes, multipart, base64 or a data URL, JSON) is sorted here and the options
checked, so the service sees one shape whatever was sent and never raw input. A picture refused while
parsing (bad base64) is an Item with its error: it fails alone in a batch, the others go on."""

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from .errors import ClientError
from .images import SUPPORTED, sniff
from .options import OptionRules, Options, parse_options

DATA_URL = re.compile(r"^data:([\w.+/-]*)((?:;[\w=.+-]+)*?)(;base64)?,", re.I)
OPTION_KEYS = ("top_k", "labels", "label_set", "embedding")
# decode_text's clean-up: what \s matches in ASCII text is removed, but a space is a form's '+'.
BASE64_DELETE = bytes(c for c in range(128) if chr(c).isspace() and c != 0x20)
BASE64_TABLE = bytes.maketrans(b" -_", b"++/")
READ_SIZE = 64 * 1024  # werkzeug's MultiPartParser's buffer_size
FORM_EXTRA_PARTS = 8  # form parts beyond the images: options, a url, a browser's submit button


@dataclass
class Item:
    """One picture of a request, from what was sent to its result: bytes or a URL in, then what the
    model takes (a preprocessed array, or the bytes for the device decoder), then its feature row; or
    the error that stopped it on the way, after which no later step touches it."""

    data: bytes | None = None
    url: str | None = None
    error: ClientError | None = None
    prepared: object = None  # np.ndarray, or a device_decode.DeviceJpeg
    features: np.ndarray | None = None


@dataclass(frozen=True)
class Limits:
    """What the door checks a request against: pictures per request, and the options' rules."""

    max_images: int
    options: OptionRules


@dataclass
class Request:
    """What one request asks: its pictures, in input order, and its options, checked."""

    items: list[Item]
    options: Options


@dataclass
class Body:
    """A body sorted into pictures and options as sent (not yet checked)."""

    items: list[Item] = field(default_factory=list)
    options: MultiDict[str, Any] = field(default_factory=MultiDict)

    def add_bytes(self, data: bytes) -> None:
        self.items.append(Item(data=data))

    def add_text(self, text: bytes) -> None:
        """Base64 or a data URL; a bad one becomes that picture's error."""
        try:
            self.items.append(Item(data=decode_text(text)))
        except ClientError as error:
            self.items.append(Item(error=error))

    def add_url(self, url: str) -> None:
        self.items.append(Item(url=url))

    @property
    def images(self) -> list:
        """The pictures sent in the body: their bytes, or the error that refused them."""
        return [item.error or item.data for item in self.items if item.url is None]

    @property
    def urls(self) -> list[str]:
        return [item.url for item in self.items if item.url is not None]


def parse_request(event: Any, limits: Limits) -> Request:
    """The request's pictures and checked options; a ClientError for anything refused as a whole."""
    body = sort_body(event, limits.max_images)
    return Request(body.items, parse_options(body.options, limits.options))


def sort_body(event: Any, max_images: int) -> Body:
    """Sort the body into pictures and options by content type, sniffing raw bodies."""
    found = Body()
    for key in OPTION_KEYS:
        for value in event.query.getlist(key):
            found.options.add(key, value)
    mimetype, params = parse_options_header(event.headers.get("Content-Type", ""))
    body = event.body
    if mimetype == "multipart/form-data":
        _from_form(found, body, mimetype, params, max_images)
    elif sniff(body):  # raw image bytes, whatever the Content-Type says
        found.add_bytes(body)
    elif mimetype == "application/x-www-form-urlencoded" and _from_form(found, body, mimetype, params, max_images):
        pass
    elif mimetype == "application/json" or body.lstrip()[:1] == b"{":
        _from_json(found, body, max_images)
    elif body.strip():  # base64 or a data URL (curl -d sends these as a urlencoded "form")
        found.add_text(body)
    if not found.items:
        raise ClientError(
            400,
            "missing_image",
            "No image in the request: send image bytes, a multipart "
            "field named 'image', base64 or a data URL, or JSON {\"image\": …}.",
        )
    if len(found.items) > max_images:
        raise _too_many(max_images)
    return found


def _too_many(max_images: int) -> ClientError:
    return ClientError(400, "too_many_images", f"At most {max_images} images per request.")


def _from_form(into: Body, body: bytes, mimetype: str, params: dict[str, str], max_images: int) -> bool:
    """Adds the form's images, URLs and options in the order the parts arrived; False if it held neither
    image nor url field."""
    max_parts = max_images + FORM_EXTRA_PARTS
    try:
        parts = _multipart(body, params, max_parts) if mimetype == "multipart/form-data" else _urlencoded(body)
    except RequestEntityTooLarge:
        raise ClientError(
            400,
            "too_many_parts",
            f"The form has more than {max_parts} parts; send at most {max_images} images and the options.",
        ) from None
    except ValueError as exc:
        raise ClientError(400, "invalid_form", f"The form data could not be parsed ({exc}).") from None
    found = False
    for name, value in parts:
        if isinstance(value, bytes):  # a file part: only an image counts
            if name == "image":
                found = True
                if value:  # a browser sends an empty part when no file was chosen
                    into.add_bytes(value)
        elif name in OPTION_KEYS:
            into.options.add(name, value)
        elif name == "image":
            found = True
            if value.strip():
                into.add_text(value.encode())
        elif name == "url":
            found = True
            if value.strip():
                into.add_url(value.strip())
    return found


def _multipart(body: bytes, params: dict[str, str], max_parts: int) -> list[tuple[str, str | bytes]]:
    """The form's parts in the order they arrived: (name, text) for a field, (name, bytes) for a file.
    werkzeug's own decoder parses them, in the same loop as its MultiPartParser; FormDataParser would
    hand fields and files back apart, and a batch's pictures would lose their order."""
    boundary = params.get("boundary", "")
    if not boundary:
        raise ValueError("Missing boundary")
    delimiter = boundary.encode("ascii")  # not ASCII: UnicodeEncodeError, a ValueError, as in werkzeug
    decoder = MultipartDecoder(delimiter, max_form_memory_size=len(body) + 1, max_parts=max_parts)
    charset = MultiPartParser().get_part_charset  # what werkzeug decodes a text field with
    reads = _UpToBoundaries(body, b"--" + delimiter)
    parts: list[tuple[str, str | bytes]] = []
    part: Field | File | None = None
    chunks: list[bytes] = []
    while True:
        data = reads.read(READ_SIZE)
        decoder.receive_data(data or None)  # None: the body's end
        event = decoder.next_event()
        while not isinstance(event, (Epilogue, NeedData)):
            if isinstance(event, (Field, File)):
                part, chunks = event, []
            elif isinstance(event, Data) and part is not None:
                chunks.append(event.data)
                if not event.more_data:
                    value = b"".join(chunks)
                    parts.append(
                        (part.name, value if isinstance(part, File) else value.decode(charset(part.headers), "replace"))
                    )
            event = decoder.next_event()
        if not data:
            return parts


class _InOrder(MultiDict[str, Any]):
    """FormDataParser's MultiDict, also keeping its pairs in the order they arrived (a MultiDict keeps
    each name's values in order, not the order between names)."""

    def __init__(self, pairs: Any = None):
        super().__init__(pairs)
        self.pairs: list[tuple[str, str]] = list(pairs) if isinstance(pairs, list) else []


def _urlencoded(body: bytes) -> list[tuple[str, str | bytes]]:
    parser = FormDataParser(cls=_InOrder, silent=False)
    _, form, _ = parser.parse(io.BytesIO(body), "application/x-www-form-urlencoded", len(body), {})
    return list(cast(_InOrder, form).pairs)


class _UpToBoundaries(io.BytesIO):
    """The body as werkzeug's multipart parser reads it: each read ends just before the line break and
    boundary delimiter that close a part (or where werkzeug's read size ends it). werkzeug still parses
    every byte; only where its reads stop changes. Why: a read holding a part's data and the boundary
    after it is searched with werkzeug's boundary regex byte by byte (about 0.4 ms per 80 KB picture on a
    2-core EPYC); a read holding no boundary is passed on after one bytes.find. Reads are at least
    MIN_READ long, so a body stuffed with delimiter-like text is read in at most len/MIN_READ pieces."""

    MIN_READ = 4096

    def __init__(self, body: bytes, delimiter: bytes):
        super().__init__(body)
        self._body, self._delimiter = body, delimiter
        self._next = 0  # the first delimiter at or after the last search's start; -1: none left

    def read(self, size: int | None = -1) -> bytes:
        start = self.tell()
        if self._next != -1 and self._next < start + self.MIN_READ:  # passed it: search on (once per part)
            self._next = self._body.find(self._delimiter, start + self.MIN_READ)
        end = self._next
        if end != -1:
            # The line break before the delimiter goes with it: a read never ends between a CR and its LF.
            if self._body[end - 1 : end] == b"\n":
                end -= 1
            if self._body[end - 1 : end] == b"\r":
                end -= 1
            if size is None or size < 0 or end - start < size:
                size = end - start
        return super().read(size)


def _from_json(into: Body, body: bytes, max_images: int) -> None:
    doc = json_object(body)
    for key in OPTION_KEYS:
        if key in doc:
            into.options.setlist(key, [doc[key]])  # the body's value wins over the query's
    texts = []
    if "image" in doc:
        texts.append(doc["image"])
    if "images" in doc:
        if not isinstance(doc["images"], list):
            raise ClientError(400, "invalid_json", "'images' must be a list of base64 strings or data URLs.")
        texts.extend(doc["images"])
    if len(texts) > max_images:  # counted before any is decoded: a million-item list costs nothing more
        raise _too_many(max_images)
    for text in texts:
        if not isinstance(text, str):
            raise ClientError(400, "invalid_json", "Each image must be a base64 string or a data URL.")
        into.add_text(text.encode())
    if "url" in doc:
        if not isinstance(doc["url"], str) or not doc["url"].strip():
            raise ClientError(400, "invalid_json", "'url' must be a non-empty string.")
        into.add_url(doc["url"].strip())


def json_object(body: bytes, example: str = '{"image": "<base64>"}') -> dict[str, Any]:
    """The body as a JSON object (also POST /embeddings'); a ClientError invalid_json otherwise."""
    try:
        doc = json.loads(body)
        # "\ud800" is valid JSON but no text: refuse lone surrogates anywhere. (The one-byte search
        # first: memchr, where the two-byte one costs 2 ms over 16 pictures of base64.)
        if b"\\" in body and b"\\u" in body:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError(400, "invalid_json", "The JSON holds a string that is not valid Unicode text.") from None
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[…" nested 100,000 deep
        raise ClientError(400, "invalid_json", "The body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise ClientError(400, "invalid_json", f"The JSON body must be an object, e.g. {example}.")
    return doc


def decode_text(raw: bytes) -> bytes:
    """Base64 or a data URL -> image bytes; raises a ClientError saying why not."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ClientError(400, "invalid_image", f"The body is not an image we can read ({SUPPORTED}).") from None
    match = DATA_URL.match(text)
    if match:
        if not match.group(3):
            raise ClientError(400, "invalid_image", "Only base64 data URLs are supported.")
        text = text[match.end() :]
    # One C pass: a form's '+' arrives as a space; other whitespace (line breaks) goes; URL-safe to standard.
    # (re.sub over a photo's 100 KB of base64 cost 3 ms a picture.)
    coded = text.encode("ascii").translate(BASE64_TABLE, BASE64_DELETE)
    try:
        data = base64.b64decode(coded + b"=" * (-len(coded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(
            400, "invalid_image", f"The body is neither an image ({SUPPORTED}) nor valid base64."
        ) from None
    if not sniff(data):
        raise ClientError(400, "invalid_image", f"The base64 data is not an image we can read ({SUPPORTED}).")
    return data
