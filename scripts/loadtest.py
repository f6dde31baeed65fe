"""Load test: a bounded load on loopback, every answer checked against the contract, memory watched.

    scripts/loadtest                  # 16 clients for 2 minutes at clip, 10 % bad inputs, then the overload phase
    scripts/loadtest --quick          # the same, 20 s + 5 s: a smoke run
    scripts/loadtest --target index   # through the local gateway (as scripts/serve runs it): index -> clip hop
    scripts/loadtest --target both    # through the local gateway, each request to clip or index at random

The functions run as real processes from faas-cli-style build contexts (the code a container runs), with
the real architecture (default ViT-B-32) and CLIP_PRETRAINED=none: random weights, the same compute.
Label embeddings are cached in bench-results/cache (shared with scripts/bench), so only the first run
pays for building them.

Main phase: N clients (one requests.Session each, a timeout on every request) send a mix of good inputs
(raw JPEG and PNG, a large JPEG, multipart with options, JSON base64, a data URL, custom labels, a batch
of two) and, with probability --bad-fraction, bad ones (random bytes, a truncated JPEG, text, an empty body,
broken JSON, top_k=abc, a PNG decompression-bomb header, an unknown label_set, a PUT), each with the
status and error code it must get. A good input may also get 429 with Retry-After (counted apart; the
client then waits as told). Any other status or code is unexpected; a body that is not the contract's
JSON is a contract violation; a requests exception is a connection error. The resident memory of the
clip process (and its children) is sampled every second.

Hostile phase (unless --no-hostile, --hostile-duration s, default 30): the same clients, half of their
requests bombs and floods (JPEGs padded with fill bytes or empty segments or 500 scans, an RLE BMP, a
48-megapixel 16-bit PNG, a million-item JSON list, 300,000 form parts, a lone surrogate, 400 new labels):
no 5xx, the normal requests' p99 within the overload bound below, and clip's RSS after 5 s idle within
15 % of where the main phase ended.

Overload phase (unless --no-overload): --overload-clients clients (default 64, more than the function
admits) on the same process: it must shed load with 429 + Retry-After, and the 200s' p99 must stay
bounded: <= 1.5 × (ceil(max_queue / max_batch) + 1) × the main phase's p50 (a request admitted among
max_queue images waits for at most ceil(q / b) batches plus its own; the main phase's 16 clients keep
about two batches in flight, so its p50 is about two batch times; 1.5 is headroom for a busy machine).
Client latency includes any wait for one of the function's FUNCTION_THREADS worker threads; "time inside
clip's handler" (the answer's elapsed_ms) excludes it. Settings come from the environment as in
scripts/serve (e.g. CLIP_MAX_QUEUE=8 scripts/loadtest).

The functions run with CLIP_PRELOAD_LABEL_SETS=cifar100,cifar10 (the inputs use both), LOG_LEVEL=WARNING.
Through the gateway (--target index/both), index reaches clip's process directly, as scripts/serve runs it.

The batch-size and queue-wait distributions of each phase come from clip's GET /metrics (the
clip_batch_size and clip_queue_wait_seconds histograms, scraped before and after the phase).

Prints a table (figure, value, limit, ok) and writes JSON (bench-results/loadtest-<time>.json);
exits 1 when a limit fails.
"""
import argparse
import base64
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families
from urllib3.filepost import encode_multipart_formdata

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import RssSampler, jpeg, machine, percentile, photo, print_table, tree_rss  # noqa: E402
from local_functions import FunctionProcess, free_port, wait_until  # noqa: E402

TIMEOUT = (3, 60)  # connect, read: every request of every client
CIFAR10 = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
CUSTOM = ("cat", "dog", "teapot", "bicycle")


# ---- the inputs ------------------------------------------------------------------------------

@dataclass
class Payload:
    name: str
    good: bool
    body: bytes = b""
    content_type: str = None
    params: dict = field(default_factory=dict)
    method: str = "POST"
    weight: int = 1
    statuses: tuple = (200, 429)
    codes: tuple = ("queue_full",)     # error codes allowed (for the error statuses)
    images: int = 1
    top_k: int = 5
    label_set: str = "cifar100"
    labels: tuple = ()                 # the predictions' labels must come from these (when given)

    def headers(self):
        return {"Content-Type": self.content_type} if self.content_type else {}


def png(image):
    import io
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width=100_000, height=100_000):
    """A valid PNG header claiming 10 gigapixels, a few bytes of pixel data: refused from its header (413)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def payloads():
    small = jpeg(photo(224, 224, seed=1))
    medium = jpeg(photo(640, 480, seed=2))
    large = jpeg(photo(1920, 1080, seed=3), quality=85)
    small_png = png(photo(224, 224, seed=4))
    b64 = base64.b64encode(medium).decode("ascii")
    form, form_type = encode_multipart_formdata([("image", ("photo.jpg", medium, "image/jpeg")),
                                                ("label_set", "cifar10"), ("top_k", "3")])
    good = [
        Payload("jpeg_224_raw", True, small, "image/jpeg", weight=3),
        Payload("jpeg_640x480_raw", True, medium, "application/octet-stream", weight=2),
        Payload("jpeg_1920x1080_raw", True, large, "image/jpeg"),
        Payload("png_224_raw", True, small_png, "image/png"),
        Payload("multipart_cifar10_top3", True, form, form_type, top_k=3, label_set="cifar10",
                labels=tuple(CIFAR10)),
        Payload("json_base64_top3", True, json.dumps({"image": b64, "top_k": 3}).encode(), "application/json",
                top_k=3),
        Payload("data_url", True, f"data:image/jpeg;base64,{b64}".encode(), "text/plain"),
        Payload("custom_labels_query", True, small, "image/jpeg", params={"labels": ",".join(CUSTOM), "top_k": "2"},
                top_k=2, label_set="custom", labels=CUSTOM),
        Payload("json_batch_of_2", True,
                json.dumps({"images": [base64.b64encode(small).decode(), b64]}).encode(), "application/json",
                images=2),
    ]
    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(4096))
    # Refused for what the image holds, so only once admitted: a full function sheds them first (429).
    shed = {"statuses": (400, 429), "codes": ("invalid_image", "invalid_json", "queue_full")}
    bad = [
        Payload("random_bytes", False, noise, "application/octet-stream", **shed),
        Payload("truncated_jpeg", False, medium[:len(medium) // 2], "image/jpeg", **shed),
        Payload("text", False, b"this is not a picture, just some words.", "text/plain", **shed),
        Payload("empty_body", False, b"", "application/octet-stream", statuses=(400,), codes=("missing_image",)),
        Payload("bad_json", False, b'{"image": "abc', "application/json", statuses=(400,), codes=("invalid_json",)),
        Payload("top_k_abc", False, small, "image/jpeg", params={"top_k": "abc"}, statuses=(400,),
                codes=("invalid_option",)),
        Payload("png_bomb_header", False, png_bomb(), "image/png", statuses=(413, 429),
                codes=("image_too_large", "queue_full")),
        Payload("unknown_label_set", False, small, "image/jpeg", params={"label_set": "no-such-set"},
                statuses=(400,), codes=("unknown_label_set",)),
        Payload("put_method", False, small, "image/jpeg", method="PUT", statuses=(405,),
                codes=("method_not_allowed",)),
    ]
    return good, bad


def hostile_payloads():
    """Bombs and floods an attacker would send: each refused (4xx) or served, never a 5xx."""
    import io

    from PIL import Image
    small = jpeg(photo(224, 224, seed=1))
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((2000, 2000)).convert("RGB").save(buffer, "JPEG", progressive=True)
    progressive = buffer.getvalue()
    last_scan = progressive[progressive.rindex(b"\xff\xda"):-2]
    buffer = io.BytesIO()
    Image.new("I;16", (8000, 6000), 40000).save(buffer, "PNG")  # 48 MP at 16 bits: 96 MB decoded
    info = struct.pack("<IiiHHIIiiII", 40, 50_000, 1_000, 1, 8, 1, 16, 0, 0, 256, 0)
    rle_bmp = (b"BM" + struct.pack("<IHHI", 1094, 0, 0, 1078) + info + bytes(1024) + b"\x00\x00" * 8)
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    complex_ = {"statuses": (400, 429), "codes": ("image_too_complex", "queue_full")}
    labels = {"labels": ",".join(f"hostile label {i}" for i in range(400))}
    return [
        Payload("jpeg_fill_bytes", False, small[:2] + b"\xff" * 3_000_000 + small[2:], "image/jpeg", **complex_),
        Payload("jpeg_empty_segments", False, small[:2] + b"\xff\xec\x00\x02" * 1_000_000 + small[2:],
                "image/jpeg", **complex_),
        Payload("jpeg_500_scans", False, progressive[:-2] + last_scan * 500 + progressive[-2:], "image/jpeg",
                **complex_),
        Payload("rle_bmp_bomb", False, rle_bmp, "image/bmp", **complex_),
        Payload("png_48mp_16bit", False, buffer.getvalue(), "image/png", statuses=(200, 429),
                codes=("queue_full",)),
        Payload("json_million_images", False, b'{"images": [' + b'"x",' * 1_000_000 + b'"x"]}', "application/json",
                statuses=(400,), codes=("too_many_images",)),
        Payload("form_300k_parts", False, part * 300_000 + b"--b--\r\n", "multipart/form-data; boundary=b",
                statuses=(400,), codes=("too_many_parts",)),
        Payload("lone_surrogate", False, b'{"image": "\\ud800"}', "application/json", statuses=(400,),
                codes=("invalid_json",)),
        Payload("400_new_labels", False, small, "image/jpeg", params=labels, statuses=(200, 429, 504),
                codes=("queue_full", "deadline_exceeded"), top_k=5, label_set="custom"),
    ]


def check_body(payload, response):
    """(None, body) when the answer has the contract's shape, else (what is wrong, body or None)."""
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
            if not all(isinstance(p.get("label"), str) for p in predictions) or \
                    not all(isinstance(s, (int, float)) and 0 <= s <= 1 for s in scores):
                return f"bad prediction entries: {str(predictions)[:80]}", doc
            if scores != sorted(scores, reverse=True):
                return "predictions not sorted by score", doc
            if payload.labels and not {p["label"] for p in predictions} <= set(payload.labels):
                return f"labels outside the requested set: {[p['label'] for p in predictions]}", doc
        return None, doc
    error = doc.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), str) or \
            not isinstance(error.get("message"), str) or not error["message"]:
        return f"no error.code/message: {response.text[:80]!r}", doc
    if error["code"] not in payload.codes or (error["code"] == "queue_full") != (response.status_code == 429):
        return f"HTTP {response.status_code} with code {error['code']!r}, expected {'/'.join(payload.codes)}", doc
    return None, doc


def retry_after(response):
    try:
        value = float(response.headers.get("Retry-After", ""))
        return value if value >= 0 else None
    except ValueError:
        return None


# ---- what the load goes to -------------------------------------------------------------------

class Stack:
    """clip alone (target clip), or the local gateway running clip and index (as scripts/serve does)."""

    def __init__(self, target, env, workdir):
        self.target, self.env, self.workdir = target, env, Path(workdir)
        self.fn = self.gateway = self.log = None

    def start(self, timeout=900):
        if self.target == "clip":
            self.fn = FunctionProcess("clip", self.workdir, self.env).start(wait_ready=False)
            self.fn.wait_ready(timeout)
            self.clip_url = self.fn.url
            self.urls = [self.fn.url]
            return self
        self.port = free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "gateway.log", "wb")
        self.gateway = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "gateway.py"), "--port", str(self.port),
             "--build-dir", str(self.workdir / "gateway")],
            env={**os.environ, **self.env}, stdout=self.log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{self.port}/function"

        def ready():
            if self.gateway.poll() is not None:
                return True
            try:
                return all(requests.get(f"{base}/{name}/_/health", timeout=2).status_code == 200
                           for name in ("clip", "index"))
            except requests.RequestException:
                return False
        wait_until(ready, timeout, interval=0.5, what="gateway ready")
        if self.gateway.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.gateway.returncode}:\n{self.output()}")
        self.clip_url = f"{base}/clip"
        self.urls = {"index": [f"{base}/index"], "both": [f"{base}/clip", f"{base}/index"]}[self.target]
        return self

    def clip_process(self):
        if self.fn:
            return psutil.Process(self.fn.process.pid)
        clip_dir = (self.workdir / "gateway" / "clip").resolve()
        for child in psutil.Process(self.gateway.pid).children():
            try:
                if Path(child.cwd()).resolve() == clip_dir:
                    return child
            except psutil.Error:
                pass
        raise RuntimeError("clip process not found under the gateway")

    def describe(self):
        try:
            return requests.get(self.clip_url, timeout=10).json()
        except (requests.RequestException, ValueError):
            return {}

    def output(self):
        if self.fn:
            return self.fn.output()
        self.log.flush()
        return (self.workdir / "gateway.log").read_text(errors="replace")

    def log_problems(self):
        """Lines of the function logs that say something failed (a 500 logs 'handler failed' + a traceback)."""
        if self.fn:
            self.fn.log.flush()
            text = (self.fn.dir / "function.log").read_text(errors="replace")  # output() is the tail only
        else:
            text = self.output()
        return [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line or "CRITICAL" in line]

    def stop(self):
        if self.fn:
            self.fn.stop()
        if self.gateway and self.gateway.poll() is None:
            children = psutil.Process(self.gateway.pid).children(recursive=True)
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(120)
            except subprocess.TimeoutExpired:
                for process in [*children, psutil.Process(self.gateway.pid)]:
                    try:
                        process.kill()
                    except psutil.Error:
                        pass
                self.gateway.wait()
        if self.log:
            self.log.close()


# ---- the load ----------------------------------------------------------------------------------

@dataclass
class Record:
    t: float            # when it finished, seconds since the phase began
    payload: str
    good: bool
    status: int         # 0: connection error
    latency: float
    problem: str = None  # unexpected status / contract violation / exception text
    kind: str = None     # "unexpected", "contract", "connection", "no_retry_after"
    route: str = ""      # the function the request went to (its URL's last part)
    server_ms: float = None  # a 200's own elapsed_ms: the time inside clip's handler


def one_request(session, payload, url):
    started = time.perf_counter()
    route = url.rstrip("/").rsplit("/", 1)[-1] if "/function/" in url else "clip"
    try:
        response = session.request(payload.method, url, params=payload.params, data=payload.body,
                                   headers=payload.headers(), timeout=TIMEOUT)
    except requests.RequestException as exc:
        return None, Record(0, payload.name, payload.good, 0, time.perf_counter() - started,
                            f"{type(exc).__name__}: {str(exc)[:200]}", "connection", route)
    latency = time.perf_counter() - started
    record = Record(0, payload.name, payload.good, response.status_code, latency, route=route)
    if response.status_code not in payload.statuses:
        record.problem, record.kind = f"HTTP {response.status_code}: {response.text[:200]}", "unexpected"
    else:
        problem, doc = check_body(payload, response)
        if response.status_code == 200 and isinstance(doc, dict) and \
                isinstance(doc.get("elapsed_ms"), (int, float)):
            record.server_ms = doc["elapsed_ms"]
        if problem:
            record.problem, record.kind = f"HTTP {response.status_code}: {problem}", "contract"
        elif response.status_code == 429 and retry_after(response) is None:
            record.problem, record.kind = "429 without a usable Retry-After", "no_retry_after"
    return response, record


def run_load(urls, good, bad, clients, duration, bad_fraction, seed, honor_retry_after=True):
    """`clients` threads, each with its own session, for `duration` seconds. Returns (records, elapsed)."""
    weights = [p.weight for p in good]
    per_client = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    state = {}

    def client(index):
        rng = random.Random(seed * 1000 + index)
        records = per_client[index]
        with requests.Session() as session:
            session.trust_env = False
            barrier.wait()
            while time.monotonic() < state["stop"]:
                payload = rng.choice(bad) if bad and rng.random() < bad_fraction else \
                    rng.choices(good, weights)[0]
                response, record = one_request(session, payload, rng.choice(urls))
                record.t = time.monotonic() - state["start"]
                records.append(record)
                if record.kind == "connection":
                    time.sleep(0.1)  # no tight loop against a dead server
                elif response.status_code == 429 and honor_retry_after:
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


def warm_up(urls, good, bad):
    """Every input once on every URL, one at a time: first-use costs (custom labels) land before the clock."""
    records = []
    with requests.Session() as session:
        session.trust_env = False
        for url in urls:
            for payload in good + bad:
                records.append(one_request(session, payload, url)[1])
    return records


def summarize(records, elapsed):
    ok_200 = [r.latency for r in records if r.good and r.status == 200]
    shed = [r.latency for r in records if r.status == 429]
    server = [r.server_ms for r in records if r.good and r.status == 200 and r.server_ms is not None]
    images = sum(2 if r.payload == "json_batch_of_2" else 1 for r in records if r.good and r.status == 200)
    by_payload, by_route = defaultdict(Counter), defaultdict(Counter)
    for r in records:
        by_payload[r.payload][str(r.status)] += 1
        by_route[r.route][str(r.status)] += 1
    problems = defaultdict(list)
    for r in records:
        if r.kind:
            problems[r.kind].append(r)

    def ms(values, q):
        return percentile(values, q) * 1000 if values else None
    return {
        "requests": len(records), "elapsed_s": elapsed, "requests_per_s": len(records) / elapsed,
        "images_per_s": images / elapsed,
        "good": sum(r.good for r in records), "bad": sum(not r.good for r in records),
        "ok_200": len(ok_200), "shed_429": len(shed),
        "unexpected": len(problems["unexpected"]), "contract_violations": len(problems["contract"]),
        "connection_errors": len(problems["connection"]), "no_retry_after": len(problems["no_retry_after"]),
        "latency_ms": {"p50": ms(ok_200, 50), "p90": ms(ok_200, 90), "p99": ms(ok_200, 99),
                       "max": max(ok_200) * 1000 if ok_200 else None},
        "latency_429_ms": {"p50": ms(shed, 50), "p99": ms(shed, 99)},
        "in_function_ms": {"p50": percentile(server, 50) if server else None,
                           "p99": percentile(server, 99) if server else None},
        "series_200": [[round(r.t, 2), round(r.latency * 1000), r.server_ms, r.payload]
                       for r in sorted(records, key=lambda r: r.t) if r.good and r.status == 200],
        "statuses_by_payload": {name: dict(counts) for name, counts in sorted(by_payload.items())},
        "statuses_by_route": {name: dict(counts) for name, counts in sorted(by_route.items())},
        "latency_p50_by_payload_ms": {
            name: ms([r.latency for r in records if r.payload == name and r.status == 200], 50)
            for name in sorted(by_payload)},
        "examples": {kind: [{"payload": r.payload, "route": r.route, "status": r.status, "t": round(r.t, 2),
                             "latency_s": round(r.latency, 2), "problem": r.problem}
                            for r in rs[:10]] for kind, rs in problems.items()},
    }


def server_stats(stack):
    """(batches, images) encoded so far, from clip's GET description; None when it does not answer."""
    stats = stack.describe().get("stats")
    return (stats["batches"], stats["images"]) if stats else None


def clip_metrics(stack):
    """clip's GET /metrics, parsed: {(sample name, labels): value}; None when it does not answer."""
    try:
        text = requests.get(stack.clip_url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
    except (requests.RequestException, ValueError):
        return None


def histogram_figures(before, after, name, scale=1.0):
    """What a histogram saw between two scrapes: count, mean, p50/p90/p99 as bucket bounds (the true
    value is at most that), and the share of observations in each bucket."""
    if before is None or after is None:
        return None
    cumulative = sorted((float(dict(labels)["le"]), after[(n, labels)] - before.get((n, labels), 0.0))
                        for n, labels in after if n == f"{name}_bucket")
    count = after.get((f"{name}_count", ()), 0.0) - before.get((f"{name}_count", ()), 0.0)
    total = after.get((f"{name}_sum", ()), 0.0) - before.get((f"{name}_sum", ()), 0.0)
    if not count:
        return {"count": 0}

    def bound(q):
        return next((le * scale for le, seen in cumulative if seen >= q * count), math.inf)
    shares, previous = {}, 0.0
    for le, seen in cumulative:
        if seen > previous:
            shares["+Inf" if math.isinf(le) else f"{le * scale:g}"] = round((seen - previous) / count, 3)
        previous = seen
    return {"count": int(count), "mean": total / count * scale, "p50_le": bound(0.5), "p90_le": bound(0.9),
            "p99_le": bound(0.99), "shares_by_le": shares}


def metric_figures(before, after):
    return {"batch_size": histogram_figures(before, after, "clip_batch_size"),
            "queue_wait_ms": histogram_figures(before, after, "clip_queue_wait_seconds", scale=1000)}


def batch_figures(before, after):
    if before is None or after is None:
        return {"batches": None, "images": None, "mean_batch": None}
    batches, images = after[0] - before[0], after[1] - before[1]
    return {"batches": batches, "images": images, "mean_batch": images / max(1, batches)}


# ---- the phases --------------------------------------------------------------------------------

def main_phase(args, stack, good, bad):
    warm = warm_up(stack.urls, good, bad)
    warm_problems = [r for r in warm if r.kind]
    for r in warm_problems:
        print(f"warm-up: {r.payload}: {r.problem}", file=sys.stderr)
    stats0, metrics0 = server_stats(stack), clip_metrics(stack)
    process = stack.clip_process()
    rss_ready = tree_rss(process)
    print(f"main phase: {args.clients} clients, {args.duration:g} s, {args.bad_fraction:.0%} bad, "
          f"target {args.target} ({', '.join(stack.urls)})", file=sys.stderr, flush=True)
    with RssSampler(process) as sampler:
        records, elapsed = run_load(stack.urls, good, bad, args.clients, args.duration, args.bad_fraction,
                                    args.seed)
    stats1, metrics1 = server_stats(stack), clip_metrics(stack)
    result = summarize(records, elapsed)
    result["metrics"] = metric_figures(metrics0, metrics1)
    result["warm_up_problems"] = [{"payload": r.payload, "status": r.status, "problem": r.problem}
                                  for r in warm_problems]
    mid_t = args.duration / 2
    mid, end = sampler.at(mid_t), sampler.at(args.duration)
    result["rss"] = {
        "ready_mb": rss_ready / 2**20, "mid_t_s": round(mid[0], 1), "mid_mb": mid[1] / 2**20,
        "end_t_s": round(end[0], 1), "end_mb": end[1] / 2**20,
        "peak_mb": sampler.peak / 2**20,
        "growth_pct": (end[1] - mid[1]) / mid[1] * 100,
        "samples_mb": [[round(t, 1), round(b / 2**20, 1)] for t, b in sampler.samples]}
    result["server"] = batch_figures(stats0, stats1)
    return result


def hostile_phase(args, stack, good, hostile, main):
    """Half the requests hostile: normal clients keep a bounded p99, memory comes back, no 5xx."""
    print(f"hostile phase: {args.clients} clients, {args.hostile_duration:g} s, half of them bombs and floods",
          file=sys.stderr, flush=True)
    process, stats0, metrics0 = stack.clip_process(), server_stats(stack), clip_metrics(stack)
    with RssSampler(process, interval=0.5) as sampler:
        records, elapsed = run_load(stack.urls, good, hostile, args.clients, args.hostile_duration, 0.5,
                                    args.seed + 2)
    stats1, metrics1 = server_stats(stack), clip_metrics(stack)
    time.sleep(5)  # idle: what the decodes took is given back
    result = summarize(records, elapsed)
    result["server"] = batch_figures(stats0, stats1)
    result["metrics"] = metric_figures(metrics0, metrics1)
    result["rss"] = {"before_mb": main["rss"]["end_mb"], "peak_mb": sampler.peak / 2**20,
                     "after_idle_mb": tree_rss(process) / 2**20}
    return result


def overload_phase(args, stack, good, bad, label):
    print(f"overload ({label}): {args.overload_clients} clients, {args.overload_duration:g} s",
          file=sys.stderr, flush=True)
    stats0, metrics0 = server_stats(stack), clip_metrics(stack)
    with RssSampler(stack.clip_process(), interval=0.5) as sampler:
        records, elapsed = run_load(stack.urls, good, bad, args.overload_clients, args.overload_duration,
                                    args.bad_fraction, args.seed + 1, honor_retry_after=not args.no_backoff)
    stats1, metrics1 = server_stats(stack), clip_metrics(stack)
    result = summarize(records, elapsed)
    result["metrics"] = metric_figures(metrics0, metrics1)
    result["label"] = label
    result["rss_peak_mb"] = sampler.peak / 2**20
    result["server"] = batch_figures(stats0, stats1)
    return result


# ---- the report --------------------------------------------------------------------------------

def rows_for(result, prefix, limits):
    """(figure, value, limit, ok) rows for one phase; `limits` adds the pass/fail ones."""
    lat = result["latency_ms"]
    rows = [
        (f"{prefix}requests (good / bad)", f"{result['requests']} ({result['good']} / {result['bad']})", "", ""),
        (f"{prefix}throughput (req/s, images/s)", f"{result['requests_per_s']:.2f}, {result['images_per_s']:.2f}",
         "", ""),
        (f"{prefix}200 / 429 (queue full)", f"{result['ok_200']} / {result['shed_429']}", "", ""),
    ]
    if limits:
        rows += [
            (f"{prefix}unexpected statuses", result["unexpected"], "= 0", result["unexpected"] == 0),
            (f"{prefix}contract violations (body, code)", result["contract_violations"], "= 0",
             result["contract_violations"] == 0),
            (f"{prefix}connection errors", result["connection_errors"], "= 0", result["connection_errors"] == 0),
            (f"{prefix}429 without Retry-After", result["no_retry_after"], "= 0", result["no_retry_after"] == 0),
        ]
    else:
        rows.append((f"{prefix}unexpected / contract / connection",
                     f"{result['unexpected']} / {result['contract_violations']} / {result['connection_errors']}",
                     "", ""))
    fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    rows.append((f"{prefix}latency of 200s p50 / p90 / p99 / max (ms)",
                 " / ".join(fmt(lat[k]) for k in ("p50", "p90", "p99", "max")), "", ""))
    inside = result["in_function_ms"]
    rows.append((f"{prefix}time inside clip's handler, 200s p50 / p99 (ms)",
                 " / ".join(fmt(inside[k]) for k in ("p50", "p99")), "", ""))
    if result["shed_429"]:
        rows.append((f"{prefix}latency of 429s p50 / p99 (ms)",
                     " / ".join(fmt(result["latency_429_ms"][k]) for k in ("p50", "p99")), "", ""))
    server = result["server"]
    rows.append((f"{prefix}server batches, mean batch (images)", "- (clip did not answer GET)"
                 if server["batches"] is None else f"{server['batches']}, {server['mean_batch']:.2f}", "", ""))
    for key, title in (("batch_size", "batch size (images)"), ("queue_wait_ms", "queue wait (ms)")):
        figures = result["metrics"][key]
        if not figures or not figures["count"]:
            rows.append((f"{prefix}{title}, from /metrics", "-", "", ""))
            continue
        rows.append((f"{prefix}{title}, from /metrics: mean; p50 / p90 / p99 at most",
                     f"{figures['mean']:.1f}; {figures['p50_le']:g} / {figures['p90_le']:g} / {figures['p99_le']:g}",
                     "", ""))
        rows.append((f"{prefix}{title}: share per bucket (upper bound: share)",
                     ", ".join(f"{le}: {share:.0%}" for le, share in figures["shares_by_le"].items()), "", ""))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120, help="seconds of the main phase")
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--target", choices=("clip", "index", "both"), default="clip",
                        help="clip: the clip function directly (default, the model's own HTTP server); "
                             "index: through the local gateway to index, which forwards to clip; "
                             "both: through the gateway, each request to clip or index at random")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--cache-dir", default=str(ROOT / "bench-results" / "cache"),
                        help="CLIP_CACHE_DIR (label embeddings), shared with scripts/bench")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 s main phase, 5 s overload")
    parser.add_argument("--no-overload", action="store_true", help="skip the overload phase")
    parser.add_argument("--no-hostile", action="store_true", help="skip the hostile-heavy phase")
    parser.add_argument("--hostile-duration", type=float, default=30)
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--overload-duration", type=float, default=10)
    parser.add_argument("--no-backoff", action="store_true",
                        help="overload clients retry at once after a 429 instead of waiting Retry-After")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None, help="default: bench-results/loadtest-<time>.json")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.overload_duration = min(args.duration, 20), min(args.overload_duration, 5)
        args.hostile_duration = min(args.hostile_duration, 10)
    out = Path(args.json or ROOT / "bench-results" / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    cache = Path(args.cache_dir)
    env = {"CLIP_MODEL": args.model, "CLIP_PRETRAINED": "none", "CLIP_CACHE_DIR": str(cache),
           "CLIP_PRELOAD_LABEL_SETS": "cifar100,cifar10", "LOG_LEVEL": "WARNING"}
    if not any(cache.glob("embeddings/cifar100-*.pt")):
        print(f"no label-embedding cache in {cache}: the first start builds it (minutes on a small CPU)",
              file=sys.stderr)
    good, bad = payloads()
    report = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "config": {**vars(args), "env": env}, "payloads": {
                  "good": {p.name: {"bytes": len(p.body), "weight": p.weight} for p in good},
                  "bad": {p.name: {"bytes": len(p.body), "expect": list(p.statuses), "codes": list(p.codes)}
                          for p in bad}}}
    workdir = Path(tempfile.mkdtemp(prefix="clip-loadtest-"))
    rows = []

    started = time.perf_counter()
    stack = Stack(args.target, env, workdir / "main").start()
    print(f"ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    try:
        first = report["main"] = main_phase(args, stack, good, bad)
        rss = first["rss"]
        rows += rows_for(first, "", limits=True)
        rows += [
            ("warm-up problems (every input once)", len(first["warm_up_problems"]), "= 0",
             not first["warm_up_problems"]),
            ("clip RSS ready / peak (MB)", f"{rss['ready_mb']:.0f} / {rss['peak_mb']:.0f}", "", ""),
            (f"clip RSS at t={rss['mid_t_s']:g} s / t={rss['end_t_s']:g} s (MB)",
             f"{rss['mid_mb']:.0f} / {rss['end_mb']:.0f}", "", ""),
            ("clip RSS growth, mid -> end (%)", round(rss["growth_pct"], 2), "< 10", rss["growth_pct"] < 10),
        ]
        limits = stack.describe().get("limits") or {}
        if not args.no_hostile:
            hostile = report["hostile"] = hostile_phase(args, stack, good, hostile_payloads(), first)
            prefix, rss = "hostile: ", hostile["rss"]
            p50, p99 = first["latency_ms"]["p50"], hostile["latency_ms"]["p99"]
            queue, max_batch = limits.get("max_queue", 32), limits.get("max_batch", 8)
            bound = 1.5 * (math.ceil(queue / max_batch) + 1) * p50 if p50 is not None else float("nan")
            rows += rows_for(hostile, prefix, limits=True)
            rows += [
                (f"{prefix}p99 of normal 200s (ms)", "-" if p99 is None else f"{p99:,.0f}", f"≤ {bound:,.0f}",
                 p99 is not None and p99 <= bound),
                (f"{prefix}clip RSS before / peak / after 5 s idle (MB)",
                 f"{rss['before_mb']:.0f} / {rss['peak_mb']:.0f} / {rss['after_idle_mb']:.0f}", "", ""),
                (f"{prefix}RSS after idle vs before (%)",
                 round((rss["after_idle_mb"] / rss["before_mb"] - 1) * 100, 1), "< 15",
                 rss["after_idle_mb"] < 1.15 * rss["before_mb"]),
            ]
        if not args.no_overload:
            over = report["overload"] = overload_phase(args, stack, good, bad, "default settings")
            prefix = "overload: "
            p50, p99 = first["latency_ms"]["p50"], over["latency_ms"]["p99"]
            queue, max_batch = limits.get("max_queue", 32), limits.get("max_batch", 8)
            bound = 1.5 * (math.ceil(queue / max_batch) + 1) * p50 if p50 is not None else float("nan")
            over["p99_bound_ms"] = bound
            rows += rows_for(over, prefix, limits=True)
            rows += [
                (f"{prefix}requests shed with 429 (max_queue {queue})", over["shed_429"], "> 0",
                 over["shed_429"] > 0),
                (f"{prefix}p99 of 200s (ms)", "-" if p99 is None else f"{p99:,.0f}", f"≤ {bound:,.0f}",
                 p99 is not None and p99 <= bound),
            ]
        problems = stack.log_problems()
    finally:
        stack.stop()
    report["main"]["log_problems"] = problems[:20]
    rows.append(("ERROR / Traceback lines in the function logs", len(problems), "= 0", not problems))

    report["limits"] = [{"figure": f, "value": v, "limit": l, "ok": ok} for f, v, l, ok in rows if l]
    report["ok"] = all(ok for _, _, l, ok in rows if l)
    print_table(["figure", "value", "limit", "ok"],
                [(f, v, l, "" if not l else ("ok" if ok else "FAIL")) for f, v, l, ok in rows])
    for phase in ("main", "hostile", "overload"):
        for kind, examples in (report.get(phase) or {}).get("examples", {}).items():
            for example in examples[:5]:
                print(f"{phase}: {kind}: {example}")
    print(f"\nmachine: {report['machine']}")
    print("note: the load generator runs on the same machine as the functions; on a busy machine "
          "latency figures are noisy")
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"written: {out}")
    if report["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
        print("all limits met")
    else:
        print(f"LIMITS FAILED (the functions' build contexts and logs are kept in {workdir})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
