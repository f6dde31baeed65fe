"""The one network hop of the index function: to clip, with a timeout, errors always as JSON."""

import os
import threading
import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from . import metrics

CLIP_URL = os.environ.get("CLIP_URL", "http://gateway.openfaas:8080/function/clip")
CONNECT_TIMEOUT_S = float(os.environ.get("CLIP_CONNECT_TIMEOUT_S", "3"))
TIMEOUT_S = float(os.environ.get("CLIP_TIMEOUT_S", "60"))  # >= clip's own deadline (CLIP_DEADLINE_S)
INFO_TIMEOUT_S = 2.0  # the page must render fast even when clip is cold or down
INFO_TTL_S = 30.0
INFO_RETRY_S = 5.0  # while clip cannot be asked, pages use a fallback instead of waiting each time

_session = requests.Session()
_session.trust_env = False  # a proxy from the environment must not reroute in-cluster traffic
_session.mount("http://", HTTPAdapter(pool_maxsize=32))
_session.mount("https://", HTTPAdapter(pool_maxsize=32))
_info: dict[str, Any] = {"at": 0.0, "value": None}
_info_lock = threading.Lock()


Answer = tuple[int, dict, dict]  # (status, JSON body, headers to pass on)


def _error(status: int, code: str, message: str, retry_after: int | None = None) -> Answer:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    return status, {"error": {"code": code, "message": message}}, headers


def classify(body: bytes, content_type: str, query_string: str, request_id: str) -> Answer:
    """Forward a classification request as it came. Returns (status, json_body, headers)."""
    url = CLIP_URL + (f"?{query_string}" if query_string else "")
    headers = {
        "Content-Type": content_type or "application/octet-stream",
        "Accept": "application/json",
        "X-Request-Id": request_id,
    }
    started = time.perf_counter()
    try:
        response = _session.post(url, data=body, headers=headers, timeout=(CONNECT_TIMEOUT_S, TIMEOUT_S))
    except requests.ConnectTimeout:
        metrics.upstream(started, "timeout")
        return _error(
            503,
            "clip_unavailable",
            "The classifier did not accept the connection in time; it may be starting. Please try again.",
            retry_after=5,
        )
    except requests.Timeout:
        metrics.upstream(started, "timeout")
        return _error(504, "clip_timeout", f"The classifier did not answer within {TIMEOUT_S:g} s.")
    except requests.RequestException:
        metrics.upstream(started, "refused")
        return _error(
            502, "clip_unreachable", "The classifier could not be reached. Please try again shortly.", retry_after=5
        )
    metrics.upstream(started, "5xx" if response.status_code >= 500 else None)
    try:
        answer = response.json()
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError:
        # Not clip's JSON: a gateway or watchdog answering for it (not deployed, scaling, crashed).
        if response.status_code in (502, 503, 504, 429):
            return _error(
                503 if response.status_code != 504 else 504,
                "clip_unavailable",
                "The classifier is not available right now (it may be scaling up). Please try again.",
                retry_after=5,
            )
        metrics.upstream_failed("bad_answer")
        return _error(
            502, "clip_bad_answer", f"The classifier answered HTTP {response.status_code} without a JSON body."
        )
    passed = {k: v for k, v in response.headers.items() if k in ("Retry-After",)}
    return response.status_code, answer, passed


def info() -> dict[str, Any] | None:
    """clip's self-description (model, untrained flag, label sets), cached briefly; None if unreachable."""
    with _info_lock:
        if time.monotonic() - _info["at"] < (INFO_TTL_S if _info["value"] is not None else INFO_RETRY_S):
            return _info["value"]
    try:
        response = _session.get(CLIP_URL, timeout=(min(CONNECT_TIMEOUT_S, INFO_TIMEOUT_S), INFO_TIMEOUT_S))
        doc = response.json()
    except (requests.RequestException, ValueError):
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    value = doc if doc.get("ready") else None
    problem = doc.get("error") if isinstance(doc.get("error"), str) else None  # e.g. weights not found
    with _info_lock:
        _info.update(at=time.monotonic(), value=value, problem=problem and problem[:500])
    return value


def problem() -> str | None:
    """Why clip says it cannot start (as of the last info()), or None."""
    return _info.get("problem")
