"""scripts/loadtest: python -m benchmarks.loadtest --help (the package's docstring says what it does)."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import benchmarks.loadtest
from benchmarks.loadtest.payloads import hostile_payloads, payloads
from benchmarks.loadtest.report import finish, hostile_rows, main_rows, new_report, overload_rows, p99_bound
from benchmarks.loadtest.run import Target, hostile_phase, main_phase, overload_phase
from localrun import ROOT


def parse_args() -> argparse.Namespace:
    doc = benchmarks.loadtest.__doc__ or ""
    parser = argparse.ArgumentParser(
        prog="scripts/loadtest",
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(doc.splitlines()[2:]),
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120, help="seconds of the main phase")
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument(
        "--target",
        choices=("clip", "index", "both"),
        default="clip",
        help="clip: the clip function directly (default, the model's own HTTP server); "
        "index: through the local gateway to index, which forwards to clip; "
        "both: through the gateway, each request to clip or index at random",
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--cache-dir",
        default=str(ROOT / "bench-results" / "cache"),
        help="CLIP_CACHE_DIR (label embeddings), shared with scripts/bench",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 s main phase, 5 s overload")
    parser.add_argument("--no-overload", action="store_true", help="skip the overload phase")
    parser.add_argument("--no-hostile", action="store_true", help="skip the hostile-heavy phase")
    parser.add_argument("--hostile-duration", type=float, default=30)
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--overload-duration", type=float, default=10)
    parser.add_argument(
        "--no-backoff",
        action="store_true",
        help="overload clients retry at once after a 429 instead of waiting Retry-After",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None, help="default: bench-results/loadtest-<time>.json")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.overload_duration = min(args.duration, 20), min(args.overload_duration, 5)
        args.hostile_duration = min(args.hostile_duration, 10)
    return args


def main() -> int:
    args = parse_args()
    out = Path(args.json or ROOT / "bench-results" / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    cache = Path(args.cache_dir)
    env = {
        "CLIP_MODEL": args.model,
        "CLIP_PRETRAINED": "none",
        "CLIP_CACHE_DIR": str(cache),
        "CLIP_PRELOAD_LABEL_SETS": "cifar100,cifar10",
        "LOG_LEVEL": "WARNING",
    }
    if not any(cache.glob("embeddings/cifar100-*.npy")):
        print(
            f"no label-embedding cache in {cache}: the first start builds it (minutes on a small CPU)", file=sys.stderr
        )
    good, bad = payloads()
    report = new_report(vars(args), env, good, bad)
    workdir = Path(tempfile.mkdtemp(prefix="clip-loadtest-"))

    started = time.perf_counter()
    stack = Target(args.target, env, workdir / "main").start()
    print(f"ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    try:
        first = report["main"] = main_phase(args, stack, good, bad)
        rows = main_rows(first)
        limits = stack.describe().get("limits") or {}
        bound = p99_bound(first, limits)
        if not args.no_hostile:
            hostile = report["hostile"] = hostile_phase(args, stack, good, hostile_payloads(), first)
            rows += hostile_rows(hostile, bound)
        if not args.no_overload:
            over = report["overload"] = overload_phase(args, stack, good, bad, "default settings")
            over["p99_bound_ms"] = bound
            rows += overload_rows(over, bound, limits)
        problems = stack.log_problems()
    finally:
        stack.stop()
    report["main"]["log_problems"] = problems[:20]
    rows.append(("ERROR / Traceback lines in the function logs", len(problems), "= 0", not problems))

    return finish(report, rows, out, workdir)


if __name__ == "__main__":
    sys.exit(main())
