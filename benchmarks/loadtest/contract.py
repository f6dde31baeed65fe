"""Every answer checked against the API's contract: the JSON shape of a 200 and of an error, the
error code the input must get, a usable Retry-After on a 429."""

from typing import Any

import requests

from benchmarks.loadtest.payloads import Payload


def check_body(payload: Payload, response: requests.Response) -> tuple[str | None, Any]:
    """(None, body) when the answer has the contract's shape, else (what is wrong, body or None); the
    body is whatever JSON came."""
    content_type = response.headers.get("Content-Type", "")
    if not content_type.startswith("application/json"):
        return f"Content-Type {content_type!r}", None
    try:
        doc = response.json()
    except ValueError:
        return f"body is not JSON: {response.text[:80]!r}", None
    if not isinstance(doc, dict):
        return "body is not a JSON object", doc
    if "Traceback" in response.text:
        return "a stack trace in the body", doc
    if not isinstance(doc.get("request_id"), str):
        return "no request_id", doc
    if response.status_code == 200:
        if not isinstance(doc.get("model"), str) or doc.get("label_set") != payload.label_set:
            return f"model/label_set: {doc.get('model')!r}/{doc.get('label_set')!r}", doc
        items = doc.get("results") if payload.images > 1 else [doc]
        if not isinstance(items, list) or len(items) != payload.images:
            return f"expected {payload.images} result(s)", doc
        for item in items:
            predictions = item.get("predictions") if isinstance(item, dict) else None
            if not isinstance(predictions, list) or len(predictions) != payload.top_k:
                return f"expected {payload.top_k} predictions, got {str(predictions)[:80]}", doc
            scores = [p.get("score") for p in predictions]
            if not all(isinstance(p.get("label"), str) for p in predictions) or not all(
                isinstance(s, (int, float)) and 0 <= s <= 1 for s in scores
            ):
                return f"bad prediction entries: {str(predictions)[:80]}", doc
            if scores != sorted(scores, reverse=True):
                return "predictions not sorted by score", doc
            if payload.labels and not {p["label"] for p in predictions} <= set(payload.labels):
                return f"labels outside the requested set: {[p['label'] for p in predictions]}", doc
        return None, doc
    error = doc.get("error")
    if (
        not isinstance(error, dict)
        or not isinstance(error.get("code"), str)
        or not isinstance(error.get("message"), str)
        or not error["message"]
    ):
        return f"no error.code/message: {response.text[:80]!r}", doc
    if error["code"] not in payload.codes or (error["code"] == "queue_full") != (response.status_code == 429):
        return f"HTTP {response.status_code} with code {error['code']!r}, expected {'/'.join(payload.codes)}", doc
    return None, doc


def retry_after(response: requests.Response) -> float | None:
    try:
        value = float(response.headers.get("Retry-After", ""))
        return value if value >= 0 else None
    except ValueError:
        return None
