"""The load test's run: what the load goes to (clip alone, or the local gateway as scripts/serve runs it),
the clients, and the phases (main, hostile, overload) with their figures."""

import argparse
import math
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import psutil
import requests

from benchmarks.loadtest.contract import check_body, retry_after
from benchmarks.loadtest.payloads import Payload
from benchmarks.measure import RssSampler, Scrape, metric_samples, percentile, tree_rss
from localrun import FunctionProcess, Stack

TIMEOUT = (3, 60)  # connect, read: every request of every client


# ---- what the load goes to -------------------------------------------------------------------


class Target:
    """clip alone (target clip), or the local gateway running clip and index (localrun.Stack, as
    scripts/serve does)."""

    def __init__(self, target: str, env: Mapping[str, str], workdir: Path) -> None:
        self.target, self.env, self.workdir = target, env, Path(workdir)
        self.fn: FunctionProcess | None = None
        self.gateway: Stack | None = None
        self.clip_url = ""
        self.urls: list[str] = []

    def start(self, timeout: float = 900) -> Self:
        if self.target == "clip":
            self.fn = FunctionProcess("clip", self.workdir, self.env).start(wait_ready=False)
            self.fn.wait_ready(timeout)
            self.clip_url = self.fn.url
            self.urls = [self.fn.url]
            return self
        self.gateway = Stack(self.workdir, self.env).start(timeout, interval=0.5)
        base = f"{self.gateway.url}/function"
        self.clip_url = f"{base}/clip"
        self.urls = {"index": [f"{base}/index"], "both": [f"{base}/clip", f"{base}/index"]}[self.target]
        return self

    def clip_process(self) -> psutil.Process:
        if self.fn:
            return psutil.Process(self.fn.started.pid)
        if self.gateway:
            return self.gateway.function_process("clip")
        raise RuntimeError("the load test's target is not started")

    def describe(self) -> Any:
        try:
            return requests.get(self.clip_url, timeout=10).json()
        except (requests.RequestException, ValueError):
            return {}

    def log_problems(self) -> list[str]:
        """Lines of the function logs that say something failed (a 500 logs 'handler failed' + a traceback)."""
        if self.fn:
            if self.fn.log:
                self.fn.log.flush()
            text = (self.fn.dir / "function.log").read_text(errors="replace")  # output() is the tail only
        else:
            text = self.gateway.output() if self.gateway else ""
        return [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line or "CRITICAL" in line]

    def stop(self) -> None:
        if self.fn:
            self.fn.stop()
        if self.gateway:
            self.gateway.stop(timeout=120)


# ---- the load ----------------------------------------------------------------------------------


@dataclass
class Record:
    t: float  # when it finished, seconds since the phase began
    payload: str
    good: bool
    status: int  # 0: connection error
    latency: float
    problem: str | None = None  # unexpected status / contract violation / exception text
    kind: str | None = None  # "unexpected", "contract", "connection", "no_retry_after"
    route: str = ""  # the function the request went to (its URL's last part)
    server_ms: float | None = None  # a 200's own elapsed_ms: the time inside clip's handler


def one_request(session: requests.Session, payload: Payload, url: str) -> tuple[requests.Response | None, Record]:
    started = time.perf_counter()
    route = url.rstrip("/").rsplit("/", 1)[-1] if "/function/" in url else "clip"
    try:
        response = session.request(
            payload.method, url, params=payload.params, data=payload.body, headers=payload.headers(), timeout=TIMEOUT
        )
    except requests.RequestException as exc:
        return None, Record(
            0,
            payload.name,
            payload.good,
            0,
            time.perf_counter() - started,
            f"{type(exc).__name__}: {str(exc)[:200]}",
            "connection",
            route,
        )
    latency = time.perf_counter() - started
    record = Record(0, payload.name, payload.good, response.status_code, latency, route=route)
    if response.status_code not in payload.statuses:
        record.problem, record.kind = f"HTTP {response.status_code}: {response.text[:200]}", "unexpected"
    else:
        problem, doc = check_body(payload, response)
        if response.status_code == 200 and isinstance(doc, dict) and isinstance(doc.get("elapsed_ms"), (int, float)):
            record.server_ms = doc["elapsed_ms"]
        if problem:
            record.problem, record.kind = f"HTTP {response.status_code}: {problem}", "contract"
        elif response.status_code == 429 and retry_after(response) is None:
            record.problem, record.kind = "429 without a usable Retry-After", "no_retry_after"
    return response, record


def run_load(
    urls: Sequence[str],
    good: Sequence[Payload],
    bad: Sequence[Payload],
    clients: int,
    duration: float,
    bad_fraction: float,
    seed: int,
    honor_retry_after: bool = True,
) -> tuple[list[Record], float]:
    """`clients` threads, each with its own session, for `duration` seconds. Returns (records, elapsed)."""
    weights = [p.weight for p in good]
    per_client: list[list[Record]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    state: dict[str, float] = {}

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        records = per_client[index]
        with requests.Session() as session:
            session.trust_env = False
            barrier.wait()
            while time.monotonic() < state["stop"]:
                payload = rng.choice(bad) if bad and rng.random() < bad_fraction else rng.choices(good, weights)[0]
                response, record = one_request(session, payload, rng.choice(urls))
                record.t = time.monotonic() - state["start"]
                records.append(record)
                if record.kind == "connection":
                    time.sleep(0.1)  # no tight loop against a dead server
                elif response is not None and response.status_code == 429 and honor_retry_after:
                    time.sleep(min(retry_after(response) or 1.0, 5.0))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    state["start"] = time.monotonic()
    state["stop"] = state["start"] + duration
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - state["start"]
    return [r for records in per_client for r in records], elapsed


def warm_up(urls: Sequence[str], good: Sequence[Payload], bad: Sequence[Payload]) -> list[Record]:
    """Every input once on every URL, one at a time: first-use costs (custom labels) land before the clock."""
    records = []
    with requests.Session() as session:
        session.trust_env = False
        for url in urls:
            for payload in [*good, *bad]:
                records.append(one_request(session, payload, url)[1])
    return records


def summarize(records: Sequence[Record], elapsed: float) -> dict[str, Any]:
    ok_200 = [r.latency for r in records if r.good and r.status == 200]
    shed = [r.latency for r in records if r.status == 429]
    server = [r.server_ms for r in records if r.good and r.status == 200 and r.server_ms is not None]
    images = sum(2 if r.payload == "json_batch_of_2" else 1 for r in records if r.good and r.status == 200)
    by_payload: defaultdict[str, Counter[str]] = defaultdict(Counter)
    by_route: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        by_payload[r.payload][str(r.status)] += 1
        by_route[r.route][str(r.status)] += 1
    problems: defaultdict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.kind:
            problems[r.kind].append(r)

    def ms(values: Sequence[float], q: float) -> float | None:
        return percentile(values, q) * 1000 if values else None

    return {
        "requests": len(records),
        "elapsed_s": elapsed,
        "requests_per_s": len(records) / elapsed,
        "images_per_s": images / elapsed,
        "good": sum(r.good for r in records),
        "bad": sum(not r.good for r in records),
        "ok_200": len(ok_200),
        "shed_429": len(shed),
        "unexpected": len(problems["unexpected"]),
        "contract_violations": len(problems["contract"]),
        "connection_errors": len(problems["connection"]),
        "no_retry_after": len(problems["no_retry_after"]),
        "latency_ms": {
            "p50": ms(ok_200, 50),
            "p90": ms(ok_200, 90),
            "p99": ms(ok_200, 99),
            "max": max(ok_200) * 1000 if ok_200 else None,
        },
        "latency_429_ms": {"p50": ms(shed, 50), "p99": ms(shed, 99)},
        "in_function_ms": {
            "p50": percentile(server, 50) if server else None,
            "p99": percentile(server, 99) if server else None,
        },
        "series_200": [
            [round(r.t, 2), round(r.latency * 1000), r.server_ms, r.payload]
            for r in sorted(records, key=lambda r: r.t)
            if r.good and r.status == 200
        ],
        "statuses_by_payload": {name: dict(counts) for name, counts in sorted(by_payload.items())},
        "statuses_by_route": {name: dict(counts) for name, counts in sorted(by_route.items())},
        "latency_p50_by_payload_ms": {
            name: ms([r.latency for r in records if r.payload == name and r.status == 200], 50)
            for name in sorted(by_payload)
        },
        "examples": {
            kind: [
                {
                    "payload": r.payload,
                    "route": r.route,
                    "status": r.status,
                    "t": round(r.t, 2),
                    "latency_s": round(r.latency, 2),
                    "problem": r.problem,
                }
                for r in rs[:10]
            ]
            for kind, rs in problems.items()
        },
    }


def server_stats(stack: Target) -> tuple[int, int] | None:
    """(batches, images) encoded so far, from clip's GET description; None when it does not answer."""
    stats = stack.describe().get("stats")
    return (stats["batches"], stats["images"]) if stats else None


def clip_metrics(stack: Target) -> Scrape | None:
    """clip's GET /metrics, parsed: {(sample name, labels): value}; None when it does not answer."""
    try:
        return metric_samples(requests.get(stack.clip_url + "/metrics", timeout=10).text)
    except (requests.RequestException, ValueError):
        return None


def histogram_figures(
    before: Scrape | None, after: Scrape | None, name: str, scale: float = 1.0
) -> dict[str, float | dict[str, float]] | None:
    """What a histogram saw between two scrapes: count, mean, p50/p90/p99 as bucket bounds (the true
    value is at most that), and the share of observations in each bucket."""
    if before is None or after is None:
        return None
    cumulative = sorted(
        (float(dict(labels)["le"]), after[(n, labels)] - before.get((n, labels), 0.0))
        for n, labels in after
        if n == f"{name}_bucket"
    )
    count = after.get((f"{name}_count", ()), 0.0) - before.get((f"{name}_count", ()), 0.0)
    total = after.get((f"{name}_sum", ()), 0.0) - before.get((f"{name}_sum", ()), 0.0)
    if not count:
        return {"count": 0}

    def bound(q: float) -> float:
        return next((le * scale for le, seen in cumulative if seen >= q * count), math.inf)

    shares: dict[str, float] = {}
    previous = 0.0
    for le, seen in cumulative:
        if seen > previous:
            shares["+Inf" if math.isinf(le) else f"{le * scale:g}"] = round((seen - previous) / count, 3)
        previous = seen
    return {
        "count": int(count),
        "mean": total / count * scale,
        "p50_le": bound(0.5),
        "p90_le": bound(0.9),
        "p99_le": bound(0.99),
        "shares_by_le": shares,
    }


def metric_figures(
    before: Scrape | None, after: Scrape | None
) -> dict[str, dict[str, float | dict[str, float]] | None]:
    return {
        "batch_size": histogram_figures(before, after, "clip_batch_size"),
        "queue_wait_ms": histogram_figures(before, after, "clip_queue_wait_seconds", scale=1000),
    }


def batch_figures(before: tuple[int, int] | None, after: tuple[int, int] | None) -> dict[str, float | None]:
    if before is None or after is None:
        return {"batches": None, "images": None, "mean_batch": None}
    batches, images = after[0] - before[0], after[1] - before[1]
    return {"batches": batches, "images": images, "mean_batch": images / max(1, batches)}


# ---- the phases --------------------------------------------------------------------------------


def measured_load(
    stack: Target,
    clients: int,
    duration: float,
    good: Sequence[Payload],
    bad: Sequence[Payload],
    bad_fraction: float,
    seed: int,
    interval: float = 1.0,
    honor_retry_after: bool = True,
) -> tuple[dict[str, Any], RssSampler, psutil.Process]:
    """One load on the stack with the server's batch counters, clip's metrics and clip's memory taken
    around it: (its summary with "server" and "metrics" added, the RSS sampler, clip's process)."""
    process = stack.clip_process()
    stats0, metrics0 = server_stats(stack), clip_metrics(stack)
    with RssSampler(process, interval=interval) as sampler:
        records, elapsed = run_load(
            stack.urls, good, bad, clients, duration, bad_fraction, seed, honor_retry_after=honor_retry_after
        )
    stats1, metrics1 = server_stats(stack), clip_metrics(stack)
    result = summarize(records, elapsed)
    result["server"] = batch_figures(stats0, stats1)
    result["metrics"] = metric_figures(metrics0, metrics1)
    return result, sampler, process


def main_phase(
    args: argparse.Namespace, stack: Target, good: Sequence[Payload], bad: Sequence[Payload]
) -> dict[str, Any]:
    warm = warm_up(stack.urls, good, bad)
    warm_problems = [r for r in warm if r.kind]
    for r in warm_problems:
        print(f"warm-up: {r.payload}: {r.problem}", file=sys.stderr)
    rss_ready = tree_rss(stack.clip_process())
    print(
        f"main phase: {args.clients} clients, {args.duration:g} s, {args.bad_fraction:.0%} bad, "
        f"target {args.target} ({', '.join(stack.urls)})",
        file=sys.stderr,
        flush=True,
    )
    result, sampler, _ = measured_load(stack, args.clients, args.duration, good, bad, args.bad_fraction, args.seed)
    result["warm_up_problems"] = [
        {"payload": r.payload, "status": r.status, "problem": r.problem} for r in warm_problems
    ]
    mid_t = args.duration / 2
    mid, end = sampler.at(mid_t), sampler.at(args.duration)
    result["rss"] = {
        "ready_mb": rss_ready / 2**20,
        "mid_t_s": round(mid[0], 1),
        "mid_mb": mid[1] / 2**20,
        "end_t_s": round(end[0], 1),
        "end_mb": end[1] / 2**20,
        "peak_mb": sampler.peak / 2**20,
        "growth_pct": (end[1] - mid[1]) / mid[1] * 100,
        "samples_mb": [[round(t, 1), round(b / 2**20, 1)] for t, b in sampler.samples],
    }
    return result


def hostile_phase(
    args: argparse.Namespace,
    stack: Target,
    good: Sequence[Payload],
    hostile: Sequence[Payload],
    main: Mapping[str, Any],
) -> dict[str, Any]:
    """Half the requests hostile: normal clients keep a bounded p99, memory comes back, no 5xx."""
    print(
        f"hostile phase: {args.clients} clients, {args.hostile_duration:g} s, half of them bombs and floods",
        file=sys.stderr,
        flush=True,
    )
    result, sampler, process = measured_load(
        stack, args.clients, args.hostile_duration, good, hostile, 0.5, args.seed + 2, interval=0.5
    )
    time.sleep(5)  # idle: what the decodes took is given back
    result["rss"] = {
        "before_mb": main["rss"]["end_mb"],
        "peak_mb": sampler.peak / 2**20,
        "after_idle_mb": tree_rss(process) / 2**20,
    }
    return result


def overload_phase(
    args: argparse.Namespace, stack: Target, good: Sequence[Payload], bad: Sequence[Payload], label: str
) -> dict[str, Any]:
    print(
        f"overload ({label}): {args.overload_clients} clients, {args.overload_duration:g} s",
        file=sys.stderr,
        flush=True,
    )
    result, sampler, _ = measured_load(
        stack,
        args.overload_clients,
        args.overload_duration,
        good,
        bad,
        args.bad_fraction,
        args.seed + 1,
        interval=0.5,
        honor_retry_after=not args.no_backoff,
    )
    result["label"] = label
    result["rss_peak_mb"] = sampler.peak / 2**20
    return result
