"""The one network hop of the index function: to clip. clip's answers are untrusted input: one deadline
for the whole exchange, a size cap after decompression, no redirects, and only the contract's shapes go
on (rebuilt field by field); anything else is 502 `clip_bad_answer`. Errors are always JSON."""

import json
import logging
import math
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

import requests
import urllib3

from . import config, deadline, metrics

INFO_TTL_S = 30.0
INFO_RETRY_S = 5.0  # while clip cannot be asked, pages use a fallback instead of waiting each time
CHUNK_BYTES = 64 * 1024  # urllib3 (>= 2.6) decompresses at most this much per read: a gzip bomb stays a stream
MAX_TEXT_CHARS = 1000  # a model, label-set or label name
MAX_MESSAGE_CHARS = 2000  # an error message passed on
ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
RETRY_AFTER = re.compile(r"[0-9]{1,6}")

LOG = logging.getLogger("index.clip")
Answer = tuple[int, dict, dict]  # (status, JSON body, headers to pass on)
_session = deadline.session()


class _Timeout(Exception):
    pass


class _ConnectTimeout(Exception):
    pass


class _Unreachable(Exception):
    pass


class BadAnswer(Exception):
    """clip answered, but not with what the contract says: becomes 502 clip_bad_answer."""


def _call(method: str, url: str, seconds: float, **kwargs: Any) -> tuple[int, Mapping[str, str], bytes]:
    """One exchange with clip within `seconds` in all: (status, headers, body after decompression)."""
    with deadline.Exchange(seconds) as exchange:
        timeout = (min(config.CONNECT_TIMEOUT_S, seconds), seconds)  # per step; the exchange's deadline bounds the sum
        try:
            response = _session.request(method, url, stream=True, allow_redirects=False, timeout=timeout, **kwargs)
        except requests.ConnectTimeout:
            raise _Timeout() if exchange.expired else _ConnectTimeout() from None
        except requests.RequestException:
            raise _Timeout() if exchange.expired else _Unreachable() from None
        with response:
            if 300 <= response.status_code < 400:
                raise BadAnswer(f"a redirect (HTTP {response.status_code}), which index does not follow")
            body = _read(response, exchange)
        return response.status_code, response.headers, body


def _read(response: requests.Response, exchange: deadline.Exchange) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > config.MAX_ANSWER_BYTES and "Content-Encoding" not in response.headers:
        raise BadAnswer(f"an answer of {declared} bytes (the limit is {config.MAX_ANSWER_BYTES})")
    body = bytearray()
    try:
        for chunk in response.raw.stream(CHUNK_BYTES, decode_content=True):
            body += chunk
            if len(body) > config.MAX_ANSWER_BYTES:
                raise BadAnswer(f"an answer over {config.MAX_ANSWER_BYTES} bytes")
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if exchange.expired or isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            raise _Timeout() from None
        if isinstance(exc, urllib3.exceptions.DecodeError):
            raise BadAnswer("an answer that could not be decompressed") from None
        raise BadAnswer("an answer that broke off") from None
    if exchange.expired:  # an answer without a length ends at the shutdown as if complete
        raise _Timeout()
    return bytes(body)


def _parse(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity, no nesting deeper than the parser's recursion limit."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BadAnswer("an answer that is not JSON") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# ---- the shapes of the contract ---------------------------------------------------------------------


def _text(value: Any, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise BadAnswer(f"{what} that is not a short text")
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadAnswer(f"{what} that is not true or false")
    return value


def _number(value: Any, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadAnswer(f"{what} that is not a number from {low:g} to {high:g}")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadAnswer(f"{what} that is not a whole number of 1 or more")
    return value


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadAnswer(f"{what} that is not an object")
    return value


def _source(about: Any) -> str | None:
    """Where clip says a label set comes from ("built-in", or its file), if it says so in a short text."""
    source = about.get("source") if isinstance(about, dict) else None
    return source if isinstance(source, str) and len(source) <= MAX_TEXT_CHARS else None


def _preparing(about: Any) -> int | None:
    """The percentage of a label set clip says it is preparing (not ready, progress 0..1), if it says so."""
    if not isinstance(about, dict) or about.get("ready") is not False:
        return None
    progress = about.get("progress")
    if isinstance(progress, bool) or not isinstance(progress, int | float) or not 0 <= progress <= 1:
        return None
    return int(progress * 100)


def _list(value: Any, what: str) -> list:
    if not isinstance(value, list):
        raise BadAnswer(f"{what} that is not a list")
    return value


def _predictions(value: Any) -> list[dict]:
    rows = [_object(row, "a prediction") for row in _list(value, "predictions")]
    return [
        {"label": _text(row.get("label"), "a label"), "score": _number(row.get("score"), "a score", 0, 1)}
        for row in rows
    ]


def _error(value: Any) -> dict:
    error = _object(value, "an error")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not ERROR_CODE.fullmatch(code):
        raise BadAnswer("an error code that is not a code")
    return {"code": code, "message": _text(message, "an error message", 1 << 20)[:MAX_MESSAGE_CHARS]}


def _result(value: Any) -> dict:
    result = _object(value, "a result")
    if "error" in result:
        return {"error": _error(result["error"])}
    return {"predictions": _predictions(result.get("predictions"))}


def shape_answer(status: int, doc: Any) -> dict:
    """clip's answer to a classification, rebuilt from the fields of the contract, each checked (unknown
    fields are dropped, so nothing deep or odd reaches the page or the JSON we send); BadAnswer otherwise."""
    doc = _object(doc, "an answer")
    answer: dict[str, Any] = {}
    for key in ("model", "pretrained", "label_set"):
        if key in doc:
            answer[key] = _text(doc[key], key)
    if "untrained" in doc:
        answer["untrained"] = _flag(doc["untrained"], "untrained")
    if "warning" in doc:  # clip's sentence on random weights
        answer["warning"] = _text(doc["warning"], "a warning")
    if "elapsed_ms" in doc:
        answer["elapsed_ms"] = _number(doc["elapsed_ms"], "elapsed_ms", 0)
    if status == 200:
        if "predictions" in doc:
            answer["predictions"] = _predictions(doc["predictions"])
        else:
            answer["results"] = [_result(result) for result in _list(doc.get("results"), "results")]
    elif 400 <= status <= 599:
        answer["error"] = _error(doc.get("error"))
    else:
        raise BadAnswer(f"HTTP {status}")
    return answer


def shape_description(doc: Any) -> tuple[dict | None, str | None]:
    """clip's self-description, rebuilt: (what the page uses of it, or, while clip is not ready, what it
    says of its start: {"starting": True, model and weights once it knows them}; why clip cannot start,
    if it says). BadAnswer for anything else."""
    doc = _object(doc, "a description")
    if doc.get("ready") is not True:
        problem = doc.get("error")
        starting: dict[str, Any] = {"starting": True}
        if isinstance(doc.get("model"), str) and isinstance(doc.get("pretrained"), str):
            starting["model"] = _text(doc["model"], "model")
            starting["pretrained"] = _text(doc["pretrained"], "pretrained")
            starting["untrained"] = starting["pretrained"] == "none"  # clip shows random weights as "none"
        return starting, problem[:500] if isinstance(problem, str) else None
    limits = _object(doc.get("limits"), "limits")
    sets = _object(doc.get("label_sets"), "label_sets")
    return {
        "model": _text(doc.get("model"), "model"),
        "pretrained": _text(doc.get("pretrained"), "pretrained"),
        "untrained": _flag(doc.get("untrained"), "untrained"),
        "label_sets": [_text(name, "a label-set name") for name in sets],
        # an operator's own sets (clip's label-set files): a source that is not "built-in"
        "file_sets": [name for name, about in sets.items() if _source(about) not in (None, "built-in")],
        # sets clip is building now: name -> percent done (the page says "being prepared, N %")
        "preparing": {name: done for name, about in sets.items() if (done := _preparing(about)) is not None},
        "default_label_set": _text(doc.get("default_label_set"), "default_label_set"),
        "limits": {
            "max_images": _count(limits.get("max_images"), "max_images"),
            "max_body_bytes": _count(limits.get("max_body_bytes"), "max_body_bytes"),
        },
        **({"default_top_k": _count(doc["default_top_k"], "default_top_k")} if "default_top_k" in doc else {}),
        "url_input": _flag(doc.get("url_input", False), "url_input"),
    }, None


# ---- classification ---------------------------------------------------------------------------------


def _failure(status: int, code: str, message: str, retry_after: int | None = None) -> Answer:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    return status, {"error": {"code": code, "message": message}}, headers


def _bad_answer(reason: str) -> Answer:
    LOG.warning("clip sent %s", reason)
    metrics.upstream_failed("bad_answer")
    return _failure(502, "clip_bad_answer", f"The classifier sent {reason}.")


def classify(body: bytes, content_type: str, query_string: str, request_id: str) -> Answer:
    """Forward a classification request as it came. Returns (status, json_body, headers)."""
    url = config.CLIP_URL + (f"?{query_string}" if query_string else "")
    headers = {
        "Content-Type": content_type or "application/octet-stream",
        "Accept": "application/json",
        "X-Request-Id": request_id,
    }
    started = time.perf_counter()
    try:
        status, answer_headers, raw = _call("POST", url, config.TIMEOUT_S, data=body, headers=headers)
    except _ConnectTimeout:
        metrics.upstream(started, "timeout")
        return _failure(
            503,
            "clip_unavailable",
            "The classifier did not accept the connection in time; it may be starting. Please try again.",
            retry_after=5,
        )
    except _Timeout:
        metrics.upstream(started, "timeout")
        return _failure(504, "clip_timeout", f"The classifier did not answer within {config.TIMEOUT_S:g} s.")
    except _Unreachable:
        metrics.upstream(started, "refused")
        return _failure(
            502, "clip_unreachable", "The classifier could not be reached. Please try again shortly.", retry_after=5
        )
    except BadAnswer as bad:
        metrics.upstream(started)
        return _bad_answer(str(bad))
    metrics.upstream(started, "5xx" if status >= 500 else None)
    try:
        answer = shape_answer(status, _parse(raw))
    except BadAnswer as bad:
        if status == 504:  # a gateway or watchdog that gave up waiting for clip: one status per code
            return _failure(504, "clip_timeout", "The classifier did not answer in time. Please try again.")
        if status in (502, 503, 429):  # a gateway or watchdog answering for clip (scaling, crashed)
            return _failure(
                503,
                "clip_unavailable",
                "The classifier is not available right now (it may be scaling up). Please try again.",
                retry_after=5,
            )
        return _bad_answer(f"{bad} (HTTP {status})")
    retry_after = answer_headers.get("Retry-After", "")
    return status, answer, {"Retry-After": retry_after} if RETRY_AFTER.fullmatch(retry_after) else {}


# ---- clip's description: cached, refreshed by one fetch for everyone --------------------------------


class _Described:
    def __init__(self) -> None:
        self.value: dict[str, Any] | None = None
        self.starting: dict[str, Any] | None = None  # clip answered: still loading (model, weights if known)
        self.problem: str | None = None
        self.at = -math.inf  # when the last fetch ended (monotonic)
        self.fetching = False
        self.changed = threading.Condition()


_described = _Described()


def info() -> dict[str, Any] | None:
    """clip's self-description (model, untrained flag, label sets, limits), or None. Never waits on clip
    longer than INDEX_DESCRIBE_WAIT_S: a stale description is used while one fetch in the background refreshes
    it for every page; without any, a page waits that long for the fetch, then renders without."""
    state = _described
    with state.changed:
        age = time.monotonic() - state.at
        if not state.fetching and age >= (INFO_TTL_S if state.value is not None else INFO_RETRY_S):
            state.fetching = True
            threading.Thread(target=_fetch_description, name="clip-describe", daemon=True).start()
        if state.value is None and state.fetching:
            state.changed.wait_for(lambda: not state.fetching, config.DESCRIBE_WAIT_S)
        return state.value


def _fetch_description() -> None:
    value, starting, problem = None, None, None
    try:
        status, _, raw = _call(
            "GET", config.CLIP_URL, config.DESCRIBE_TIMEOUT_S, headers={"Accept": "application/json"}
        )
        if status == 200:  # anything else is a gateway answering for clip (not deployed, scaling)
            value, problem = shape_description(_parse(raw))
            if value is not None and value.get("starting"):
                value, starting = None, value
    except BadAnswer as bad:
        LOG.warning("clip's description: clip sent %s", bad)
    except (_Timeout, _ConnectTimeout, _Unreachable):
        pass  # clip down or slow: the page says nothing of it until it answers
    except Exception:  # never leave `fetching` set: pages would fall back forever
        LOG.exception("clip's description could not be read")
    finally:
        state = _described
        with state.changed:
            state.value, state.starting, state.problem = value, starting, problem
            state.at, state.fetching = time.monotonic(), False
            state.changed.notify_all()


def last_info() -> dict[str, Any] | None:
    """clip's self-description as last fetched, or None: never waits, never fetches."""
    return _described.value


def starting() -> dict[str, Any] | None:
    """What clip said of its start while it loads (as of the last description), or None."""
    return _described.starting


def problem() -> str | None:
    """Why clip says it cannot start (as of the last description), or None."""
    return _described.problem
