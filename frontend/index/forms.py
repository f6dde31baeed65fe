"""Form posts to index, parsed once with limits before anything is forwarded to clip: a flood of parts
or a huge text field is refused early (werkzeug stops at the first part or byte over the limit)."""

import io
import os
from dataclasses import dataclass, field

from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FIELD_BYTES = int(os.environ.get("INDEX_MAX_FIELD_BYTES", str(256 * 1024)))  # 1,000 labels of 200 chars fit
EXTRA_PARTS = 8  # options, the URL field and the empty file parts a browser sends for unused pickers
OPTION_KEYS = ("labels", "label_set", "top_k")
# The picture kinds clip reads, by their first bytes (clip's images.MAGIC: clip sniffs raw bodies first).
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
DEFAULT_MAX_IMAGES = 16  # clip's own default, used while clip cannot be asked


class Refused(Exception):
    """A form refused before forwarding: becomes a JSON (or HTML) 4xx."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Form:
    """What a form post holds: text fields, the non-empty pictures (name, bytes) and the URLs."""

    fields: dict = field(default_factory=dict)
    pictures: list = field(default_factory=list)
    urls: list = field(default_factory=list)
    texts: int = 0  # pictures sent as base64 text fields
    url_field: bool = False  # the form has an address field (filled or not)


def max_images(info: dict | None) -> int:
    """clip's per-request picture limit, from its self-description (one home for the fact)."""
    try:
        return max(1, int((info or {})["limits"]["max_images"]))
    except (TypeError, KeyError, ValueError, OverflowError):
        return DEFAULT_MAX_IMAGES


def looks_like_image(body: bytes) -> bool:
    """The body starts like a picture clip reads (its own sniff, by magic bytes)."""
    return body.startswith(IMAGE_MAGIC) or (body[:4] == b"RIFF" and body[8:12] == b"WEBP")


def is_form(content_type: str) -> bool:
    return parse_options_header(content_type)[0] in FORM_TYPES


def parse(body: bytes, content_type: str, images_allowed: int) -> Form | None:
    """Parse a form post within limits; raise Refused for floods, oversized fields or too many pictures.
    None when an urlencoded body is no form after all: curl's -d and --data-binary send a picture's bytes,
    its base64 or a data URL under that type, and clip takes those as such, so they go on untouched."""
    mimetype, params = parse_options_header(content_type)
    max_parts = images_allowed + EXTRA_PARTS
    urlencoded = mimetype == "application/x-www-form-urlencoded"
    if urlencoded:
        if looks_like_image(body):  # as clip sorts it: raw image bytes, whatever the Content-Type says
            return None
        # werkzeug reads an urlencoded body whole (the host bounds it): bound its parts before it does.
        if body.count(b"&") >= max_parts:
            raise _too_many_parts(max_parts)
    parser = FormDataParser(
        stream_factory=_in_memory,
        # per field in multipart; an urlencoded body's option fields are measured below (its picture
        # field holds base64, as large as clip takes)
        max_form_memory_size=None if urlencoded else MAX_FIELD_BYTES,
        max_form_parts=max_parts,
        silent=False,
    )
    try:
        _, fields, files = parser.parse(io.BytesIO(body), mimetype, len(body), params)
    except RequestEntityTooLarge:
        # werkzeug says only "too large": tell which limit from what was being read when it stopped.
        raise (_too_many_parts(max_parts) if _part_count(body, params) > max_parts else _field_too_large()) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(400, "invalid_form", f"The form data could not be read ({str(exc)[:80]}).") from None
    if urlencoded:
        if "image" not in fields and "url" not in fields:  # base64 or a data URL: clip reads it whole
            return None
        if any(len(value) > MAX_FIELD_BYTES for key in OPTION_KEYS for value in fields.getlist(key)):
            raise _field_too_large()
    form = Form(fields={key: fields.get(key, "") for key in OPTION_KEYS})
    for storage in files.getlist("image"):
        data = storage.stream.read()
        if data:  # a browser sends an empty part for a picker left empty
            form.pictures.append((_name(storage, len(form.pictures)), data))
    form.urls = [url.strip() for url in fields.getlist("url") if url.strip()]
    form.url_field = "url" in fields
    form.texts = sum(1 for text in fields.getlist("image") if text.strip())
    count = len(form.pictures) + len(form.urls) + form.texts
    if count > images_allowed:
        raise Refused(400, "too_many_images", f"{count} pictures sent; at most {images_allowed} per request.")
    return form


def _in_memory(
    total_content_length: int | None = None,
    content_type: str | None = None,
    filename: str | None = None,
    content_length: int | None = None,
) -> io.BytesIO:
    return io.BytesIO()  # the body is in memory already: no temporary files on disk for its parts


def _name(storage: FileStorage, index: int) -> str:
    return (storage.filename or "").strip()[:120] or f"Picture {index + 1}"


def _part_count(body: bytes, params: dict) -> int:
    boundary = params.get("boundary", "").encode("latin-1", "replace")
    return body.count(b"--" + boundary) - 1 if boundary else 0


def _too_many_parts(max_parts: int) -> Refused:
    return Refused(
        400,  # as clip answers it: one status per code
        "too_many_parts",
        f"The form has more than {max_parts} parts; a picture form needs one part per picture and a few options.",
    )


def _field_too_large() -> Refused:
    return Refused(
        413, "field_too_large", f"A text field of the form (labels?) is larger than {MAX_FIELD_BYTES // 1024} KB."
    )
