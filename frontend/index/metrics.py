"""What the index function says about itself: Prometheus metrics (GET /metrics) and one log line per request.

The handler stays pure: handle() routes /metrics to exposition() and wraps each request in observe();
clip_client reports each hop to clip through upstream().

With PROMETHEUS_MULTIPROC_DIR set (the template host sets it when it runs several worker processes),
every worker writes its samples to that directory and a scrape, whichever worker answers it, reads them
all: the figures are the function's, not one worker's.
"""

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import choose_encoder

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

FUNCTION = "index"
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
SAMPLE_INTERVAL_S = 2.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Label values that come from a request, or from clip's answer, take values from closed sets only: each
# new value is a series kept for good, so made-up methods or codes would grow every scrape and the memory.
METHODS = ("GET", "HEAD", "POST")  # any other method is counted as "other"
# the error catalogue (docs/api.md): index's own codes and clip's, which index passes on; any other
# code (a clip that is not ours, or a newer one) is counted as "other"
ERROR_CODES = frozenset(
    {
        # index's own
        "clip_bad_answer",
        "clip_timeout",
        "clip_unavailable",
        "clip_unreachable",
        "field_too_large",
        "internal_error",
        "invalid_form",
        "method_not_allowed",
        "too_many_images",
        # clip's
        "deadline_exceeded",
        "image_too_complex",
        "image_too_large",
        "invalid_image",
        "invalid_json",
        "invalid_labels",
        "invalid_option",
        "label_set_warming",
        "loading",
        "missing_image",
        "model_unavailable",
        "queue_full",
        "too_many_labels",
        "too_many_parts",
        "unknown_label_set",
        "url_disabled",
        "url_refused",
        "url_timeout",
        "url_too_large",
        "url_unreachable",
    }
)
LOGGED_CHARS = 32  # a request's own field (its method) or clip's error code in the log line, at most

REQUESTS = Counter(
    "index_requests_total",
    "Requests answered, by method (GET, HEAD, POST or other), HTTP status and error code (code is empty on "
    "success; other for a code outside the catalogue)",
    ["method", "status", "code"],
)
DURATION = Histogram(
    "index_request_duration_seconds", "Time inside the function per POST request, any status", buckets=LATENCY_BUCKETS
)
UPSTREAM = Histogram(
    "index_upstream_duration_seconds",
    "Duration of each classification call to clip, any outcome",
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_FAILURES = Counter(
    "index_upstream_failures_total",
    "Calls to clip that failed, by kind: refused (no connection), timeout, 5xx, bad_answer (not JSON)",
    ["kind"],
)
FAILURE_KINDS = ("refused", "timeout", "5xx", "bad_answer")

_samplers: list = []  # callables that set gauges from live state
_refresh_lock = threading.Lock()
_sampler_pid: list[int | None] = [None]
_local = threading.local()


def upstream(started: float, failure: str | None = None) -> None:
    """clip_client's report of one call to clip: when it started (perf_counter) and how it failed, if it did."""
    UPSTREAM.observe(time.perf_counter() - started)
    if failure:
        upstream_failed(failure)


def upstream_failed(kind: str) -> None:
    UPSTREAM_FAILURES.labels(kind).inc()


for _kind in FAILURE_KINDS:  # every kind exported from the start, at 0: rate() and alerts need the series
    UPSTREAM_FAILURES.labels(_kind)


# ---- exposition ------------------------------------------------------------------------------------


def exposition(event: Any) -> dict:
    """The answer to GET /metrics: every metric, in the format the scraper asked for."""
    _ensure_sampler()
    refresh()
    registry = REGISTRY
    if MULTIPROCESS_DIR:
        forget_dead_workers()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    encoder, content_type = choose_encoder(event.headers.get("Accept", ""))
    return {
        "statusCode": 200,
        "body": encoder(registry),
        "headers": {"Content-Type": content_type, "Cache-Control": "no-store"},
    }


def _process_figures() -> None:
    """Multiprocess mode has no process collector: each worker reports its own memory and CPU."""
    memory = Gauge(
        "process_resident_memory_bytes",
        "Resident memory of the function's live workers, summed",
        registry=None,
        multiprocess_mode="livesum",
    )
    cpu = Counter("process_cpu_seconds_total", "CPU time of the function's workers, summed", registry=None)
    page = os.sysconf("SC_PAGE_SIZE")
    spent = {"pid": 0, "cpu": 0.0}  # pid 0: no process of ours

    def sample() -> None:
        with open("/proc/self/statm") as f:
            memory.set(int(f.read().split()[1]) * page)
        if spent["pid"] != os.getpid():  # a forked worker's CPU times start at 0
            spent.update(pid=os.getpid(), cpu=0.0)
        now = sum(os.times()[:2])
        cpu.inc(max(0.0, now - spent["cpu"]))
        spent["cpu"] = now

    _samplers.append(sample)


def refresh() -> None:
    with _refresh_lock:
        for sampler in _samplers:
            sampler()


def _ensure_sampler() -> None:
    """In multiprocess mode, one sampler thread per worker process (a worker forked from a parent that
    imported this module inherits no threads)."""
    if MULTIPROCESS_DIR and _sampler_pid[0] != os.getpid():
        _sampler_pid[0] = os.getpid()
        threading.Thread(target=_sample_forever, name="metrics-sampler", daemon=True).start()


def _sample_forever() -> None:
    while True:
        refresh()
        time.sleep(SAMPLE_INTERVAL_S)


if MULTIPROCESS_DIR:
    _process_figures()
    _ensure_sampler()


def worker_exiting() -> None:
    """A worker's live gauges leave the function's sums when it exits (called on the host's drain)."""
    if MULTIPROCESS_DIR:
        multiprocess.mark_process_dead(os.getpid())


def forget_dead_workers() -> None:
    """A worker that crashed never ran worker_exiting(): its live gauges (memory) would stay in the
    function's sums for good. Any process whose files are here but that no longer exists is marked dead."""
    pids = {
        int(m.group(1))
        for name in os.listdir(MULTIPROCESS_DIR)
        if (m := re.fullmatch(r"gauge_live\w+_(\d+)\.db", name))
    }
    for pid in pids - {os.getpid()}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid)
        except PermissionError:  # alive, someone else's
            pass


# ---- per request: counters and the log line ------------------------------------------------------


def observe(event: Any, request_id: str, answer: Callable[[], dict]) -> dict:
    """Run answer() (the handler's work) for one request; count it and log one line about it. The
    answer carries the request id in X-Request-Id, the one clip got and logged too."""
    started = time.perf_counter()
    _ensure_sampler()
    _local.answer = None
    result: dict = {"statusCode": 500, "body": {"error": {"code": "internal_error"}}}
    try:
        result = answer()
        result.setdefault("headers", {}).setdefault("X-Request-Id", request_id)
        return result
    finally:
        elapsed = time.perf_counter() - started
        status = int(result.get("statusCode", 200))
        body = _local.answer if _local.answer is not None else result.get("body")
        _local.answer = None
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code", "") if isinstance(error, dict) else ""
        REQUESTS.labels(method_label(event.method), str(status), code_label(code)).inc()
        if event.method == "POST":
            DURATION.observe(elapsed)
        log_request(
            request_id, clipped(event.method), status, clipped(code), _images(body), len(event.body or b""), elapsed
        )


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def code_label(code: object) -> str:
    """An error code as a label value: empty (success), one of the catalogue's, or "other"."""
    if not code:
        return ""
    return code if isinstance(code, str) and code in ERROR_CODES else "other"


def clipped(value: object, limit: int = LOGGED_CHARS) -> str:
    """A field as the log line shows it: printable ASCII without spaces, at most `limit` characters (a
    longer one ends in "...")."""
    text = "".join(c if c.isascii() and c.isprintable() and not c.isspace() else "?" for c in str(value)[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def note_answer(answer: dict) -> None:
    """The JSON answer behind this request's page (a form post renders it as HTML): its code and images."""
    _local.answer = answer


def _images(body: object) -> int | None:
    if not isinstance(body, dict):
        return None
    if "predictions" in body:
        return 1
    results = body.get("results")
    return len(results) if isinstance(results, list) else None


ACCESS = logging.getLogger("index.access")  # its own handler: the line is the whole record, JSON or text
ACCESS.propagate = False
_access_handler = logging.StreamHandler(sys.stderr)
ACCESS.addHandler(_access_handler)  # at INFO: LOG_LEVEL=WARNING (the host's) silences it
JSON_LOGS = os.environ.get("LOG_FORMAT", "text").strip().lower() == "json"
_access_handler.setFormatter(logging.Formatter("%(message)s" if JSON_LOGS else "%(asctime)s %(message)s"))


def log_request(
    request_id: str, method: str, status: int, code: str | None, images: int | None, bytes_in: int, elapsed_s: float
) -> None:
    """One line per request. Never image bytes, labels or URLs: only sizes, counts and codes."""
    fields = {
        "request_id": request_id,
        "function": FUNCTION,
        "method": method,
        "status": status,
        "code": code or None,
        "images": images,
        "bytes_in": bytes_in,
        "ms": round(elapsed_s * 1000, 1),
        "batches": None,
        "pid": os.getpid(),
    }
    if JSON_LOGS:
        fields = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "level": "info",
            "msg": "request",
            **fields,
        }
        ACCESS.info(json.dumps(fields, separators=(",", ":")))
        return
    ACCESS.info("request " + " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items()))
