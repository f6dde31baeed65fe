"""Benchmark: the clip function against the model's own forward time, all in one run on one machine.

    scripts/bench                 # the speed figures (ViT-B-32, random weights: same compute as real ones)
    scripts/bench --models        # the model-choice table (raw latency / throughput per architecture)
    scripts/bench --dtypes fp32,bf16   # both dtypes side by side (the default where bf16 is native)
    scripts/bench --numerics      # only bf16 against fp32: feature cosines and CIFAR-100 |Δp|
    scripts/bench --gpu           # the GPU figures (benchmarks/bench_gpu.py; says so and skips without CUDA)
    scripts/bench --intake        # host CPU per request before the model: parse and checks (benchmarks/intake.py)

Prints tables (figure, value, reference, ratio; a per-stage breakdown of one request; bf16 against
fp32) and writes JSON (bench-results/*.json). Every figure names the dtype and why it was chosen.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from clip import model as model_module
from clip import precision
from clip.images import load_image
from clip.labels import LABEL_SETS, SIMPLE_TEMPLATES, LabelStore, class_embeddings
from clip.service import Service
from PIL import Image

from benchmarks.measure import RssSampler, machine, percentile, print_table
from benchmarks.pictures import jpeg, photo
from localrun import ROOT, FunctionProcess, Stack
from localrun.of_watchdog import watchdog_for_many

# Published zero-shot CIFAR-100 accuracy (open_clip's results table; MobileCLIP2 from Apple's tables).
MODELS = [
    ("ViT-B-32", "datacomp_xl_s13b_b90k", 80.3),
    ("ViT-B-32-256", "datacomp_s34b_b86k", 82.9),
    ("ViT-B-16", "datacomp_xl_s13b_b90k", 82.1),
    ("MobileCLIP2-S0", "dfndr2b", 77.8),
    ("MobileCLIP2-S2", "dfndr2b", 84.8),
    ("ViT-L-14", "datacomp_xl_s13b_b90k", 87.4),
]


def timings(fn, runs, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def median_time(fn, runs, warmup=3):
    return statistics.median(timings(fn, runs, warmup))


def interleaved(named, rounds, pause=0.3):
    """Median time of each fn, measured in alternating rounds: a shared machine's speed drifts over a run
    (other tenants), and a ratio of two figures is only fair if both saw the same drift. The pause lets
    the other process's OpenMP threads stop spinning before the next figure's round."""
    samples = {name: [] for name in named}
    for _ in range(rounds):
        for name, (fn, runs) in named.items():
            samples[name] += timings(fn, runs, warmup=2)
            time.sleep(pause)
    return {name: statistics.median(values) for name, values in samples.items()}


def create(name, dtype):
    return model_module.create(name, "none", device=os.environ.get("CLIP_DEVICE", "auto"), dtype=dtype)


def raw_model(name, runs, dtype="fp32"):
    """open_clip's encode_image alone, batch 1 and batch 8, in this process."""
    clip = create(name, dtype)
    size = clip.image_size
    batch = torch.randn(8, 3, size, size)
    one = median_time(lambda: clip.encode_images(batch[:1]), runs)
    eight = median_time(lambda: clip.encode_images(batch), max(3, runs // 4))
    params = sum(p.numel() for p in clip.model.parameters())
    return clip, {
        "batch1_ms": one * 1000,
        "batch8_images_per_s": 8 / eight,
        "params_m": params / 1e6,
        "image_size": size,
    }


def original_design(name, image_bytes, tokenizer_labels):
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


def cold_start(env, workdir):
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
            if fn.process.poll() is not None:
                raise RuntimeError(fn.output())
            if time.perf_counter() - started > 600:
                raise TimeoutError("no answer within 600 s")
            time.sleep(0.02)
    finally:
        fn.stop()


def stages(clip, body, label_set):
    """Each in-function stage of one request as a callable, with the function's own code in this process."""
    image = load_image(body, 50_000_000, clip.image_size)
    batch = clip.to_batch([clip.prepare(image)])
    features = clip.encode_images(batch)[0]
    rng = np.random.default_rng(0)  # ranking's cost does not depend on the embeddings' values
    embeddings = rng.standard_normal((len(label_set.labels), features.shape[0])).astype(np.float32)
    ranker = types.SimpleNamespace(model=clip)  # Service.rank needs only the model's logit scale
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
        "model (encode_image, batch 1)": lambda: clip.encode_images(batch),
        "ranking (softmax over the label set, top 5)": lambda: Service.rank(
            ranker, features, label_set.labels, embeddings, 5
        ),
        "JSON (the answer's body)": lambda: json.dumps(answer),
    }


def serve_figures(args, raws):
    """The served figures of each dtype's function, measured in alternating rounds beside the raw
    forward pass (raws: dtype -> the model in this process)."""
    workdir = Path(tempfile.mkdtemp(prefix="clip-bench-"))
    cache = Path(args.cache_dir)
    label_set = LABEL_SETS["cifar100"]
    envs = {
        d: {
            "CLIP_MODEL": args.model,
            "CLIP_PRETRAINED": "none",
            "CLIP_CACHE_DIR": str(cache),
            "LOG_LEVEL": "WARNING",
            "CLIP_DTYPE": d,
        }
        for d in raws
    }
    results = {d: {} for d in raws}
    for d, env in envs.items():
        had_cache = Path(LabelStore(raws[d], str(cache)).cache_path(label_set)).exists()
        first = cold_start(env, workdir / f"first-{d}")
        results[d]["cold_start_without_cache_s" if not had_cache else "cold_start_first_s"] = first
        results[d]["cold_start_s"] = cold_start(env, workdir / f"second-{d}")

    small = jpeg(photo(224, 224, seed=1))
    large = jpeg(photo(4000, 3000, seed=2))
    sizes = {"224x224": len(small), "4000x3000": len(large)}
    with contextlib.ExitStack() as stack:
        fns = {d: stack.enter_context(FunctionProcess("clip", workdir / f"serve-{d}", env)) for d, env in envs.items()}
        # the gateway's proxy (the `scripts/serve` hop) in its own process, in front of the running functions
        gateway = Stack(workdir / "gateway", upstreams={d: fn.port for d, fn in fns.items()})
        stack.callback(gateway.stop, 10)
        gateway_url = gateway.start(timeout=30, interval=0.1).url
        # the same function behind the real of-watchdog, as its image runs it (the hop every deployment has)
        watchdog, why_not = watchdog_for_many()
        behind = {}
        if why_not:
            print(f"bench: the of-watchdog figure is skipped: {why_not}", file=sys.stderr)
        else:
            behind = {
                d: stack.enter_context(FunctionProcess("clip", workdir / f"watchdog-{d}", env, watchdog=watchdog))
                for d, env in envs.items()
            }
        session = stack.enter_context(requests.Session())
        session.trust_env = False

        def once(url, body):
            response = session.post(url, data=body, timeout=600)
            assert response.status_code == 200, response.text

        for d, fn in fns.items():
            results[d]["rss_at_rest_mb"] = psutil.Process(fn.process.pid).memory_info().rss / 2**20
            results[d]["served_dtype"] = {
                k: v for k, v in session.get(fn.url, timeout=30).json().items() if k.startswith("dtype")
            }
            results[d]["max_batch"] = session.get(fn.url, timeout=30).json()["limits"]["max_batch"]
        rounds, named, inside = 4, {}, {}
        for d, fn in fns.items():
            one = torch.randn(1, 3, raws[d].image_size, raws[d].image_size)
            named[f"raw {d}"] = ((lambda c=raws[d], x=one: c.encode_images(x)), args.runs // rounds)
            named[f"small {d}"] = ((lambda u=fn.url: once(u, small)), args.runs // rounds)
            named[f"gateway {d}"] = ((lambda u=f"{gateway_url}/function/{d}": once(u, small)), args.runs // rounds)
            if d in behind:
                named[f"watchdog {d}"] = ((lambda u=behind[d].url: once(u, small)), args.runs // rounds)
            named[f"large {d}"] = ((lambda u=fn.url: once(u, large)), max(10, args.runs // 2) // rounds)
            inside[d] = stages(raws[d], small, label_set)  # in the same rounds: the same drift as the HTTP figures
            named.update({f"stage {d} {n}": (f, args.runs // rounds) for n, f in inside[d].items()})
        medians = interleaved(named, rounds)
        for d in fns:
            results[d]["raw_batch1_ms"] = medians[f"raw {d}"] * 1000  # the reference, beside the HTTP figures
            results[d]["http_224_p50_ms"] = medians[f"small {d}"] * 1000
            results[d]["gateway_224_p50_ms"] = medians[f"gateway {d}"] * 1000
            results[d]["http_4000x3000_p50_ms"] = medians[f"large {d}"] * 1000
            split = {n: medians[f"stage {d} {n}"] * 1000 for n in inside[d]}
            split["HTTP in and out, host, handler, batcher hand-off (the rest)"] = results[d]["http_224_p50_ms"] - sum(
                split.values()
            )
            split["gateway hop (scripts/serve's proxy)"] = (
                results[d]["gateway_224_p50_ms"] - results[d]["http_224_p50_ms"]
            )
            if d in behind:
                results[d]["watchdog_224_p50_ms"] = medians[f"watchdog {d}"] * 1000
                results[d]["watchdog_hop_ms"] = results[d]["watchdog_224_p50_ms"] - results[d]["http_224_p50_ms"]
            results[d]["stages_224_ms"] = split

        def client(url, count):
            latencies = []
            with requests.Session() as own:
                own.trust_env = False
                for _ in range(count):
                    started = time.perf_counter()
                    response = own.post(url, data=small, timeout=600)
                    assert response.status_code == 200, response.text
                    latencies.append(time.perf_counter() - started)
            return latencies

        load = {d: {"latencies": [], "elapsed": 0.0, "raw": [], "peak": 0} for d in fns}
        for _ in range(2):  # two alternating rounds of 8 clients per dtype
            for d, fn in fns.items():
                client(fn.url, 2)
                eight = torch.randn(8, 3, raws[d].image_size, raws[d].image_size)
                load[d]["raw"].append(median_time(lambda: raws[d].encode_images(eight), 5, warmup=1))
                time.sleep(0.3)
                with (
                    RssSampler(psutil.Process(fn.process.pid), interval=0.05) as sampler,
                    ThreadPoolExecutor(8) as pool,
                ):
                    started = time.perf_counter()
                    per_client = list(
                        pool.map(lambda _: client(fn.url, max(1, args.concurrent_requests // 2)), range(8))
                    )
                    load[d]["elapsed"] += time.perf_counter() - started
                load[d]["latencies"] += [x for c in per_client for x in c]
                load[d]["peak"] = max(load[d]["peak"], sampler.peak)
                time.sleep(0.3)
        for d, figures in load.items():
            results[d]["raw_batch8_images_per_s"] = 8 / statistics.mean(figures["raw"])  # before each round
            results[d]["http_8_clients_images_per_s"] = len(figures["latencies"]) / figures["elapsed"]
            results[d]["http_8_clients_p50_ms"] = percentile(figures["latencies"], 50) * 1000
            results[d]["http_8_clients_p99_ms"] = percentile(figures["latencies"], 99) * 1000
            results[d]["rss_under_load_peak_mb"] = figures["peak"] / 2**20
    first = next(iter(raws))
    results[first]["original_design_s"] = statistics.median(
        original_design(args.model, small, label_set.labels) for _ in range(2)
    )
    return results, sizes


def numerics(name, templates=None, images=8):
    """bf16 against fp32 on the same random weights: worst image- and text-feature cosine, and worst
    |Δp| over CIFAR-100's scores (each side's probabilities in fp32 from its own features)."""
    cifar = LABEL_SETS["cifar100"]
    templates = templates or cifar.templates
    bodies = [jpeg(photo(320, 240, seed=20 + i)) for i in range(images)]
    out = {}
    for d in ("fp32", "bf16"):
        clip = create(name, d)
        started = time.perf_counter()
        classes = class_embeddings(clip.encode_texts, cifar.labels, templates)
        text_s = time.perf_counter() - started
        features = clip.encode_prepared(
            [clip.prepare(load_image(b, 50_000_000, clip.image_size)) for b in bodies]
        ).numpy()
        logits = clip.logit_scale * features @ classes.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        out[d] = (features, classes, probs / probs.sum(axis=1, keepdims=True), text_s)
        del clip
    (f32, t32, p32, s32), (f16, t16, p16, s16) = out["fp32"], out["bf16"]
    return {
        "model": name,
        "images": images,
        "prompts_per_class": len(templates),
        "worst_image_feature_cosine": float((f32 * f16).sum(axis=1).min()),
        "worst_class_embedding_cosine": float((t32 * t16).sum(axis=1).min()),
        "worst_abs_delta_p": float(np.abs(p32 - p16).max()),
        "top1_agreement": float((p32.argmax(axis=1) == p16.argmax(axis=1)).mean()),
        "cifar100_prompts_encode_s": {"fp32": s32, "bf16": s16},
    }


# Targets (a figure's ratio to its reference): bf16's are looser, its forward pass being half as long
# (the same overhead weighs twice).
TARGETS = {
    "fp32": {"single": 1.15, "clients": 0.90, "large": 1.5},
    "bf16": {"single": 1.25, "clients": 0.85, "large": 2.0},
}


def against(label, value, reference, target=""):
    """A table row: a figure, its reference and their ratio."""
    return (label, value, reference, value / reference, target)


def figures_table(r, dtype):
    t = TARGETS.get(dtype, TARGETS["fp32"])
    raw1, raw8, p50 = r["raw_batch1_ms"], r["raw_batch8_images_per_s"], r["http_224_p50_ms"]
    rows = [
        ("raw encode_image, batch 1 (ms)", raw1, None, None, ""),
        ("raw encode_image, batch 8 (images/s)", raw8, None, None, ""),
        against("HTTP p50, 224×224 JPEG (ms)", p50, raw1, f"≤ {t['single']}"),
        against("HTTP via gateway p50, 224×224 JPEG (ms)", r["gateway_224_p50_ms"], raw1),
        *(
            [against("HTTP via of-watchdog p50, 224×224 JPEG (ms)", r["watchdog_224_p50_ms"], raw1)]
            if "watchdog_224_p50_ms" in r
            else []
        ),
        against(
            f"HTTP, 8 concurrent clients (images/s; CLIP_MAX_BATCH {r['max_batch']})",
            r["http_8_clients_images_per_s"],
            raw8,
            f"≥ {t['clients']}",
        ),
        against("HTTP p50, 4000×3000 JPEG (ms)", r["http_4000x3000_p50_ms"], p50, f"≤ {t['large']}"),
        against("cold start with label cache (s)", r["cold_start_s"], 6.0, "≤ 1"),
        ("8 clients p50 / p99 (ms)", r["http_8_clients_p50_ms"], r["http_8_clients_p99_ms"], None, ""),
        ("RSS at rest / peak under load (MB)", r["rss_at_rest_mb"], r["rss_under_load_peak_mb"], None, ""),
    ]
    if "original_design_s" in r:
        rows.append(against("original per-request design (ms)", r["original_design_s"] * 1000, p50, "≥ 50"))
    if "cold_start_without_cache_s" in r:
        rows.append(
            ("cold start, no label cache (s; encodes 1,800 prompts)", r["cold_start_without_cache_s"], None, None, "")
        )
    return rows


def sweep(name, dtypes, runs):
    """Raw images/s per batch size and dtype: how CLIP_MAX_BATCH's defaults are chosen."""
    table = {}
    for d in dtypes:
        clip = create(name, d)
        x = torch.randn(32, 3, clip.image_size, clip.image_size)
        table[d] = {
            b: b / median_time(lambda: clip.encode_images(x[:b]), max(3, runs // b), warmup=1)
            for b in (1, 2, 4, 8, 16, 32)
        }
        print(f"{d}: {table[d]}", file=sys.stderr, flush=True)
        clip = None  # freed before the next dtype loads
    return table


def main():
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
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
    parser.add_argument("--concurrent-requests", type=int, default=25, help="requests per client, 8 clients")
    parser.add_argument("--cache-dir", default=str(ROOT / "bench-results" / "cache"))
    parser.add_argument("--out", default=None)
    from benchmarks import bench_gpu, intake

    bench_gpu.add_arguments(parser)
    intake.add_arguments(parser)
    args = parser.parse_args()
    mode = (
        "models"
        if args.models
        else "gpu"
        if args.gpu
        else "numerics"
        if args.numerics
        else "sweep"
        if args.sweep
        else "intake"
        if args.intake
        else "bench"
    )
    out = Path(args.out or ROOT / "bench-results" / f"{mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
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
    elif args.gpu:
        report["gpu"] = bench_gpu.run(args)
        if report["gpu"] is None:
            return
    elif args.numerics:
        report["numerics"] = numerics(args.model, None if native else SIMPLE_TEMPLATES)
        print(json.dumps(report["numerics"], indent=2))
    elif args.sweep:
        report["sweep"] = sweep(args.model, dtypes, args.runs)
        print_table(
            ["batch", *(f"{d} images/s" for d in dtypes)],
            [(b, *(report["sweep"][d][b] for d in dtypes)) for b in (1, 2, 4, 8, 16, 32)],
        )
    elif args.models:
        rows, report["models"] = [], {}
        for name, tag, accuracy in MODELS:
            figures = {}
            for d in dtypes:
                clip, figures[d] = raw_model(name, runs=max(5, args.runs // 4), dtype=d)
                del clip
            first = figures[dtypes[0]]
            report["models"][name] = {
                "pretrained": tag,
                "cifar100_zero_shot": accuracy,
                "params_m": first["params_m"],
                "image_size": first["image_size"],
                "by_dtype": figures,
            }
            cells = []
            for d in ("fp32", "bf16"):
                cells += (
                    [figures[d]["batch1_ms"], figures[d]["batch8_images_per_s"]]
                    if d in figures
                    else ["not run", "not run"]
                )
            rows.append((name, tag, accuracy, first["image_size"], round(first["params_m"], 1), *cells))
            print(f"{name}: {figures}", file=sys.stderr, flush=True)
        print_table(
            [
                "model",
                "pretrained",
                "CIFAR-100 %",
                "input",
                "params (M)",
                "fp32 batch 1 (ms)",
                "fp32 batch 8 (images/s)",
                "bf16 batch 1 (ms)",
                "bf16 batch 8 (images/s)",
            ],
            rows,
        )
    else:
        raws = {d: create(args.model, d) for d in dtypes}  # the raw references, measured beside the served figures
        results, sizes = serve_figures(args, raws)
        report.update(model=args.model, jpeg_bytes=sizes, served=results)
        for d, r in results.items():
            print(f"\n{d} ({r['served_dtype']['dtype_reason']}):")
            print_table(["figure", "value", "reference", "ratio", "target"], figures_table(r, d))
        print(
            "\nwhere one 224×224 JPEG request's time goes (ms; in-function stages timed with the function's own "
            "code in this process, the rest from the HTTP figures):"
        )
        names = list(results[dtypes[0]]["stages_224_ms"])
        print_table(
            ["stage", *dtypes],
            [(n, *(results[d]["stages_224_ms"][n] for d in dtypes)) for n in names]
            + [("total (HTTP via gateway p50)", *(results[d]["gateway_224_p50_ms"] for d in dtypes))],
        )
        if "bf16" in dtypes and "fp32" in dtypes:
            report["numerics"] = numerics(args.model, None if native else SIMPLE_TEMPLATES)
            print(f"\nbf16 against fp32: {json.dumps(report['numerics'])}")
    report["load_average_1m_at_end"] = os.getloadavg()[0]
    print(f"\nmachine: {report['machine']}; load average at the end: {report['load_average_1m_at_end']:.1f}")
    out.write_text(json.dumps(report, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
