"""index function: the upload page, and the forwarder to clip. Pure handle(event, context); the template
host counts, times and logs each request (NAME, ERROR_CODES below), gives its request id (context) and
asks error_page() for the page when it refuses a browser's request itself (a body over MAX_BODY_BYTES)."""

import os
import pathlib
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from . import clip_client, config, errors, forms, page

NAME = "index"  # the host's metrics (index_requests_total, ...) and access log name it
ERROR_CODES = errors.ERROR_CODES

TEMPLATES = Environment(
    loader=FileSystemLoader(os.path.join(os.path.dirname(__file__), "templates")),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
# the function's OpenAPI 3.1 document (docs/api.md), served as it ships
OPENAPI = pathlib.Path(__file__).with_name("openapi.json").read_bytes()
# Everything the page needs is inline or from this function: nothing from another host, ever.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'"
)
# The host's refusals of a form post, in a person's words on the page (the JSON keeps the host's).
PAGE_MESSAGES = {
    "body_too_large": "The pictures sent are larger than {limit} in all: choose fewer or smaller pictures.",
}


def handle(event: Any, context: Any) -> dict:
    if event.path == "/openapi.json" and event.method in ("GET", "HEAD"):
        return {"statusCode": 200, "body": OPENAPI, "headers": {"Content-Type": "application/json"}}
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
                "request_id": context.request_id,
            },
            {"Allow": "GET, HEAD, POST"},
        )
    return classify(event, context)


def classify(event: Any, context: Any) -> dict:
    """A POST: refused here when clip would refuse it too (a flood), else forwarded with the request id
    (the caller's X-Request-Id or the host's own, which clip logs too); JSON, or the page for a form post."""
    content_type = event.headers.get("Content-Type", "")
    html = _wants_html(event, content_type)
    form = None
    if forms.is_form(content_type):
        try:
            form = forms.parse(event.body, content_type, forms.max_images(clip_client.info()))
        except forms.Refused as refused:
            answer = {"error": {"code": refused.code, "message": refused.message}}
            return _answer(context, refused.status, answer, html)
        html = html and form is not None  # not a form after all (curl -d with a picture): clip's JSON
        if html and form is not None and not form.pictures and not form.urls and not form.texts:
            # the page submitted with nothing chosen: a person's words, not clip's note to developers
            message = "Choose a picture first" + (", or type a picture's address." if form.url_field else ".")
            return _answer(context, 400, {"error": {"code": "missing_image", "message": message}}, html, form)
    query = urlencode(list(event.query.items(multi=True)))
    status, answer, headers = clip_client.classify(event.body, content_type, query, context.request_id)
    return _answer(context, status, answer, html, form, headers)


def _answer(
    context: Any, status: int, answer: dict, html: bool, form: forms.Form | None = None, headers: dict | None = None
) -> dict:
    """The answer as JSON or as the page; the access log learns its pictures and, for the page, its code."""
    answer["request_id"] = context.request_id  # ours: clip was sent it, and its answer is not trusted
    images = 1 if "predictions" in answer else len(answer["results"]) if "results" in answer else None
    context.note(images=images)
    if not html:
        return _json(status, answer, headers)
    context.note(code=answer.get("error", {}).get("code", ""))
    return _page(status, answer, form, headers)


def error_page(status: int, code: str, message: str, request_id: str) -> str:
    """The page with the host's own refusal on it (asked for when a browser prefers HTML), as the page
    shows any error: escaped, in the error box. Never waits on clip: its description as last fetched."""
    limit = page.size_text(config.MAX_BODY_BYTES)
    answer = {"error": {"code": code, "message": PAGE_MESSAGES.get(code, message).format(limit=limit)}}
    return _render({**answer, "request_id": request_id}, None, clip_client.last_info())


def _wants_html(event: Any, content_type: str) -> bool:
    """A plain form post from a browser (no JavaScript) gets the results page; scripts get JSON."""
    if not forms.is_form(content_type):
        return False
    accept = parse_accept_header(event.headers.get("Accept", ""), MIMEAccept)
    return accept.best_match(["application/json", "text/html"]) == "text/html"


def _render(answer: dict | None, form: forms.Form | None, info: dict | None) -> str:
    return TEMPLATES.get_template("page.html").render(
        info=info,
        clip_problem=clip_client.problem(),
        clip_status=page.clip_status(info, clip_client.starting(), clip_client.problem()),
        settings=page.page_settings(info),
        answer=page.answer_view(answer),
        form=page.refill(form),
        cards=page.cards(answer, form),
    )


def _page(status: int, answer: dict | None = None, form: forms.Form | None = None, headers: dict | None = None) -> dict:
    return {
        "statusCode": status,
        "body": _render(answer, form, clip_client.info()),
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
