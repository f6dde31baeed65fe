"""index function: the upload page, and the forwarder to clip. Pure handle(event, context)."""
import io
import os
import re
import uuid
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_accept_header, parse_options_header
from werkzeug.datastructures import MIMEAccept

from . import clip_client

TEMPLATES = Environment(loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
                        autoescape=select_autoescape(default=True, default_for_string=True))
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
REQUEST_ID = re.compile(r"^[\w.-]{1,64}$")
# Everything the page needs is inline or from this function: nothing from another host, ever.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'")
LABEL_SETS = ("cifar100", "cifar10", "imagenet1k")


def handle(event, context):
    request_id = event.headers.get("X-Request-Id", "")
    request_id = request_id if REQUEST_ID.match(request_id) else uuid.uuid4().hex
    if event.path in ("/ready", "/_/ready"):
        return _json(200, {"ready": True})
    if event.method in ("GET", "HEAD"):
        return _page(200, {})
    if event.method != "POST":
        return _json(405, {"error": {"code": "method_not_allowed", "message": "Use GET for the page or POST an "
                                     "image."}, "request_id": request_id}, {"Allow": "GET, HEAD, POST"})
    content_type = event.headers.get("Content-Type", "")
    status, answer, headers = clip_client.classify(event.body, content_type, urlencode(list(event.query.items(multi=True))), request_id)
    answer.setdefault("request_id", request_id)
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
    """The posted options, to refill the form on the results page (files are not echoed)."""
    mimetype, params = parse_options_header(content_type)
    try:
        _, form, _ = FormDataParser(max_form_memory_size=len(body) + 1).parse(
            io.BytesIO(body), mimetype, len(body), params)
    except ValueError:
        return {}
    return {key: form.get(key, "") for key in ("labels", "label_set", "top_k")}


def _page(status, context, headers=None):
    info = clip_client.info()
    html = TEMPLATES.get_template("page.html").render(info=info, label_sets=LABEL_SETS, **context)
    return {"statusCode": status, "body": html,
            "headers": {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": CSP,
                        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **(headers or {})}}


def _json(status, body, headers=None):
    return {"statusCode": status, "body": body,
            "headers": {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})}}
