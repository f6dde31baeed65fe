"""scripts/bench --model-thread: the served function against the raw forward pass, per CLIP_MAX_BATCH.

    scripts/bench --model-thread [--max-batches 8,16,32] [--dtypes bf16]

For each dtype: raw encode_image at batch 1 (median ms) and batch 8 (images/s), run on a thread that then
ends, as the function's model thread runs it beside no other OpenMP pool (docs/performance.md, "The model
thread at full speed"); then one clip function per CLIP_MAX_BATCH (a real process, the template host, no
gateway): a lone 224x224 JPEG's p50 (requests 20 ms apart) and images/s for 8 and 32 clients."""

import argparse
import statistics
import tempfile
import threading
import time
from typing import Any

import requests
import torch

from benchmarks.forward import create
from benchmarks.pictures import jpeg, photo
from localrun import FunctionProcess

SINGLE_RUNS = 30
IMAGES_PER_LOAD = 192


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--model-thread")
    group.add_argument("--model-thread", action="store_true", help="only served vs raw per CLIP_MAX_BATCH")
    group.add_argument("--max-batches", default="8,16,32", help="CLIP_MAX_BATCH values, comma-separated")


def raw(model: str, dtype: str, runs: int) -> dict[str, float]:
    """Batch 1 ms and batch 8 images/s of the raw model, on a thread of its own that ends afterwards."""
    figures: dict[str, float] = {}

    def measure() -> None:
        clip = create(model, dtype)
        for size, key in ((1, "batch1_ms"), (8, "batch8_images_s")):
            batch = torch.randn(size, 3, clip.image_size, clip.image_size)
            for _ in range(3):
                clip.encode_images(batch)
            times = []
            for _ in range(runs if size == 1 else max(3, runs // 4)):
                started = time.perf_counter()
                clip.encode_images(batch)
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            figures[key] = median * 1000 if size == 1 else size / median

    thread = threading.Thread(target=measure, name="raw")
    thread.start()
    thread.join()
    return figures


def served(model: str, dtype: str, max_batch: int, cache_dir: str, body: bytes) -> dict[str, float]:
    env = {
        "CLIP_MODEL": model,
        "CLIP_PRETRAINED": "none",
        "CLIP_DTYPE": dtype,
        "CLIP_CACHE_DIR": cache_dir,
        "CLIP_MAX_BATCH": str(max_batch),
    }
    with tempfile.TemporaryDirectory() as work, FunctionProcess("clip", work, env) as fn:
        session = requests.Session()
        for _ in range(5):
            session.post(fn.url, data=body, timeout=120).raise_for_status()
        single = []
        for _ in range(SINGLE_RUNS):
            time.sleep(0.02)
            started = time.perf_counter()
            session.post(fn.url, data=body, timeout=120).raise_for_status()
            single.append(time.perf_counter() - started)
        figures = {"single_p50_ms": statistics.median(single) * 1000}
        for clients in (8, 32):
            figures[f"clients{clients}_images_s"] = load(fn.url, body, clients)
        return figures


def load(url: str, body: bytes, clients: int) -> float:
    each = IMAGES_PER_LOAD // clients

    def client() -> None:
        session = requests.Session()
        for _ in range(each):
            session.post(url, data=body, timeout=300).raise_for_status()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * each / (time.perf_counter() - started)


def run(args: argparse.Namespace, dtypes: list[str]) -> dict[str, Any]:
    body = jpeg(photo(224, 224, seed=3))
    report: dict[str, Any] = {}
    for dtype in dtypes:
        reference = raw(args.model, dtype, args.runs)
        rows = {}
        for max_batch in [int(b) for b in args.max_batches.split(",")]:
            figures = served(args.model, dtype, max_batch, args.cache_dir, body)
            rows[max_batch] = figures
            print(
                f"{dtype} CLIP_MAX_BATCH={max_batch}: single p50 {figures['single_p50_ms']:.1f} ms "
                f"({figures['single_p50_ms'] / reference['batch1_ms']:.2f}x raw batch 1, "
                f"{reference['batch1_ms']:.1f} ms); 8 clients {figures['clients8_images_s']:.1f} images/s "
                f"({figures['clients8_images_s'] / reference['batch8_images_s']:.2f}x raw batch 8, "
                f"{reference['batch8_images_s']:.1f}); 32 clients {figures['clients32_images_s']:.1f} images/s",
                flush=True,
            )
        report[dtype] = {"raw": reference, "served": rows}
    return report
