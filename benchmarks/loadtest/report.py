"""The load test's table: (figure, value, limit, ok) rows per phase, printed, and the JSON report written."""

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.loadtest.payloads import Payload
from benchmarks.measure import machine, print_table

# A row of the table: (figure, value, limit, ok); limit "" (and ok "") for a figure that is only shown
Row = tuple[str, object, str, bool | str]
# A phase's figures (run.summarize and what the phase adds), and the whole report: JSON
Figures = Mapping[str, Any]


def new_report(
    config: Mapping[str, object], env: Mapping[str, str], good: Sequence[Payload], bad: Sequence[Payload]
) -> dict[str, Any]:
    """The JSON report before any phase: where and how it ran, and what was sent."""
    return {
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {**config, "env": env},
        "payloads": {
            "good": {p.name: {"bytes": len(p.body), "weight": p.weight} for p in good},
            "bad": {p.name: {"bytes": len(p.body), "expect": list(p.statuses), "codes": list(p.codes)} for p in bad},
        },
    }


def rows_for(result: Figures, prefix: str, limits: bool) -> list[Row]:
    """(figure, value, limit, ok) rows for one phase; `limits` adds the pass/fail ones."""
    lat = result["latency_ms"]
    rows: list[Row] = [
        (f"{prefix}requests (good / bad)", f"{result['requests']} ({result['good']} / {result['bad']})", "", ""),
        (
            f"{prefix}throughput (req/s, images/s)",
            f"{result['requests_per_s']:.2f}, {result['images_per_s']:.2f}",
            "",
            "",
        ),
        (f"{prefix}200 / 429 (queue full)", f"{result['ok_200']} / {result['shed_429']}", "", ""),
    ]
    if limits:
        rows += [
            (f"{prefix}unexpected statuses", result["unexpected"], "= 0", result["unexpected"] == 0),
            (
                f"{prefix}contract violations (body, code)",
                result["contract_violations"],
                "= 0",
                result["contract_violations"] == 0,
            ),
            (f"{prefix}connection errors", result["connection_errors"], "= 0", result["connection_errors"] == 0),
            (f"{prefix}429 without Retry-After", result["no_retry_after"], "= 0", result["no_retry_after"] == 0),
        ]
    else:
        rows.append(
            (
                f"{prefix}unexpected / contract / connection",
                f"{result['unexpected']} / {result['contract_violations']} / {result['connection_errors']}",
                "",
                "",
            )
        )

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    rows.append(
        (
            f"{prefix}latency of 200s p50 / p90 / p99 / max (ms)",
            " / ".join(fmt(lat[k]) for k in ("p50", "p90", "p99", "max")),
            "",
            "",
        )
    )
    inside = result["in_function_ms"]
    rows.append(
        (
            f"{prefix}time inside clip's handler, 200s p50 / p99 (ms)",
            " / ".join(fmt(inside[k]) for k in ("p50", "p99")),
            "",
            "",
        )
    )
    if result["shed_429"]:
        rows.append(
            (
                f"{prefix}latency of 429s p50 / p99 (ms)",
                " / ".join(fmt(result["latency_429_ms"][k]) for k in ("p50", "p99")),
                "",
                "",
            )
        )
    server = result["server"]
    rows.append(
        (
            f"{prefix}server batches, mean batch (images)",
            "- (clip did not answer GET)"
            if server["batches"] is None
            else f"{server['batches']}, {server['mean_batch']:.2f}",
            "",
            "",
        )
    )
    for key, title in (("batch_size", "batch size (images)"), ("queue_wait_ms", "queue wait (ms)")):
        figures = result["metrics"][key]
        if not figures or not figures["count"]:
            rows.append((f"{prefix}{title}, from /metrics", "-", "", ""))
            continue
        rows.append(
            (
                f"{prefix}{title}, from /metrics: mean; p50 / p90 / p99 at most",
                f"{figures['mean']:.1f}; {figures['p50_le']:g} / {figures['p90_le']:g} / {figures['p99_le']:g}",
                "",
                "",
            )
        )
        rows.append(
            (
                f"{prefix}{title}: share per bucket (upper bound: share)",
                ", ".join(f"{le}: {share:.0%}" for le, share in figures["shares_by_le"].items()),
                "",
                "",
            )
        )
    return rows


# clip's defaults (CLIP_MAX_QUEUE's, CLIP_MAX_BATCH's fallback), for when its GET does not give its limits.
DEFAULT_MAX_QUEUE, DEFAULT_MAX_BATCH = 32, 8


def p99_bound(main: Figures, limits: Mapping[str, int]) -> float:
    """The ms the hostile and overload phases' p99 must stay within: 1.5 × (ceil(max_queue / max_batch)
    + 1) × the main phase's p50 (the package's docstring says why); NaN when the main phase had no 200s."""
    p50 = main["latency_ms"]["p50"]
    if p50 is None:
        return float("nan")
    queue, max_batch = limits.get("max_queue", DEFAULT_MAX_QUEUE), limits.get("max_batch", DEFAULT_MAX_BATCH)
    return 1.5 * (math.ceil(queue / max_batch) + 1) * p50


def p99_row(figure: str, p99: float | None, bound: float) -> Row:
    return (figure, "-" if p99 is None else f"{p99:,.0f}", f"≤ {bound:,.0f}", p99 is not None and p99 <= bound)


def main_rows(main: Figures) -> list[Row]:
    """The main phase's rows, with its warm-up and its memory growth."""
    rss = main["rss"]
    return rows_for(main, "", limits=True) + [
        ("warm-up problems (every input once)", len(main["warm_up_problems"]), "= 0", not main["warm_up_problems"]),
        ("clip RSS ready / peak (MB)", f"{rss['ready_mb']:.0f} / {rss['peak_mb']:.0f}", "", ""),
        (
            f"clip RSS at t={rss['mid_t_s']:g} s / t={rss['end_t_s']:g} s (MB)",
            f"{rss['mid_mb']:.0f} / {rss['end_mb']:.0f}",
            "",
            "",
        ),
        ("clip RSS growth, mid -> end (%)", round(rss["growth_pct"], 2), "< 10", rss["growth_pct"] < 10),
    ]


def hostile_rows(hostile: Figures, bound: float) -> list[Row]:
    """The hostile phase's rows: the normal requests' p99 within `bound`, memory given back after idle."""
    prefix, rss = "hostile: ", hostile["rss"]
    return rows_for(hostile, prefix, limits=True) + [
        p99_row(f"{prefix}p99 of normal 200s (ms)", hostile["latency_ms"]["p99"], bound),
        (
            f"{prefix}clip RSS before / peak / after 5 s idle (MB)",
            f"{rss['before_mb']:.0f} / {rss['peak_mb']:.0f} / {rss['after_idle_mb']:.0f}",
            "",
            "",
        ),
        (
            f"{prefix}RSS after idle vs before (%)",
            round((rss["after_idle_mb"] / rss["before_mb"] - 1) * 100, 1),
            "< 15",
            rss["after_idle_mb"] < 1.15 * rss["before_mb"],
        ),
    ]


def overload_rows(over: Figures, bound: float, limits: Mapping[str, int]) -> list[Row]:
    """The overload phase's rows: load shed with 429, the 200s' p99 within `bound`."""
    prefix, queue = "overload: ", limits.get("max_queue", DEFAULT_MAX_QUEUE)
    return rows_for(over, prefix, limits=True) + [
        (f"{prefix}requests shed with 429 (max_queue {queue})", over["shed_429"], "> 0", over["shed_429"] > 0),
        p99_row(f"{prefix}p99 of 200s (ms)", over["latency_ms"]["p99"], bound),
    ]


def finish(report: dict[str, Any], rows: Sequence[Row], out: Path, workdir: Path) -> int:
    """Print the table and the examples of each problem, write the JSON report to `out`; the working
    folder goes when every limit is met. Returns the exit status (1: a limit failed)."""
    report["limits"] = [{"figure": f, "value": v, "limit": lim, "ok": ok} for f, v, lim, ok in rows if lim]
    report["ok"] = all(ok for _, _, lim, ok in rows if lim)
    print_table(
        ["figure", "value", "limit", "ok"],
        [(f, v, lim, "" if not lim else ("ok" if ok else "FAIL")) for f, v, lim, ok in rows],
    )
    for phase in ("main", "hostile", "overload"):
        for kind, examples in (report.get(phase) or {}).get("examples", {}).items():
            for example in examples[:5]:
                print(f"{phase}: {kind}: {example}")
    print(f"\nmachine: {report['machine']}")
    print(
        "note: the load generator runs on the same machine as the functions; on a busy machine "
        "latency figures are noisy"
    )
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"written: {out}")
    if report["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
        print("all limits met")
    else:
        print(f"LIMITS FAILED (the functions' build contexts and logs are kept in {workdir})")
    return 0 if report["ok"] else 1
