"""What the clip function says about itself: Prometheus metrics (GET /metrics) and one log line per request.

The handler stays pure: handle() routes /metrics to exposition() and wraps each request in observe().
This module imports nothing of clip's core but its error catalogue: the core returns what it measured
(measured.Measured, the batcher's on_batch callback) and the handler, the edge, records it here.

With PROMETHEUS_MULTIPROC_DIR set (the template host sets it when it runs several worker processes),
every worker writes its samples to that directory and a scrape, whichever worker answers it, reads them
all: the figures are the function's, not one worker's. Gauges say how workers combine (multiprocess_mode),
and a sampler thread keeps each worker's gauges current, since a scrape cannot call into other workers.
"""

import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
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

from .errors import ERROR_CODES

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

FUNCTION = "clip"
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
SAMPLE_INTERVAL_S = 2.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOG = logging.getLogger("clip.metrics")

# Label values that come from a request take values from closed sets only: each new value is a series
# kept for good, so a client that made up methods (or codes) would grow every scrape and the memory.
METHODS = ("GET", "HEAD", "POST")  # any other method is counted as "other"
REQUEST_ID = re.compile(r"[\w.-]{1,64}", re.ASCII)  # echoed in a header: ASCII only, fullmatch
LOGGED_CHARS = 32  # a request's own field (its method) in the log line, at most

REQUESTS = Counter(
    "clip_requests_total",
    "Requests answered, by method (GET, HEAD, POST or other), HTTP status and error code (code is empty on "
    "success; other for a code outside the catalogue)",
    ["method", "status", "code"],
)
DURATION = Histogram(
    "clip_request_duration_seconds",
    "Time inside the function per POST (classification) request, any status",
    buckets=LATENCY_BUCKETS,
)
IMAGES = Counter("clip_images_classified_total", "Images answered with predictions")
SHED = Counter(
    "clip_shed_images_total",
    "Images refused with 429: the admission limit (CLIP_MAX_QUEUE) was reached (a request refused before its body "
    "was parsed, the function already full, is counted in clip_requests_total only: its images are unknown)",
)
BATCH_SIZE = Histogram("clip_batch_size", "Images per forward pass", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
QUEUE_WAIT = Histogram(
    "clip_queue_wait_seconds",
    "Per image: from its submission to the start of the forward pass it rode in",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ENCODE = Histogram("clip_encode_seconds", "Duration of one forward pass (one batch)", buckets=LATENCY_BUCKETS)
ADMITTED = Gauge(
    "clip_images_admitted", "Images admitted now (decoding, queued or being encoded)", multiprocess_mode="livesum"
)
QUEUED = Gauge("clip_images_queued", "Images waiting for a forward pass", multiprocess_mode="livesum")
LABEL_SET_READY = Gauge(
    "clip_label_set_ready",
    "1 when the label set's embeddings are loaded (in every worker)",
    ["label_set"],
    multiprocess_mode="livemin",
)
LABEL_CACHE = Counter(
    "clip_custom_label_lookups_total",
    "Custom labels looked up in the embedding cache: hit, "
    "miss (encoded now) or shared (being encoded for another request)",
    ["result"],
)
URL_FETCHES = Counter("clip_url_fetches_total", "URL inputs fetched, by outcome (ok or the error code)", ["outcome"])
MODEL = Gauge(
    "clip_model_info",
    "The model served (always 1; the labels carry the facts)",
    ["model", "pretrained", "device", "dtype", "untrained"],
    multiprocess_mode="livemax",
)

_samplers: list = []  # callables that set gauges from live state
_refresh_lock = threading.Lock()
_sampler_pid: list[int | None] = [None]


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


def refresh() -> None:
    with _refresh_lock:
        for sampler in list(_samplers):
            try:
                sampler()
            except Exception:  # a figure missing from one scrape is better than a failed scrape
                LOG.debug("sampler failed", exc_info=True)


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


if MULTIPROCESS_DIR:
    _process_figures()
    _ensure_sampler()


def worker_exiting() -> None:
    """A worker's live gauges leave the function's sums when it exits (called on the host's drain)."""
    if MULTIPROCESS_DIR:
        multiprocess.mark_process_dead(os.getpid())


def forget_dead_workers() -> None:
    """A worker that crashed never ran worker_exiting(): its live gauges (queue, admitted images, memory)
    would stay in the function's sums for good. Any process whose files are here but that no longer
    exists is marked dead."""
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


# ---- what the core measured, recorded here by the edge ---------------------------------------------


def add_sampler(sample: Callable[[], None]) -> None:
    """sample() sets gauges from live state: before each scrape, and every few seconds per worker."""
    _samplers.append(sample)
    refresh()


def model_info(info: Mapping[str, Any]) -> None:
    MODEL.labels(info["model"], info["pretrained"], info["device"], info["dtype"], str(info["untrained"]).lower()).set(
        1
    )


def live(admitted: int, queued: int, label_sets_ready: Mapping[str, bool]) -> None:
    ADMITTED.set(admitted)
    QUEUED.set(queued)
    for name, ready in label_sets_ready.items():
        LABEL_SET_READY.labels(name).set(1 if ready else 0)


def batch_done(size: int, waits_s: Iterable[float], encode_s: float) -> None:
    """The batcher's on_batch: one forward pass of `size` images, each having waited waits_s."""
    BATCH_SIZE.observe(size)
    ENCODE.observe(encode_s)
    for waited in waits_s:
        QUEUE_WAIT.observe(max(0.0, waited))


def work_done(label_lookups: Mapping[str, int], fetches: Iterable[str]) -> None:
    """One request's custom-label lookups ({hit, miss, shared}: counts) and URL fetch outcomes."""
    for result, count in label_lookups.items():
        if count:
            LABEL_CACHE.labels(result).inc(count)
    for outcome in fetches:
        URL_FETCHES.labels("ok" if outcome == "ok" else code_label(outcome)).inc()


def answered(status: int, body: object, images: int | None) -> None:
    """Images classified by an answer, and images shed by a 429 (when the request's count is known)."""
    classified = _predictions(body)
    if classified:
        IMAGES.inc(classified)
    if status == 429 and images:
        SHED.inc(images)


class Note:
    """The request's id and what the handler notes of it for the log line: note(images=…, batches=…)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.fields: dict[str, Any] = {}

    def note(self, **fields: Any) -> None:
        self.fields.update(fields)


# ---- per request: counters and the log line ------------------------------------------------------


def observe(event: Any, answer: Callable[[Note], dict]) -> dict:
    """Run answer(note) (the handler's work) for one request; count it and log one line about it."""
    started = time.perf_counter()
    _ensure_sampler()
    request_id = event.headers.get("X-Request-Id", "")
    note = Note(request_id if REQUEST_ID.fullmatch(request_id) else uuid.uuid4().hex)
    result: dict = {"statusCode": 500, "body": {"error": {"code": "internal_error"}}}
    try:
        result = answer(note)
        return result
    finally:
        elapsed = time.perf_counter() - started
        status = int(result.get("statusCode", 200))
        body = result.get("body")
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code", "") if isinstance(error, dict) else ""
        images = note.fields.get("images")
        REQUESTS.labels(method_label(event.method), str(status), code_label(code)).inc()
        if event.method == "POST":
            DURATION.observe(elapsed)
        log_request(
            note.request_id,
            clipped(event.method),
            status,
            clipped(code),
            images if images is not None else _predictions(body),
            len(event.body or b""),
            elapsed,
            note.fields.get("batches", []),
        )


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def code_label(code: object) -> str:
    """An error code as a label value: empty (success), one of the catalogue's, or "other"."""
    if not code:
        return ""
    return code if isinstance(code, str) and code in ERROR_CODES else "other"


def clipped(value: object, limit: int = LOGGED_CHARS) -> str:
    """A request's field as the log line shows it: printable ASCII without spaces, at most `limit` characters
    (a longer one ends in "...")."""
    text = "".join(c if c.isascii() and c.isprintable() and not c.isspace() else "?" for c in str(value)[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _predictions(body: object) -> int:
    if not isinstance(body, dict):
        return 0
    if "predictions" in body:
        return 1
    results = body.get("results")
    return sum(1 for r in results if isinstance(r, dict) and "predictions" in r) if isinstance(results, list) else 0


ACCESS = logging.getLogger("clip.access")  # its own handler: the line is the whole record, JSON or text
ACCESS.propagate = False
_access_handler = logging.StreamHandler(sys.stderr)
ACCESS.addHandler(_access_handler)  # at INFO: LOG_LEVEL=WARNING (the host's) silences it
JSON_LOGS = os.environ.get("LOG_FORMAT", "text").strip().lower() == "json"
_access_handler.setFormatter(logging.Formatter("%(message)s" if JSON_LOGS else "%(asctime)s %(message)s"))


def log_request(
    request_id: str,
    method: str,
    status: int,
    code: str,
    images: int | None,
    bytes_in: int,
    elapsed_s: float,
    batches: list[tuple[int, int]],
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
        "batches": [{"id": seq, "size": size} for seq, size in batches],
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
    fields["batches"] = ",".join(f"{seq}x{size}" for seq, size in batches) or None
    fields = {key: "-" if value is None else value for key, value in fields.items()}
    ACCESS.info("request " + " ".join(f"{key}={value}" for key, value in fields.items()))
