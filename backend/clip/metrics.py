"""What the clip function says about itself: Prometheus metrics (GET /metrics) and one log line per request.

The handler stays pure: handle() routes /metrics to exposition() and wraps each request in observe();
the service reports through small hooks (note_images, rode, on_batch, fetch and label-cache counts).

With PROMETHEUS_MULTIPROC_DIR set (the template host sets it when it runs several worker processes),
every worker writes its samples to that directory and a scrape, whichever worker answers it, reads them
all: the figures are the function's, not one worker's. Gauges say how workers combine (multiprocess_mode),
and a sampler thread keeps each worker's gauges current, since a scrape cannot call into other workers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

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

if TYPE_CHECKING:
    from .service import Service

P = ParamSpec("P")
R = TypeVar("R")

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

FUNCTION = "clip"
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
SAMPLE_INTERVAL_S = 2.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOG = logging.getLogger("clip.metrics")

# Label values that come from a request take values from closed sets only: each new value is a series
# kept for good, so a client that made up methods (or codes) would grow every scrape and the memory.
METHODS = ("GET", "HEAD", "POST")  # any other method is counted as "other"
# the error catalogue (docs/api.md): every code clip answers; any other is counted as "other"
ERROR_CODES = frozenset(
    {
        "deadline_exceeded",
        "image_too_complex",
        "image_too_large",
        "internal_error",
        "invalid_form",
        "invalid_image",
        "invalid_json",
        "invalid_labels",
        "invalid_option",
        "label_set_warming",
        "loading",
        "method_not_allowed",
        "missing_image",
        "model_unavailable",
        "queue_full",
        "too_many_images",
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
_local = threading.local()
_batch_lock = threading.Lock()
_batch_seq = [0]


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


# ---- the service's hooks -------------------------------------------------------------------------


def watch(service: Service) -> None:
    """Gauges that read the warm service: queue, admission, label sets, model."""
    info = service.model.describe()
    MODEL.labels(info["model"], info["pretrained"], info["device"], info["dtype"], str(info["untrained"]).lower()).set(
        1
    )
    service.batcher.on_batch = on_batch

    from .labels import LABEL_SETS  # torch is loaded by now; importing it earlier would slow start-up

    def sample() -> None:
        ADMITTED.set(service.batcher.admitted)
        QUEUED.set(service.batcher.depth)
        for name in LABEL_SETS:
            LABEL_SET_READY.labels(name).set(1 if service.labels.ready(name) else 0)

    _samplers.append(sample)
    refresh()


def on_batch(futures: list[Future[Any]], started: float, encode_s: float) -> None:
    """Called by the batcher's thread after each forward pass, before the results are handed out."""
    try:
        with _batch_lock:
            _batch_seq[0] += 1
            batch = (_batch_seq[0], len(futures))
        BATCH_SIZE.observe(len(futures))
        ENCODE.observe(encode_s)
        for future in futures:
            future.batch = batch  # type: ignore[attr-defined]
            QUEUE_WAIT.observe(max(0.0, started - getattr(future, "queued_at", started)))
    except Exception:  # never take the model thread down
        LOG.exception("batch metrics failed")


def note_images(count: int) -> None:
    record = getattr(_local, "record", None)
    if record is not None:
        record["images"] = count


def rode(future: Future[Any]) -> None:
    """The request on this thread got a row from `future`: remember which batch carried it."""
    record = getattr(_local, "record", None)
    batch = getattr(future, "batch", None)
    if record is not None and batch is not None and batch not in record["batches"]:
        record["batches"].append(batch)


def label_lookups(hits: int, misses: int, shared: int) -> None:
    for result, count in (("hit", hits), ("miss", misses), ("shared", shared)):
        if count:
            LABEL_CACHE.labels(result).inc(count)


def counts_fetches(fetch: Callable[P, R]) -> Callable[P, R]:
    """Decorates url_input.fetch: every URL input counted by outcome."""

    @functools.wraps(fetch)
    def counted(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            data = fetch(*args, **kwargs)
        except Exception as error:
            URL_FETCHES.labels(code_label(getattr(error, "code", "error"))).inc()
            raise
        URL_FETCHES.labels("ok").inc()
        return data

    return counted


# ---- per request: counters and the log line ------------------------------------------------------


def observe(event: Any, request_id: str, answer: Callable[[], dict]) -> dict:
    """Run answer() (the handler's work) for one request; count it and log one line about it."""
    started = time.perf_counter()
    _ensure_sampler()
    record: dict = {"images": None, "batches": []}
    _local.record = record
    result: dict = {"statusCode": 500, "body": {"error": {"code": "internal_error"}}}
    try:
        result = answer()
        return result
    finally:
        _local.record = None
        elapsed = time.perf_counter() - started
        status = int(result.get("statusCode", 200))
        body = result.get("body")
        error = body.get("error") if isinstance(body, dict) else None
        code = error.get("code", "") if isinstance(error, dict) else ""
        classified = _predictions(body)
        images = record["images"] if record["images"] is not None else classified
        REQUESTS.labels(method_label(event.method), str(status), code_label(code)).inc()
        if event.method == "POST":
            DURATION.observe(elapsed)
        if classified:
            IMAGES.inc(classified)
        if status == 429 and images:
            SHED.inc(images)
        log_request(
            request_id,
            clipped(event.method),
            status,
            clipped(code),
            images,
            len(event.body or b""),
            elapsed,
            record["batches"],
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
