"""Benchmark: the clip function against the model's own forward time, all in one run on one machine.

    scripts/bench                 # the speed figures (ViT-B-32, random weights: same compute as real ones)
    scripts/bench --models        # the model-choice table (raw latency / throughput per architecture)
    scripts/bench --dtypes fp32,bf16   # both dtypes side by side (the default where bf16 is native)
    scripts/bench --numerics      # only bf16 against fp32: feature cosines and CIFAR-100 |Δp|
    scripts/bench --gpu           # the GPU figures (benchmarks/bench_gpu.py; says so and skips without CUDA)
    scripts/bench --intake        # host CPU per request before the model: parse and checks (benchmarks/intake.py)
    scripts/bench --embeddings    # embeddings out: answer bytes and ms, texts/s (benchmarks/embeddings_out.py)
    scripts/bench --model-thread  # served vs raw per CLIP_MAX_BATCH, 8 and 32 clients (benchmarks/model_thread.py)

Prints tables (figure, value, reference, ratio; a per-stage breakdown of one request; bf16 against
fp32) and writes JSON (bench-results/*.json). Every figure names the dtype and why it was chosen.
"""

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from clip import precision
from clip.labels import SIMPLE_TEMPLATES

from benchmarks import bench_gpu, embeddings_out, intake, model_thread
from benchmarks.bench_tables import models_report, print_models, print_served, print_sweep
from benchmarks.forward import create, models_figures, sweep
from benchmarks.measure import machine
from benchmarks.numerics import numerics
from benchmarks.served import serve_figures
from localrun import ROOT


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", action="store_true", help="the model-choice table instead")
    parser.add_argument("--numerics", action="store_true", help="only bf16 against fp32 (cosines, CIFAR-100 |Δp|)")
    parser.add_argument("--sweep", action="store_true", help="only raw images/s per batch size and dtype")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated, e.g. fp32,bf16 (default: fp32,bf16 where bf16 is native, else fp32)",
    )
    parser.add_argument("--gpu", action="store_true", help="the GPU figures instead (benchmarks/bench_gpu.py)")
    parser.add_argument("--intake", action="store_true", help="only the host CPU cost of parsing and checking bodies")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per latency figure")
    parser.add_argument(
        "--concurrent-requests", type=int, default=48, help="requests per client, 8 clients, over 4 rounds"
    )
    parser.add_argument("--cache-dir", default=str(ROOT / "bench-results" / "cache"))
    parser.add_argument("--out", default=None)
    bench_gpu.add_arguments(parser)
    intake.add_arguments(parser)
    embeddings_out.add_arguments(parser)
    model_thread.add_arguments(parser)
    return parser.parse_args()


def mode_of(args: argparse.Namespace) -> str:
    """The JSON file's name: the first of these options given (main() checks them in another order)."""
    modes = ("models", "gpu", "numerics", "sweep", "intake", "embeddings", "model_thread")
    return next((mode for mode in modes if getattr(args, mode)), "bench")


def served(args: argparse.Namespace, dtypes: list[str], native: bool, report: dict[str, Any]) -> None:
    """The default run: the served figures beside the raw ones, then bf16 against fp32 when both ran."""
    raws = {d: create(args.model, d) for d in dtypes}  # the raw references, measured beside the served figures
    results, sizes = serve_figures(args, raws)
    report.update(model=args.model, jpeg_bytes=sizes, served=results)
    print_served(results, dtypes)
    if "bf16" in dtypes and "fp32" in dtypes:
        report["numerics"] = numerics(args.model, None if native else SIMPLE_TEMPLATES)
        print(f"\nbf16 against fp32: {json.dumps(report['numerics'])}")


def main() -> None:
    args = parse_args()
    out = Path(args.out or ROOT / "bench-results" / f"{mode_of(args)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    native = report["machine"]["native_bf16"] or torch.cuda.is_available()
    dtypes = [d.strip() for d in (args.dtypes or ("fp32,bf16" if native else "fp32")).split(",") if d.strip()]
    auto = precision.choose("auto", "cuda" if torch.cuda.is_available() else "cpu")
    report.update(dtypes=dtypes, auto={"dtype": auto.name, "reason": auto.reason})
    print(f"processor: {report['machine']['cpu']}; CLIP_DTYPE=auto -> {auto.name}: {auto.reason}")
    if "bf16" not in dtypes and not (args.numerics or args.intake):
        print(
            "bf16: not measured, this processor has no native bf16 (emulated bf16 is many times slower than "
            "fp32); force it with --dtypes fp32,bf16"
        )

    if args.intake:
        report["intake"] = intake.run(args)
    elif args.embeddings:
        report["embeddings"] = embeddings_out.run(args, dtypes)
    elif args.model_thread:
        report["model_thread"] = model_thread.run(args, dtypes)
    elif args.gpu:
        report["gpu"] = bench_gpu.run(args)
        if report["gpu"] is None:
            return
    elif args.numerics:
        report["numerics"] = numerics(args.model, None if native else SIMPLE_TEMPLATES)
        print(json.dumps(report["numerics"], indent=2))
    elif args.sweep:
        report["sweep"] = sweep(args.model, dtypes, args.runs)
        print_sweep(report["sweep"], dtypes)
    elif args.models:
        by_model = models_figures(dtypes, runs=max(5, args.runs // 4))
        report["models"] = models_report(by_model, dtypes)
        print_models(by_model, dtypes)
    else:
        served(args, dtypes, native, report)
    report["load_average_1m_at_end"] = os.getloadavg()[0]
    print(f"\nmachine: {report['machine']}; load average at the end: {report['load_average_1m_at_end']:.1f}")
    out.write_text(json.dumps(report, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
