"""clip's own metrics, beside the ones the template host keeps for every function (requests by
method/status/code, durations, process figures: observe.py, which also answers GET /metrics with these).

Plain prometheus_client objects in the default registry; gauges say how workers combine when several
run (multiprocess_mode). This module imports nothing of clip's core but its error catalogue: the core
returns what it measured (measured.Measured, the batcher's on_batch callback) and the handler, the edge,
records it with the functions below. Every label value comes from a closed set, never from a request.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from .errors import ERROR_CODES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

IMAGES = Counter("clip_images_classified_total", "Images answered with predictions")
TEXTS = Counter("clip_texts_embedded_total", "Texts answered with their embedding (POST /embeddings)")
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


def model_info(info: Mapping[str, Any]) -> None:
    MODEL.labels(info["model"], info["pretrained"], info["device"], info["dtype"], str(info["untrained"]).lower()).set(
        1
    )


def live(admitted: int, queued: int, label_sets_ready: Mapping[str, bool]) -> None:
    """The gauges read from the live service (the handler's sample())."""
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
        URL_FETCHES.labels(outcome if outcome == "ok" or outcome in ERROR_CODES else "other").inc()


def texts_embedded(count: int) -> None:
    TEXTS.inc(count)


def answered(status: int, body: object, images: int) -> None:
    """Images classified by an answer, and images shed by a 429 (when the request's count is known)."""
    classified = _predictions(body)
    if classified:
        IMAGES.inc(classified)
    if status == 429 and images:
        SHED.inc(images)


def _predictions(body: object) -> int:
    if not isinstance(body, dict):
        return 0
    if "predictions" in body:
        return 1
    results = body.get("results")
    return sum(1 for r in results if isinstance(r, dict) and "predictions" in r) if isinstance(results, list) else 0
