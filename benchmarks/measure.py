"""What the benchmarks and the load test share: percentiles, a function's /metrics parsed, the memory of
a process tree sampled over time, a markdown table printer and the machine's description."""

import os
import platform
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import numpy as np
import psutil
import torch
from clip import precision
from prometheus_client.parser import text_string_to_metric_families

# A function's GET /metrics, parsed: (sample name, its labels sorted) -> value
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_samples(text: str) -> Scrape:
    """Prometheus text (a function's GET /metrics) as {(sample name, labels sorted): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def tree(process: psutil.Process) -> list[psutil.Process]:
    """The process and its children, found by psutil's scan of every process in /proc."""
    return [process, *process.children(recursive=True)]


def tree_rss(process: psutil.Process) -> int:
    return rss_of(tree(process))


def rss_of(processes: Sequence[psutil.Process]) -> int:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssSampler:
    """RSS of a process and its children, every `interval` seconds: (seconds since start, bytes).
    The children are looked up once a second, not at every sample: psutil finds them by reading every
    process in /proc (1 ms of CPU each time here), and at 20 samples a second that took 2 % of a core
    from the function being measured, which slowed its forward passes by 4–5 % on 2 cores."""

    CHILDREN_EVERY_S = 1.0

    def __init__(self, process: psutil.Process, interval: float = 1.0) -> None:
        self.process, self.interval = process, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = looked = time.monotonic()
        members = tree(self.process)
        while True:
            now = time.monotonic()
            if now - looked >= self.CHILDREN_EVERY_S:
                members, looked = tree(self.process), now
            self.samples.append((now - started, rss_of(members)))
            if self._stop.wait(self.interval):
                return

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)

    def at(self, t: float) -> tuple[float, int]:
        return min(self.samples, key=lambda s: abs(s[0] - t))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    def fmt(v: object) -> str:
        return "" if v is None else (f"{v:,.2f}" if isinstance(v, float) else str(v))

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    features = precision.cpu_features()
    return {
        "cpu": processor_name(),
        "cores": os.cpu_count(),
        "bf16": features.describe(),
        "load_average_1m": os.getloadavg()[0],  # other tenants: figures from a busy machine are noisy
        "native_bf16": features.native_bf16,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
