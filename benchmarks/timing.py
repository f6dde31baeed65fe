"""Timing helpers of scripts/bench: medians of repeated calls, and interleaved rounds for fair ratios."""

import statistics
import time
from collections.abc import Callable, Mapping

# A figure's function and how many timed calls each round makes of it
Timed = tuple[Callable[[], object], int]


def timings(fn: Callable[[], object], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def median_time(fn: Callable[[], object], runs: int, warmup: int = 3) -> float:
    return statistics.median(timings(fn, runs, warmup))


def interleaved(named: Mapping[str, Timed], rounds: int, pause: float = 0.3) -> dict[str, float]:
    """Median time of each fn, measured in alternating rounds: a shared machine's speed drifts over a run
    (other tenants), and a ratio of two figures is only fair if both saw the same drift. The pause lets
    the other process's OpenMP threads stop spinning before the next figure's round."""
    samples: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(rounds):
        for name, (fn, runs) in named.items():
            samples[name] += timings(fn, runs, warmup=2)
            time.sleep(pause)
    return {name: statistics.median(values) for name, values in samples.items()}
