"""Form posts to index, parsed once before anything is forwarded to clip, with clip's own limits: a
flood of parts or pictures is refused here (werkzeug stops at the first part over the limit), with the
code clip would answer, and whatever clip takes goes on."""

import io
from dataclasses import dataclass, field

from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
EXTRA_PARTS = 8  # clip's FORM_EXTRA_PARTS: options, the URL field, the empty part of a picker left unused
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
    """Parse a form post with clip's limits (its parts and pictures; a field may be as large as the body
    the host admits, as in clip); raise Refused where clip would refuse it too, with clip's code.
    None when the body goes on to clip untouched: curl's -d and --data-binary send a picture's bytes,
    its base64 or a data URL under the urlencoded type, and clip takes those as such; and an urlencoded
    body of more fields than a picture form needs is clip's to read (it counts no parts there), not
    index's to parse into a dictionary."""
    mimetype, params = parse_options_header(content_type)
    max_parts = images_allowed + EXTRA_PARTS
    urlencoded = mimetype == "application/x-www-form-urlencoded"
    if urlencoded and (looks_like_image(body) or body.count(b"&") >= max_parts):
        return None
    parser = FormDataParser(
        stream_factory=_in_memory, max_form_memory_size=None, max_form_parts=max_parts, silent=False
    )
    try:
        _, fields, files = parser.parse(io.BytesIO(body), mimetype, len(body), params)
    except RequestEntityTooLarge:  # the only limit left to werkzeug: the number of parts
        raise Refused(
            400,  # as clip answers it: one status per code
            "too_many_parts",
            f"The form has more than {max_parts} parts; send at most {images_allowed} pictures and the options.",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(400, "invalid_form", f"The form data could not be read ({str(exc)[:80]}).") from None
    if urlencoded and "image" not in fields and "url" not in fields:  # base64 or a data URL: clip reads it whole
        return None
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
