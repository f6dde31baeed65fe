"""index's own metrics: its calls to clip (how long they took, how they failed). Requests themselves
(counts by method/status/code, durations, the access log, GET /metrics across workers) are the template
host's (observe.py), which exposes these with its own."""

import time

from prometheus_client import Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FAILURE_KINDS = ("refused", "timeout", "5xx", "bad_answer")

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
for _kind in FAILURE_KINDS:  # every kind exported from the start, at 0: rate() and alerts need the series
    UPSTREAM_FAILURES.labels(_kind)


def upstream(started: float, failure: str | None = None) -> None:
    """clip_client's report of one call to clip: when it started (perf_counter) and how it failed, if it did."""
    UPSTREAM.observe(time.perf_counter() - started)
    if failure:
        upstream_failed(failure)


def upstream_failed(kind: str) -> None:
    UPSTREAM_FAILURES.labels(kind).inc()
