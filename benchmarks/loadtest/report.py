"""The load test's table: (figure, value, limit, ok) rows per phase, printed, and the JSON report written."""

import json
import shutil

from benchmarks.measure import print_table


def rows_for(result, prefix, limits):
    """(figure, value, limit, ok) rows for one phase; `limits` adds the pass/fail ones."""
    lat = result["latency_ms"]
    rows = [
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
    fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
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


def finish(report, rows, out, workdir):
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
