"""index function: the upload page, and the forwarder to clip. Pure handle(event, context)."""

import os
import pathlib
import re
import uuid
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from . import clip_client, forms, metrics, page

TEMPLATES = Environment(
    loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
# the function's OpenAPI 3.1 document (docs/api.md), served as it ships
OPENAPI = pathlib.Path(__file__).with_name("openapi.json").read_bytes()
REQUEST_ID = re.compile(r"[\w.-]{1,64}", re.ASCII)  # echoed in a header: ASCII only, fullmatch
# Everything the page needs is inline or from this function: nothing from another host, ever.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'"
)


def handle(event: Any, context: Any) -> dict:
    if event.path == "/metrics" and event.method in ("GET", "HEAD"):
        return metrics.exposition(event)
    if event.path == "/openapi.json" and event.method in ("GET", "HEAD"):
        return {"statusCode": 200, "body": OPENAPI, "headers": {"Content-Type": "application/json"}}
    request_id = event.headers.get("X-Request-Id", "")
    request_id = request_id if REQUEST_ID.fullmatch(request_id) else uuid.uuid4().hex
    return metrics.observe(event, request_id, lambda: respond(event, request_id))


def shutdown() -> None:
    """Called by the template host when it drains this worker."""
    metrics.worker_exiting()


def respond(event: Any, request_id: str) -> dict:
    if event.path in ("/ready", "/_/ready"):
        return _json(200, {"ready": True})
    if event.method in ("GET", "HEAD"):
        if "status" in event.query:  # polled by the page while clip starts
            info = clip_client.info()
            return _json(200, page.clip_status(info, clip_client.starting(), clip_client.problem()))
        return _page(200)
    if event.method != "POST":
        return _json(
            405,
            {
                "error": {"code": "method_not_allowed", "message": "Use GET for the page or POST an image."},
                "request_id": request_id,
            },
            {"Allow": "GET, HEAD, POST"},
        )
    content_type = event.headers.get("Content-Type", "")
    html = _wants_html(event, content_type)
    form = None
    if forms.is_form(content_type):  # parsed with limits before forwarding: floods stop here
        try:
            form = forms.parse(event.body, content_type, forms.max_images(clip_client.info()))
        except forms.Refused as refused:
            answer = {"error": {"code": refused.code, "message": refused.message}, "request_id": request_id}
            return _page(refused.status, answer) if html else _json(refused.status, answer)
        html = html and form is not None  # not a form after all (curl -d with a picture): clip's JSON
        if html and form is not None and not form.pictures and not form.urls and not form.texts:
            # the page submitted with nothing chosen: a person's words, not clip's note to developers
            message = "Choose a picture first" + (", or type a picture's address." if form.url_field else ".")
            answer = {"error": {"code": "missing_image", "message": message}, "request_id": request_id}
            return _page(400, answer, form)
    query = urlencode(list(event.query.items(multi=True)))
    status, answer, headers = clip_client.classify(event.body, content_type, query, request_id)
    answer["request_id"] = request_id  # ours: clip was sent it, and its answer is not trusted
    metrics.note_answer(answer)
    if html:
        return _page(status, answer, form, headers)
    return _json(status, answer, headers)


def _wants_html(event: Any, content_type: str) -> bool:
    """A plain form post from a browser (no JavaScript) gets the results page; scripts get JSON."""
    if not forms.is_form(content_type):
        return False
    accept = parse_accept_header(event.headers.get("Accept", ""), MIMEAccept)
    return accept.best_match(["application/json", "text/html"]) == "text/html"


def _page(status: int, answer: dict | None = None, form: forms.Form | None = None, headers: dict | None = None) -> dict:
    info = clip_client.info()
    html = TEMPLATES.get_template("page.html").render(
        info=info,
        clip_problem=clip_client.problem(),
        clip_status=page.clip_status(info, clip_client.starting(), clip_client.problem()),
        settings=page.page_settings(info),
        answer=page.answer_view(answer),
        form=page.refill(form),
        cards=page.cards(answer, form),
    )
    return {
        "statusCode": status,
        "body": html,
        "headers": {
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            **(headers or {}),
        },
    }


def _json(status: int, body: dict, headers: dict | None = None) -> dict:
    return {
        "statusCode": status,
        "body": body,
        "headers": {"Content-Type": "application/json", "Cache-Control": "no-store", **(headers or {})},
    }
