"""scripts/bench's served figures: the clip function as real processes (direct, via the local gateway,
behind the of-watchdog), timed in alternating rounds beside the raw forward pass in this process."""

import argparse
import contextlib
import functools
import http.client
import io
import json
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil
import requests
import torch
from clip.images import load_image
from clip.labels import LABEL_SETS, LabelSet, LabelStore
from clip.model import ClipModel
from clip.service import Service
from PIL import Image

from benchmarks.measure import RssSampler, metric_samples, percentile
from benchmarks.pictures import jpeg, photo
from benchmarks.timing import Timed, interleaved, median_time
from localrun import FunctionProcess, Stack
from localrun.of_watchdog import watchdog_for_many


def original_design(name: str, image_bytes: bytes, tokenizer_labels: Sequence[str]) -> float:
    """The baseline without a warm model: every request creates the model, encodes 100 prompts, then the image."""
    import open_clip

    started = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of a {label}" for label in tokenizer_labels]))
        image = model.encode_image(preprocess(Image.open(io.BytesIO(image_bytes)).convert("RGB")).unsqueeze(0))
        (100 * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T).softmax(-1)
    return time.perf_counter() - started


def cold_start(env: Mapping[str, str], workdir: Path) -> float:
    """Process start -> first classification answered (200)."""
    body = jpeg(photo(224, 224, seed=9))
    started = time.perf_counter()
    fn = FunctionProcess("clip", workdir, env).start(wait_ready=False)
    try:
        while True:
            try:
                if requests.post(fn.url, data=body, timeout=30).status_code == 200:
                    return time.perf_counter() - started
            except requests.ConnectionError:
                pass
            if fn.started.poll() is not None:
                raise RuntimeError(fn.output())
            if time.perf_counter() - started > 600:
                raise TimeoutError("no answer within 600 s")
            time.sleep(0.02)
    finally:
        fn.stop()


IN_PROCESS_MODEL = "model (encode_image, batch 1, in this process: not in the sum)"
SERVED_MODEL = "model (the function's forward pass, batch 1, its metrics: a mean)"


def stages(clip: ClipModel, body: bytes, label_set: LabelSet) -> dict[str, Callable[[], object]]:
    """Each in-function stage of one request as a callable, with the function's own code in this process."""
    image = load_image(body, 50_000_000, clip.image_size)
    batch = clip.to_batch([clip.prepare(image)])
    features = clip.encode_images(batch)[0].numpy()  # what the service ranks: a row as an array
    rng = np.random.default_rng(0)  # ranking's cost does not depend on the embeddings' values
    embeddings = rng.standard_normal((len(label_set.labels), features.shape[0])).astype(np.float32)
    ranker = cast(Service, types.SimpleNamespace(model=clip))  # Service.rank needs only the model's logit scale
    predictions = Service.rank(ranker, features, label_set.labels, embeddings, 5)
    answer = {
        "predictions": predictions,
        "label_set": "cifar100",
        "model": clip.name,
        "pretrained": "none",
        "untrained": True,
        "warning": "x" * 80,
        "request_id": "0" * 32,
        "elapsed_ms": 30.1,
    }
    return {
        "decode (Pillow, draft mode for large JPEGs)": lambda: load_image(body, 50_000_000, clip.image_size),
        "preprocess (resize, crop, to tensor, normalise)": lambda: clip.to_batch([clip.prepare(image)]),
        IN_PROCESS_MODEL: lambda: clip.encode_images(batch),
        "ranking (softmax over the label set, top 5)": lambda: Service.rank(
            ranker, features, label_set.labels, embeddings, 5
        ),
        "JSON (the answer's body)": lambda: json.dumps(answer),
    }


def post_ok(session: requests.Session, url: str, body: bytes) -> None:
    response = session.post(url, data=body, timeout=600)
    assert response.status_code == 200, response.text


def cold_starts(
    envs: Mapping[str, Mapping[str, str]],
    raws: Mapping[str, ClipModel],
    cache: Path,
    label_set: LabelSet,
    workdir: Path,
) -> dict[str, dict[str, Any]]:
    """Two cold starts per dtype: the first builds the label cache when there is none, the second has it."""
    results: dict[str, dict[str, Any]] = {d: {} for d in raws}
    for d, env in envs.items():
        had_cache = Path(LabelStore(raws[d], str(cache)).cache_path(label_set)).exists()
        first = cold_start(env, workdir / f"first-{d}")
        results[d]["cold_start_without_cache_s" if not had_cache else "cold_start_first_s"] = first
        results[d]["cold_start_s"] = cold_start(env, workdir / f"second-{d}")
    return results


def at_rest(session: requests.Session, fn: FunctionProcess) -> dict[str, Any]:
    """The running function's RSS before any load, the dtype it serves and its CLIP_MAX_BATCH."""
    return {
        "rss_at_rest_mb": psutil.Process(fn.started.pid).memory_info().rss / 2**20,
        "served_dtype": {k: v for k, v in session.get(fn.url, timeout=30).json().items() if k.startswith("dtype")},
        "max_batch": session.get(fn.url, timeout=30).json()["limits"]["max_batch"],
    }


def request_figures(
    session: requests.Session,
    raws: Mapping[str, ClipModel],
    fns: Mapping[str, FunctionProcess],
    gateway_url: str,
    behind: Mapping[str, FunctionProcess],
    small: bytes,
    large: bytes,
    label_set: LabelSet,
    runs: int,
) -> dict[str, dict[str, float | dict[str, float]]]:
    """One request at a time: 224 px direct, via the gateway and behind the of-watchdog, 4000×3000 direct,
    and each in-function stage, all in the same alternating rounds as the raw forward pass; then "the
    rest" (own_forward)."""
    rounds = 4
    named: dict[str, Timed] = {}
    inside: dict[str, dict[str, Callable[[], object]]] = {}
    for d, fn in fns.items():
        one = torch.randn(1, 3, raws[d].image_size, raws[d].image_size)
        named[f"raw {d}"] = (functools.partial(raws[d].encode_images, one), runs // rounds)
        named[f"small {d}"] = (functools.partial(post_ok, session, fn.url, small), runs // rounds)
        named[f"gateway {d}"] = (
            functools.partial(post_ok, session, f"{gateway_url}/function/{d}", small),
            runs // rounds,
        )
        if d in behind:
            named[f"watchdog {d}"] = (functools.partial(post_ok, session, behind[d].url, small), runs // rounds)
        named[f"large {d}"] = (functools.partial(post_ok, session, fn.url, large), max(10, runs // 2) // rounds)
        inside[d] = stages(raws[d], small, label_set)  # in the same rounds: the same drift as the HTTP figures
        named.update({f"stage {d} {n}": (f, runs // rounds) for n, f in inside[d].items()})
    medians = interleaved(named, rounds)
    figures: dict[str, dict[str, float | dict[str, float]]] = {}
    for d, fn in fns.items():
        r = {
            "raw_batch1_ms": medians[f"raw {d}"] * 1000,  # the reference, beside the HTTP figures
            "http_224_p50_ms": medians[f"small {d}"] * 1000,
            "gateway_224_p50_ms": medians[f"gateway {d}"] * 1000,
            "http_4000x3000_p50_ms": medians[f"large {d}"] * 1000,
            **own_forward(session, fn, small, runs),
        }
        split = {n: medians[f"stage {d} {n}"] * 1000 for n in inside[d]}
        split[SERVED_MODEL] = r["served_batch1_forward_ms"]  # in the sum instead of this process's own
        split["HTTP in and out, host, handler, batcher hand-off (the rest)"] = r["http_224_mean_ms"] - sum(
            v for n, v in split.items() if n != IN_PROCESS_MODEL
        )
        split["gateway hop (scripts/serve's proxy)"] = r["gateway_224_p50_ms"] - r["http_224_p50_ms"]
        if d in behind:
            r["watchdog_224_p50_ms"] = medians[f"watchdog {d}"] * 1000
            r["watchdog_hop_ms"] = r["watchdog_224_p50_ms"] - r["http_224_p50_ms"]
        figures[d] = {**r, "stages_224_ms": split}
    return figures


def own_forward(session: requests.Session, fn: FunctionProcess, body: bytes, runs: int) -> dict[str, float]:
    """`runs` 224 px requests one after another: their mean time and the mean of the function's own
    forward passes over the same requests (its metrics, which keep sums). The rest of a request is the
    one less the other (and the in-function stages): a difference over the same requests, which this
    process's own forward pass is not (the two differ by a few % from run to run, as much as the rest)."""
    for _ in range(2):
        post_ok(session, fn.url, body)
    before = forward_passes(session, fn)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        post_ok(session, fn.url, body)
        times.append(time.perf_counter() - started)
    passes = passes_since(before, forward_passes(session, fn))
    forward_s = passes["clip_encode_seconds_sum"] / passes["clip_batch_size_count"]
    return {"http_224_mean_ms": statistics.mean(times) * 1000, "served_batch1_forward_ms": forward_s * 1000}


def client(address: tuple[str, int], body: bytes, count: int) -> list[float]:
    """One client's latencies (s): `count` requests in a row on one keep-alive connection. http.client,
    not requests: the clients share the function's cores, and requests spends 0.8 ms of CPU on each
    round trip against 0.3 ms here (a 2-core EPYC), CPU the function would not lose to remote clients."""
    latencies = []
    connection = http.client.HTTPConnection(*address, timeout=600)
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", "/", body=body, headers={"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            answer = response.read()
            assert response.status == 200, answer
            latencies.append(time.perf_counter() - started)
    finally:
        connection.close()
    return latencies


# What the function's /metrics say of its forward passes: clip_encode_seconds_sum, clip_batch_size_sum/_count
FORWARD_PASSES = ("clip_encode_seconds_sum", "clip_batch_size_sum", "clip_batch_size_count")


def forward_passes(session: requests.Session, fn: FunctionProcess) -> dict[str, float]:
    found = metric_samples(session.get(f"{fn.url}/metrics", timeout=30).text)
    return {name: found[(name, ())] for name in FORWARD_PASSES}


def passes_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in FORWARD_PASSES}


@dataclass
class Load:
    """What one dtype's load rounds saw, summed over the rounds."""

    latencies: list[float] = field(default_factory=list)  # s, every request of every client
    elapsed: float = 0.0  # s, the rounds' wall time
    raw: list[float] = field(default_factory=list)  # s, the raw batch-8 median before each round
    peak: int = 0  # bytes, the function's highest RSS
    passes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FORWARD_PASSES, 0.0))  # the rounds'


LOAD_ROUNDS = 4


def load_figures(
    session: requests.Session,
    fns: Mapping[str, FunctionProcess],
    raws: Mapping[str, ClipModel],
    body: bytes,
    concurrent_requests: int,
) -> dict[str, dict[str, float]]:
    """8 concurrent clients per dtype, in LOAD_ROUNDS rounds alternating between the dtypes, each round
    right after the raw batch-8 figure it is compared with (the machine's speed drifts). The function's
    own metrics say where the difference goes: the share of the rounds its model thread was in a forward
    pass, and its forward pass per image against the raw one."""
    load = {d: Load() for d in fns}
    each = max(1, concurrent_requests // LOAD_ROUNDS)
    for _ in range(LOAD_ROUNDS):
        for d, fn in fns.items():
            # no warm-up requests here: one alone would leave the batcher expecting lone requests, and the
            # round would start with a batch of 1 and one of 7 (as a burst after idle does) instead of 8s
            eight = torch.randn(8, 3, raws[d].image_size, raws[d].image_size)
            load[d].raw.append(median_time(lambda: raws[d].encode_images(eight), 5, warmup=1))
            time.sleep(0.3)
            before = forward_passes(session, fn)
            with (
                RssSampler(psutil.Process(fn.started.pid), interval=0.05) as sampler,
                ThreadPoolExecutor(8) as pool,
            ):
                started = time.perf_counter()
                per_client = list(pool.map(lambda _: client(fn.address, body, each), range(8)))
                load[d].elapsed += time.perf_counter() - started
            for name, added in passes_since(before, forward_passes(session, fn)).items():
                load[d].passes[name] += added
            load[d].latencies += [x for c in per_client for x in c]
            load[d].peak = max(load[d].peak, sampler.peak)
            time.sleep(0.3)
    return {d: load_summary(figures) for d, figures in load.items()}


def load_summary(figures: Load) -> dict[str, float]:
    raw_s = statistics.mean(figures.raw)  # one batch of 8
    encode_s, images, batches = (figures.passes[name] for name in FORWARD_PASSES)
    return {
        "raw_batch8_images_per_s": 8 / raw_s,
        "http_8_clients_images_per_s": len(figures.latencies) / figures.elapsed,
        "http_8_clients_p50_ms": percentile(figures.latencies, 50) * 1000,
        "http_8_clients_p99_ms": percentile(figures.latencies, 99) * 1000,
        "rss_under_load_peak_mb": figures.peak / 2**20,
        # where a shortfall goes: the model thread idle between passes, or a pass slower than the raw one
        "load_model_busy_share": encode_s / figures.elapsed,
        "load_mean_batch": images / batches,
        "load_forward_per_image_ms": encode_s / images * 1000,
        "raw_batch8_per_image_ms": raw_s / 8 * 1000,
    }


def start_functions(
    stack: contextlib.ExitStack, envs: Mapping[str, Mapping[str, str]], workdir: Path
) -> tuple[dict[str, FunctionProcess], str, dict[str, FunctionProcess]]:
    """Each dtype's function, the local gateway in front of them, and each behind the real of-watchdog
    where that can run; `stack` stops them all. Returns (functions, the gateway's URL, those behind the watchdog)."""
    fns = {d: stack.enter_context(FunctionProcess("clip", workdir / f"serve-{d}", env)) for d, env in envs.items()}
    # the gateway's proxy (the `scripts/serve` hop) in its own process, in front of the running functions
    gateway = Stack(workdir / "gateway", upstreams={d: fn.port for d, fn in fns.items()})
    stack.callback(gateway.stop, 10)
    gateway_url = gateway.start(timeout=30, interval=0.1).url
    # the same function behind the real of-watchdog, as its image runs it (the hop every deployment has)
    watchdog, why_not = watchdog_for_many()
    behind: dict[str, FunctionProcess] = {}
    if why_not:
        print(f"bench: the of-watchdog figure is skipped: {why_not}", file=sys.stderr)
    else:
        behind = {
            d: stack.enter_context(FunctionProcess("clip", workdir / f"watchdog-{d}", env, watchdog=watchdog))
            for d, env in envs.items()
        }
    return fns, gateway_url, behind


def serve_figures(
    args: argparse.Namespace, raws: Mapping[str, ClipModel]
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """The served figures of each dtype's function, measured in alternating rounds beside the raw
    forward pass (raws: dtype -> the model in this process)."""
    workdir = Path(tempfile.mkdtemp(prefix="clip-bench-"))
    label_set = LABEL_SETS["cifar100"]
    envs = {
        d: {
            "CLIP_MODEL": args.model,
            "CLIP_PRETRAINED": "none",
            "CLIP_CACHE_DIR": str(Path(args.cache_dir)),
            "LOG_LEVEL": "WARNING",
            "CLIP_DTYPE": d,
        }
        for d in raws
    }
    results = cold_starts(envs, raws, Path(args.cache_dir), label_set, workdir)

    small = jpeg(photo(224, 224, seed=1))
    large = jpeg(photo(4000, 3000, seed=2))
    sizes = {"224x224": len(small), "4000x3000": len(large)}
    with contextlib.ExitStack() as stack:
        fns, gateway_url, behind = start_functions(stack, envs, workdir)
        session = stack.enter_context(requests.Session())
        session.trust_env = False
        for d, fn in fns.items():
            results[d].update(at_rest(session, fn))
        for d, figures in request_figures(
            session, raws, fns, gateway_url, behind, small, large, label_set, args.runs
        ).items():
            results[d].update(figures)
        for d, loaded in load_figures(session, fns, raws, small, args.concurrent_requests).items():
            results[d].update(loaded)
    first = next(iter(raws))
    results[first]["original_design_s"] = statistics.median(
        original_design(args.model, small, label_set.labels) for _ in range(2)
    )
    return results, sizes
