"""Per-request observability, written once for every function the host serves: request ids, the request
counter and durations, the access log, and GET /metrics across worker processes.

The function's handler module says who it is and adds its own figures (all optional):
- NAME: the metrics' prefix (`<NAME>_requests_total`, `<NAME>_request_duration_seconds`), the access
  log's `function=` field and its logger (`<NAME>.access`); "function" when not given.
- ERROR_CODES: every error code it answers. Label values come from closed sets only (a new value is a
  series kept for good): a code outside ERROR_CODES and HOST_ERRORS is counted as "other", a method
  other than GET, HEAD or POST as "other".
- sample(): sets its gauges from live state; called before each scrape and, with several workers
  (PROMETHEUS_MULTIPROC_DIR), every 2 s in each worker, since a scrape cannot call into the others.
- its own metrics: plain prometheus_client objects in the default registry (gauges with a
  multiprocess_mode), exposed with the host's.

Per request the handler gets context.request_id and context.note(images=, batches=, code=), which add
to the request's access-log line. Never image bytes, labels or URLs in that line: sizes, counts, codes.
"""

import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import Any

import settings
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.exposition import choose_encoder

_disable_created_metrics()  # the *_created series double the output and no dashboard reads them

# The host's own error codes: code -> (HTTP status, one-line meaning), the shape of a function's catalogue.
HOST_ERRORS: dict[str, tuple[int, str]] = {
    "body_too_large": (413, "The request body is larger than the function takes (MAX_BODY_BYTES)."),
    "headers_too_large": (431, "The request's headers are larger than the function takes."),
    "bad_request": (400, "The request is not valid HTTP (its start line, headers, length or chunking)."),
    "internal_error": (500, "The function failed unexpectedly (a bug, logged; never bad input)."),
}
DEFAULT_NAME = "function"
METHODS = ("GET", "HEAD", "POST")  # any other method is counted as "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SAMPLE_INTERVAL_S = 2.0
LOGGED_CHARS = 32  # a request's own field (its method) or an error code in the log line, at most
# a caller's X-Request-Id is kept when it is this (it is echoed in a header and logged); else a new one
REQUEST_ID = re.compile(r"[\w.-]{1,64}", re.ASCII)
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
LOG = logging.getLogger("host.observe")


def request_id(given: str | None) -> str:
    """The caller's X-Request-Id if it is a plain token ([\\w.-]{1,64}, ASCII), else a new uuid4 hex."""
    return given if given and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def method_label(method: object) -> str:
    return method if isinstance(method, str) and method in METHODS else "other"


def clipped(value: object, limit: int = LOGGED_CHARS) -> str:
    """A field as the log line shows it: printable ASCII without spaces, at most `limit` characters (a
    longer one ends in "...")."""
    text = "".join(c if c.isascii() and c.isprintable() and not c.isspace() else "?" for c in str(value)[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_code(body: object) -> str:
    """The code of a JSON error answer ({"error": {"code": ...}}), "" for anything else."""
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else ""


class Record:
    """One request as its access-log line tells it; the handler adds to it through context.note()."""

    NOTES = ("images", "batches", "code")

    def __init__(self, method: str, request_id: str, bytes_in: int) -> None:
        self.method, self.request_id, self.bytes_in = method, request_id, bytes_in
        self.started = time.perf_counter()
        self.images: int | None = None
        self.batches: list[tuple[int, int]] = []
        self.code: str | None = None  # noted: the code of an answer whose body is not a dict

    def note(self, **fields: Any) -> None:
        """images (int) and code (str) are set; batches ((seq, size) pairs) are added, each once."""
        unknown = set(fields) - set(self.NOTES)
        if unknown:
            raise TypeError(f"note() takes {', '.join(self.NOTES)}, not {', '.join(sorted(unknown))}")
        if "images" in fields:
            self.images = None if fields["images"] is None else int(fields["images"])
        if "code" in fields:
            self.code = None if fields["code"] is None else str(fields["code"])
        for seq, size in fields.get("batches") or ():
            batch = (int(seq), int(size))
            if batch not in self.batches:
                self.batches.append(batch)


class Observer:
    """The host's observability of one function: its counters, its access log, its /metrics."""

    def __init__(self, name: str, error_codes: Collection[str] = (), sample: Callable[[], None] | None = None) -> None:
        self.name = name
        self.codes = frozenset(error_codes) | frozenset(HOST_ERRORS)
        self.samplers: list[Callable[[], None]] = [sample] if sample else []
        self.sample_lock = threading.Lock()
        self.requests = Counter(
            f"{name}_requests_total",
            "Requests answered, by method (GET, HEAD, POST or other), HTTP status and error code (code is empty "
            "on success; other for a code outside the catalogue)",
            ["method", "status", "code"],
        )
        self.duration = Histogram(
            f"{name}_request_duration_seconds",
            "Time inside the function per POST request, any status",
            buckets=LATENCY_BUCKETS,
        )
        self.json_logs = settings.host()["LOG_FORMAT"] == "json"
        self.access = access_logger(f"{name}.access", self.json_logs)
        if MULTIPROCESS_DIR:
            self.samplers.append(process_figures())
            threading.Thread(target=self._sample_forever, name="metrics-sampler", daemon=True).start()

    @classmethod
    def for_handler(cls, handler: Any) -> "Observer":
        return cls(
            getattr(handler, "NAME", DEFAULT_NAME),
            getattr(handler, "ERROR_CODES", ()),
            getattr(handler, "sample", None),
        )

    # ---- per request ----

    def start(self, method: str, given_id: str | None, bytes_in: int) -> Record:
        return Record(method, request_id(given_id), bytes_in)

    def finish(self, record: Record, status: int, body: object, *, timed: bool = True) -> None:
        """Count the request and log its line. The code: the noted one, else the dict body's error.code."""
        code = record.code if record.code is not None else error_code(body)
        elapsed = time.perf_counter() - record.started if timed else 0.0
        self.requests.labels(method_label(record.method), str(status), self.code_label(code)).inc()
        if record.method == "POST" and timed:
            self.duration.observe(elapsed)
        self.log(record, status, code, elapsed)

    def code_label(self, code: str) -> str:
        """An error code as a label value: empty (success), one of the catalogue's, or "other"."""
        if not code:
            return ""
        return code if code in self.codes else "other"

    def log(self, record: Record, status: int, code: str, elapsed_s: float) -> None:
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "function": self.name,
            "method": clipped(record.method),
            "status": status,
            "code": clipped(code) if code else None,
            "images": record.images,
            "bytes_in": record.bytes_in,
            "ms": round(elapsed_s * 1000, 1),
            "batches": [{"id": seq, "size": size} for seq, size in record.batches],
            "pid": os.getpid(),
        }
        if self.json_logs:
            head = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "level": "info", "msg": "request"}
            self.access.info(json.dumps({**head, **fields}, separators=(",", ":")))
            return
        fields["batches"] = ",".join(f"{seq}x{size}" for seq, size in record.batches) or None
        self.access.info("request " + " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items()))

    # ---- GET /metrics ----

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """Every metric (the host's, the function's, the process's), in the format the scraper asked for:
        with several workers, the function's as a whole, whichever worker answers."""
        self.sample()
        registry = REGISTRY
        if MULTIPROCESS_DIR:
            forget_dead_workers()
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    def sample(self) -> None:
        with self.sample_lock:
            for sampler in self.samplers:
                try:
                    sampler()
                except Exception:  # a figure missing from one scrape is better than a failed scrape
                    LOG.debug("a sampler failed", exc_info=True)

    def _sample_forever(self) -> None:
        while True:
            self.sample()
            time.sleep(SAMPLE_INTERVAL_S)


def worker_exiting() -> None:
    """A worker's live gauges leave the function's sums when it exits (the host calls it last on drain)."""
    if MULTIPROCESS_DIR:
        multiprocess.mark_process_dead(os.getpid())


def forget_dead_workers(directory: str = "") -> None:
    """A worker that crashed never ran worker_exiting(): its live gauges (memory, queues) would stay in
    the function's sums for good. Any process whose files are here but that no longer exists is marked dead."""
    directory = directory or MULTIPROCESS_DIR
    pids = {int(m.group(1)) for name in os.listdir(directory) if (m := re.fullmatch(r"gauge_live\w+_(\d+)\.db", name))}
    for pid in pids - {os.getpid()}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:  # alive, someone else's
            pass


def process_figures() -> Callable[[], None]:
    """Multiprocess mode has no process collector: each worker reports its own memory and CPU time."""
    memory = Gauge(
        "process_resident_memory_bytes",
        "Resident memory of the function's live workers, summed",
        registry=None,
        multiprocess_mode="livesum",
    )
    cpu = Counter("process_cpu_seconds_total", "CPU time of the function's workers, summed", registry=None)
    page = os.sysconf("SC_PAGE_SIZE")
    spent = [0.0]

    def sample() -> None:
        with open("/proc/self/statm") as f:
            memory.set(int(f.read().split()[1]) * page)
        now = sum(os.times()[:2])
        cpu.inc(max(0.0, now - spent[0]))
        spent[0] = now

    return sample


def access_logger(name: str, json_lines: bool) -> logging.Logger:
    """Its own handler: the line is the whole record, JSON or text. At INFO: LOG_LEVEL=WARNING silences it."""
    logger = logging.getLogger(name)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s" if json_lines else "%(asctime)s %(message)s"))
        logger.addHandler(handler)
    return logger
