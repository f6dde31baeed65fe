"""scripts/bench --intake: host CPU spent on a request's body before the model sees it, in-process.

    scripts/bench --intake [--intake-rounds 300]

For three bodies of 640×480 photo JPEGs (benchmarks.pictures, about 80 KB each): one raw JPEG, sixteen in
a multipart form (as bench_gpu's "sixteen.multipart") and sixteen base64 strings in JSON ({"images": […]}),
it times the function's own code: clip.request.sort_body, then, per picture, the device path's checks
(clip.device_decode.admit: the decode-bomb segment walk and the header read). No model is loaded. Figures
are medians over many rounds, per request and per picture; the processor is named, as the budget is per
core (2 ms of host CPU per picture is what a 16-core H100 host can spend at 8,000 images/s).
"""

import argparse
import base64
import json
import statistics
import time

from clip.config import Settings
from clip.device_decode import admit
from clip.request import sort_body
from werkzeug.datastructures import Headers, MultiDict

from benchmarks.measure import print_table
from benchmarks.pictures import jpeg, photo

BOUNDARY = "clipbenchboundary"


class Event:
    """What the template host hands the handler (template/python3-debian/index.py's Event): a POST."""

    def __init__(self, body: bytes, content_type: str, path: str = "/", query: dict[str, str] | None = None) -> None:
        self.body, self.path, self.method = body, path, "POST"
        self.headers = Headers({"Content-Type": content_type})
        self.query: MultiDict[str, str] = MultiDict(query or {})


def multipart_form(pictures: list[bytes]) -> tuple[bytes, str]:
    """(body, content type) of a multipart form with each JPEG as an "image" part."""
    body = (
        b"".join(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
            for i, data in enumerate(pictures)
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def bodies(count: int = 16) -> dict[str, tuple[Event, int]]:
    """name -> (Event, pictures): the three kinds of body, built from the same photos."""
    pictures = [jpeg(photo(640, 480, seed=i)) for i in range(count)]
    as_json = json.dumps({"images": [base64.b64encode(data).decode() for data in pictures]}).encode()
    return {
        "1 raw JPEG": (Event(pictures[1], "image/jpeg"), 1),
        f"{count} multipart": (Event(*multipart_form(pictures)), count),
        f"{count} JSON base64": (Event(as_json, "application/json"), count),
    }


def stages(event: Event, settings: Settings) -> tuple[float, float]:
    """(parse s, checks s) for one request, and its items (checked: every picture goes to the device)."""
    started = time.perf_counter()
    request = sort_body(event, settings.max_images)
    parsed = time.perf_counter()
    limits = settings.structure_limits()
    for item in request.items:
        if item.data is None or admit(item.data, limits, settings.max_pixels) is None:
            raise AssertionError("a bench picture left the device path")
    return parsed - started, time.perf_counter() - parsed


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    settings = Settings()
    rows: list[tuple[object, ...]] = []
    report: dict[str, dict[str, float]] = {}
    cases = bodies()
    for event, _ in cases.values():
        for _ in range(10):  # warm-up: imports, regex compiles, allocator
            stages(event, settings)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.intake_rounds):  # interleaved: a shared machine's drift hits every body alike
        for name, (event, _) in cases.items():
            samples[name].append(stages(event, settings))
    for name, (event, count) in cases.items():
        parse = statistics.median(p for p, _ in samples[name]) * 1000
        checks = statistics.median(c for _, c in samples[name]) * 1000
        total = statistics.median(p + c for p, c in samples[name]) * 1000
        report[name] = {
            "body_bytes": len(event.body),
            "pictures": count,
            "parse_ms": round(parse, 3),
            "checks_ms": round(checks, 3),
            "request_ms": round(total, 3),
            "per_picture_ms": round(total / count, 3),
        }
        rows.append((name, f"{len(event.body) / 1e6:.2f}", parse, checks, total, total / count))
    print(f"intake cost, median of {args.intake_rounds} rounds, one thread:")
    print_table(
        ["body", "MB", "parse (ms)", "checks (ms)", "request (ms)", "per picture (ms)"],
        rows,
    )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--intake")
    group.add_argument("--intake-rounds", type=int, default=300, help="timed rounds per body")
