"""scripts/bench --gpu: how far the GPU path gets, from the raw model to served images/s.

    scripts/bench --gpu [--workers 1,4,8] [--duration 8] [--connections 64,256]

1. raw encode_image (fp16 on CUDA) by batch size;
2. decode ceilings for a 640×480 JPEG: Pillow path (1 thread, all cores in one process), the device
   decoder (torchvision.io.decode_jpeg on the device + resize/crop/normalise there) alone and with
   the forward pass; and its agreement with the Pillow path (top-1, largest |Δp|) on the bench photos;
3. served: the real template host (FunctionProcess, FUNCTION_WORKERS processes) under `wrk` at each
   connection count, single-image and 16-image requests, with p50/p99 from wrk, status counts,
   and the GPU's utilisation sampled by nvidia-smi every 200 ms.
Without CUDA it says so and measures nothing (`--device cpu` runs it on the CPU as a smoke test).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import psutil
import torch
from clip import model as model_module
from clip.device_decode import DeviceDecoder
from clip.images import load_image
from clip.labels import LABEL_SETS
from clip.model import ClipModel

from benchmarks.measure import print_table
from benchmarks.pictures import jpeg, photo
from localrun import FunctionProcess

# A request body for wrk: (the file holding it, its Content-Type, the pictures it carries)
WrkBody = tuple[Path, str, int]

WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local merged, parts = {}, {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do merged[code] = (merged[code] or 0) + n end
  end
  for code, n in pairs(merged) do table.insert(parts, string.format('"%d": %d', code, n)) end
  io.write(string.format('WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "socket_errors": %d, "statuses": {%s}}\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max, summary.errors.connect + summary.errors.read +
    summary.errors.write + summary.errors.timeout, table.concat(parts, ", ")))
end
"""


def rate(fn: Callable[[], object], images: int, seconds: float = 2.0, sync: Callable[[], None] | None = None) -> float:
    """Images per second of fn() (which handles `images` images), run for about `seconds`."""
    fn()
    sync and sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        count += 1
    sync and sync()
    return count * images / (time.perf_counter() - started)


def raw_model(clip: ClipModel, sync: Callable[[], None] | None, batches: Sequence[int]) -> dict[int, float]:
    out = {}
    for batch in batches:
        x = torch.randn(batch, 3, clip.image_size, clip.image_size, device=clip.device)
        out[batch] = rate(lambda: clip.encode_images(x), batch, sync=sync)
        print(f"raw encode_image batch {batch}: {out[batch]:,.0f} images/s", file=sys.stderr, flush=True)
    return out


def decode_ceilings(
    clip: ClipModel, sync: Callable[[], None] | None, batch: int = 64
) -> tuple[dict[str, float], DeviceDecoder]:
    data = jpeg(photo(640, 480, seed=1))
    pillow = lambda: clip.prepare(load_image(data, 50_000_000, clip.image_size))  # noqa: E731
    cores = os.cpu_count() or 1
    out = {"pillow_1_thread": rate(pillow, 1)}
    with ThreadPoolExecutor(cores) as pool:
        out[f"pillow_{cores}_threads"] = rate(lambda: list(pool.map(lambda _: pillow(), range(cores * 4))), cores * 4)
    decoder = DeviceDecoder(clip)
    job = decoder.accept(data, 50_000_000)
    if job is None:
        raise RuntimeError("the bench photo is not one the device decoder takes")
    jobs = [job] * batch
    out[f"device_decode_batch_{batch}"] = rate(lambda: decoder.preprocess(jobs), batch, sync=sync)
    out[f"device_decode_and_encode_batch_{batch}"] = rate(lambda: decoder.encode(jobs), batch, sync=sync)
    for name, value in out.items():
        print(f"decode {name}: {value:,.0f} images/s", file=sys.stderr, flush=True)
    return out, decoder


def agreement(clip: ClipModel, decoder: DeviceDecoder) -> dict[str, Any]:
    """Device path against Pillow path on the bench photos: same top-1? largest |Δp| over CIFAR-100, and
    the feature cosine (with random weights the scores are near uniform, so |Δp| alone says little)."""
    labels = clip.encode_texts([f"a photo of a {name}." for name in LABEL_SETS["cifar100"].labels]).numpy()
    worst, same, cosine = 0.0, True, 1.0
    rows: dict[str, dict[str, float | bool]] = {}
    for i, (w, h) in enumerate([(640, 480), (224, 224), (1024, 768), (4000, 3000), (300, 1000), (1920, 1080)]):
        data = jpeg(photo(w, h, seed=i))
        device = decoder.encode([decoder.accept(data, 50_000_000)])[0].numpy()
        pillow = clip.encode_prepared([clip.prepare(load_image(data, 50_000_000, clip.image_size))])[0].numpy()
        p = [np.exp(clip.logit_scale * labels @ f - (clip.logit_scale * labels @ f).max()) for f in (device, pillow)]
        p = [v / v.sum() for v in p]
        delta, top1 = float(np.abs(p[0] - p[1]).max()), int(p[0].argmax()) == int(p[1].argmax())
        cos = float(device @ pillow / (np.linalg.norm(device) * np.linalg.norm(pillow)))
        rows[f"{w}x{h}"] = {"max_abs_dp": delta, "same_top1": top1, "feature_cosine": cos}
        worst, same, cosine = max(worst, delta), same and top1, min(cosine, cos)
    return {"worst_abs_dp": worst, "all_same_top1": same, "worst_feature_cosine": cosine, "photos": rows}


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 200 ms while the load runs."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.samples: list[tuple[float, float]] = []

    def __enter__(self) -> Self:
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.process:
            self.process.terminate()
            out, _ = self.process.communicate(timeout=10)
            for line in out.splitlines():
                try:
                    util, memory = (float(v) for v in line.split(","))
                    self.samples.append((util, memory))
                except ValueError:
                    pass

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        utils = [u for u, _ in self.samples]
        return {
            "gpu_util_mean_pct": statistics.fmean(utils),
            "gpu_util_max_pct": max(utils),
            "gpu_memory_max_mib": max(m for _, m in self.samples),
            "samples": len(utils),
        }


def request_bodies(workdir: Path) -> dict[str, WrkBody]:
    single = jpeg(photo(640, 480, seed=1))
    boundary = "clipbenchboundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + jpeg(photo(640, 480, seed=i))
        + b"\r\n"
        for i in range(16)
    ]
    multi = b"".join(parts) + f"--{boundary}--\r\n".encode()
    (workdir / "single.jpg").write_bytes(single)
    (workdir / "sixteen.multipart").write_bytes(multi)
    return {
        "single": (workdir / "single.jpg", "image/jpeg", 1),
        "16 images": (workdir / "sixteen.multipart", f"multipart/form-data; boundary={boundary}", 16),
    }


def wrk_run(wrk: str, url: str, body: WrkBody, connections: int, duration: int, script: Path) -> dict[str, Any]:
    path, content_type, images = body
    env = {**os.environ, "WRK_BODY": str(path), "WRK_CONTENT_TYPE": content_type}
    threads = max(1, min(connections, (os.cpu_count() or 2) // 4))
    with GpuSampler() as gpu:
        done = subprocess.run(
            [
                wrk,
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                f"{duration}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                url,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=duration + 60,
        )
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result:\n{done.stdout}\n{done.stderr}")
    result = json.loads(line[len("WRK_JSON ") :])
    seconds = result["duration_us"] / 1e6
    ok = result["statuses"].get("200", 0)
    return {
        "images_per_s": ok * images / seconds,
        "requests_per_s": result["requests"] / seconds,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "max_ms": result["max_us"] / 1000,
        "statuses": result["statuses"],
        "socket_errors": result["socket_errors"],
        "server_errors_5xx": sum(n for code, n in result["statuses"].items() if code.startswith("5")),
        **(gpu.summary() or {}),
    }


def served(args: argparse.Namespace, device: str, workdir: Path) -> list[dict[str, Any]] | None:
    wrk = shutil.which(args.wrk)
    if not wrk:
        print(f"bench --gpu: no '{args.wrk}' on PATH (Debian's wrk package): served figures skipped", file=sys.stderr)
        return None
    script = workdir / "bench.lua"
    script.write_text(WRK_SCRIPT)
    bodies = request_bodies(workdir)
    out = []
    for workers in args.workers:
        env = {
            "CLIP_MODEL": args.model,
            "CLIP_PRETRAINED": "none",
            "CLIP_DEVICE": device,
            "CLIP_CACHE_DIR": args.cache_dir,
            "LOG_LEVEL": "WARNING",
            "FUNCTION_WORKERS": str(workers),
            "CLIP_MAX_BATCH": str(args.max_batch),
            "CLIP_MAX_QUEUE": str(args.max_queue),
            "FUNCTION_THREADS": str(args.function_threads),
            "CLIP_DEVICE_DECODE": args.device_decode,
            "CLIP_THREADS": str(max(2, (os.cpu_count() or 2) // workers)),
        }  # the cores, shared out
        started = time.perf_counter()
        with FunctionProcess("clip", workdir / f"workers-{workers}", env) as fn:
            ready_s = time.perf_counter() - started
            for name, body in bodies.items():
                for connections in args.connections:
                    row = {
                        "workers": workers,
                        "request": name,
                        "connections": connections,
                        "ready_s": ready_s,
                        **wrk_run(wrk, fn.url, body, connections, args.duration, script),
                    }
                    row["memory_mb"] = host_memory_mb(fn.host_pid)  # after the load: what the workers hold
                    out.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def host_memory_mb(pid: int) -> dict[str, float | list[float]]:
    """Resident memory (MB) of the template host `pid` and of each of its worker processes (psutil, as
    measure.tree_rss reads it)."""
    host = psutil.Process(pid)
    workers = []
    for child in host.children():
        try:
            workers.append(round(child.memory_info().rss / 2**20, 1))
        except psutil.Error:
            pass  # gone meanwhile
    return {"host": round(host.memory_info().rss / 2**20, 1), "workers": sorted(workers)}


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    device: str = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "bench --gpu: no CUDA device is visible (torch.cuda.is_available() is False): nothing measured. "
            "Run it on a machine with an NVIDIA GPU (scripts/gpu-check), or with --device cpu as a smoke test."
        )
        return None
    sync = torch.cuda.synchronize if device == "cuda" else None
    clip = model_module.create(args.model, "none", device=device)
    report: dict[str, Any] = {
        "model": args.model,
        "device": device,
        "dtype": str(clip.dtype),
        "settings": {
            k: getattr(args, k)
            for k in (
                "workers",
                "connections",
                "duration",
                "max_batch",
                "max_queue",
                "function_threads",
                "device_decode",
            )
        },
    }
    report["raw_images_per_s"] = raw_model(clip, sync, args.batches)
    report["decode_images_per_s"], decoder = decode_ceilings(clip, sync)
    report["device_vs_pillow"] = agreement(clip, decoder)
    del clip, decoder
    if device == "cuda":
        torch.cuda.empty_cache()
    report["served"] = served(args, device, Path(tempfile.mkdtemp(prefix="clip-bench-gpu-")))
    rows = [(f"raw batch {b}", v, "") for b, v in report["raw_images_per_s"].items()]
    rows += [(f"decode {k}", v, "") for k, v in report["decode_images_per_s"].items()]
    for r in report["served"] or []:
        rows.append(
            (
                f"served, {r['workers']} workers, {r['request']}, {r['connections']} conn",
                r["images_per_s"],
                f"p50 {r['p50_ms']:.0f} / p99 {r['p99_ms']:.0f} ms, 5xx {r['server_errors_5xx']}, "
                f"429 {r['statuses'].get('429', 0)}, GPU {r.get('gpu_util_mean_pct', float('nan')):.0f} %, "
                f"RSS per worker {max(r['memory_mb']['workers'] or [r['memory_mb']['host']]):.0f} MB",
            )
        )
    print_table(["figure", "images/s", "detail"], rows)
    agree = report["device_vs_pillow"]
    print(
        f"device decode vs Pillow: same top-1 on all bench photos: {agree['all_same_top1']}, "
        f"worst |Δp| {agree['worst_abs_dp']:.4f}, worst feature cosine {agree['worst_feature_cosine']:.5f}"
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--gpu")
    group.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of this script")
    group.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 8])
    group.add_argument("--connections", type=lambda s: [int(v) for v in s.split(",")], default=[64, 256])
    group.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 64, 128, 256])
    group.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    group.add_argument("--max-batch", type=int, default=64)
    group.add_argument("--max-queue", type=int, default=512, help="CLIP_MAX_QUEUE, the whole function's")
    group.add_argument("--function-threads", type=int, default=160)
    group.add_argument("--device-decode", default="auto")
    group.add_argument("--wrk", default="wrk")
