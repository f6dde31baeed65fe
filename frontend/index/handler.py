"""index function: the upload page, and the forwarder to clip. Pure handle(event, context)."""
import base64
import io
import os
import re
import uuid
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_accept_header, parse_options_header
from werkzeug.datastructures import MIMEAccept

from . import clip_client, metrics

TEMPLATES = Environment(loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                        autoescape=select_autoescape(default=True, default_for_string=True))
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
REQUEST_ID = re.compile(r"^[\w.-]{1,64}$")
# Everything the page needs is inline or from this function: nothing from another host, ever.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'")
LABEL_SETS = ("cifar100", "cifar10", "imagenet1k")
PREVIEW_MAX_BYTES = 2 * 1024 * 1024  # the page without JavaScript echoes the picture up to this size
PREVIEW_KINDS = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
                 (b"RIFF", "image/webp"))
# A local model or checkpoint path names a folder on the server: the page shows only its last part.
TEMPLATES.filters["short_name"] = lambda name: re.sub(r"(^|local-dir:)/\S*/", r"\1", str(name))


def handle(event, context):
    if event.path == "/metrics" and event.method in ("GET", "HEAD"):
        return metrics.exposition(event)
    request_id = event.headers.get("X-Request-Id", "")
    request_id = request_id if REQUEST_ID.match(request_id) else uuid.uuid4().hex
    return metrics.observe(event, request_id, lambda: respond(event, request_id))


def shutdown():
    """Called by the template host when it drains this worker."""
    metrics.worker_exiting()


def respond(event, request_id):
    if event.path in ("/ready", "/_/ready"):
        return _json(200, {"ready": True})
    if event.method in ("GET", "HEAD"):
        return _page(200, {})
    if event.method != "POST":
        return _json(405, {"error": {"code": "method_not_allowed", "message": "Use GET for the page or POST an "
                                     "image."}, "request_id": request_id}, {"Allow": "GET, HEAD, POST"})
    content_type = event.headers.get("Content-Type", "")
    query = urlencode(list(event.query.items(multi=True)))
    status, answer, headers = clip_client.classify(event.body, content_type, query, request_id)
    answer.setdefault("request_id", request_id)
    metrics.note_answer(answer)
    if _wants_html(event, content_type):
        return _page(status, {"answer": answer, "form": _form_fields(event.body, content_type)}, headers)
    return _json(status, answer, headers)


def _wants_html(event, content_type):
    """A plain form post from a browser (no JavaScript) gets the results page; scripts get JSON."""
    if parse_options_header(content_type)[0] not in FORM_TYPES:
        return False
    accept = parse_accept_header(event.headers.get("Accept", ""), MIMEAccept)
    return accept.best_match(["application/json", "text/html"]) == "text/html"


def _form_fields(body, content_type):
    """The posted options, to refill the form on the results page, and the posted picture (when small
    and of a kind every browser shows) as a data: URL, so the page without JavaScript shows it too."""
    mimetype, params = parse_options_header(content_type)
    try:
        _, form, files = FormDataParser(max_form_memory_size=len(body) + 1).parse(
            io.BytesIO(body), mimetype, len(body), params)
    except ValueError:
        return {}
    fields = {key: form.get(key, "") for key in ("labels", "label_set", "top_k")}
    image = files.get("image")
    if image is not None:
        data = image.stream.read(PREVIEW_MAX_BYTES + 1)
        kind = next((kind for magic, kind in PREVIEW_KINDS if data.startswith(magic)), None)
        if kind and len(data) <= PREVIEW_MAX_BYTES and (kind != "image/webp" or data[8:12] == b"WEBP"):
            fields["preview"] = f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"
    return fields


def _page(status, context, headers=None):
    info = clip_client.info()
    html = TEMPLATES.get_template("page.html").render(info=info, label_sets=LABEL_SETS, **context)
    return {"statusCode": status, "body": html,
            "headers": {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": CSP,
                        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **(headers or {})}}


def _json(status, body, headers=None):
    return {"statusCode": status, "body": body,
            "headers": {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})}}
