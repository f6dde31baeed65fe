"""scripts/bench --embeddings: what embeddings out cost, in-process, on the function's own handler.

    scripts/bench --embeddings [--embedding-rounds 5]

1. An answer with `embedding=true` against the same answer without, for 1 raw JPEG and 16 in a multipart
   form (640×480 photos, benchmarks.pictures): the JSON's bytes as the host sends them, and ms per request
   (handler.handle plus the host's json.dumps, the two rounds interleaved so a shared machine's drift hits
   both alike). The forward pass dominates both and a shared machine's noise with it, so the CPU the
   embeddings add is also timed alone: writing the rows as numbers (embeddings.as_floats) and json.dumps.
2. Text embeddings per second through POST /embeddings (handler.handle + json.dumps) at 1 and 64 texts per
   request, against open_clip's raw encode_text (tokenizer + encode_text + normalise) of the same batch.

Each dtype of the run gets its own Service (ViT-B-32 with CLIP_PRETRAINED=none by default: compute as the
real weights'; the label-set cache of --cache-dir, as the served figures use)."""

import argparse
import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from clip import config, handler
from clip.embeddings import as_floats
from clip.service import Service

from benchmarks.intake import Event, multipart_form
from benchmarks.measure import print_table
from benchmarks.pictures import jpeg, photo
from benchmarks.timing import interleaved, median_time

TEXT = "a photo of a {} on a wooden table, taken in the afternoon"


def picture_bodies() -> dict[int, tuple[bytes, str]]:
    """pictures -> (body, content type): one raw JPEG, sixteen in a multipart form."""
    pictures = [jpeg(photo(640, 480, seed=i)) for i in range(16)]
    return {1: (pictures[0], "image/jpeg"), 16: multipart_form(pictures)}


def answer(event: Event) -> bytes:
    """One request as the host serves it: the handler, then the body as JSON bytes."""
    served = handler.handle(event, None)
    assert served["statusCode"] == 200, served["body"]
    return json.dumps(served["body"]).encode()


def written(rows: np.ndarray) -> bytes:
    """What embedding=true adds to an answer's work: the rows as JSON numbers, serialised."""
    return json.dumps([as_floats(row) for row in rows]).encode()


def run_dtype(service: Service, rounds: int) -> dict[str, Any]:
    handler.SERVICE = service
    report: dict[str, Any] = {"pictures": {}, "texts": {}}
    for count, (body, content_type) in picture_bodies().items():
        plain, embedded = Event(body, content_type), Event(body, content_type, query={"embedding": "true"})
        timed: dict[str, tuple[Callable[[], object], int]] = {
            "without": (functools.partial(answer, plain), 3),
            "with": (functools.partial(answer, embedded), 3),
        }
        ms = {name: seconds * 1000 for name, seconds in interleaved(timed, rounds, pause=0.1).items()}
        rows = np.random.default_rng(0).standard_normal((count, service.width)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
        added = median_time(functools.partial(written, rows), 50) * 1000
        report["pictures"][count] = {
            "bytes_without": len(answer(plain)),
            "bytes_with": len(answer(embedded)),
            "ms_without": round(ms["without"], 2),
            "ms_with": round(ms["with"], 2),
            "embeddings_cpu_ms": round(added, 3),
        }
    model = service.model
    for batch in (1, 64):
        texts = [TEXT.format(i) for i in range(batch)]
        event = Event(json.dumps({"input": texts}).encode(), "application/json", path="/embeddings")

        @torch.inference_mode()
        def raw(texts: list[str] = texts) -> torch.Tensor:
            features = model.model.encode_text(model.tokenizer(texts).to(model.device))  # type: ignore[operator]
            return torch.nn.functional.normalize(features.float(), dim=-1)

        runs = 10 if batch == 1 else 2
        seconds = interleaved(
            {"served": (functools.partial(answer, event), runs), "raw": (raw, runs)}, rounds, pause=0.1
        )
        report["texts"][batch] = {
            "served_per_s": round(batch / seconds["served"], 1),
            "raw_per_s": round(batch / seconds["raw"], 1),
            "bytes": len(answer(event)),
        }
    return report


def run(args: argparse.Namespace, dtypes: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for dtype in dtypes:
        settings = dataclasses.replace(
            config.Settings(),
            model=args.model,
            pretrained="none",
            dtype=dtype,
            cache_dir=args.cache_dir,
            preload_label_sets=("cifar100",),
        )
        report[dtype] = run_dtype(Service(settings), args.embedding_rounds)
    print_report(report)
    return report


def print_report(report: dict[str, Any]) -> None:
    rows: list[tuple[object, ...]] = []
    for dtype, figures in report.items():
        for count, f in figures["pictures"].items():
            row = (f["bytes_without"], f["bytes_with"], f["ms_without"], f["ms_with"], f["embeddings_cpu_ms"])
            rows.append((dtype, count, *row))
    print("answers with embedding=true against without (ms: median per request, handler + json.dumps):")
    headers = ["dtype", "pictures", "bytes without", "bytes with", "ms without", "ms with", "embeddings alone (ms)"]
    print_table(headers, rows)
    rows = [
        (dtype, batch, f["served_per_s"], f["raw_per_s"], f"{f['served_per_s'] / f['raw_per_s']:.2f}", f["bytes"])
        for dtype, figures in report.items()
        for batch, f in figures["texts"].items()
    ]
    print("\ntext embeddings per second: POST /embeddings (handler + json.dumps) against raw encode_text:")
    print_table(["dtype", "texts per request", "served /s", "raw /s", "served / raw", "answer bytes"], rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--embeddings")
    group.add_argument("--embeddings", action="store_true", help="only what embeddings out cost (bytes, ms, texts/s)")
    group.add_argument("--embedding-rounds", type=int, default=5, help="interleaved rounds per figure")
