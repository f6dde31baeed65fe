"""scripts/bench's printed tables: the served figures against their references, where one request's
time goes, the model-choice table and the batch sweep."""

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.forward import MODELS, SWEEP_BATCHES
from benchmarks.measure import print_table

# Targets (a figure's ratio to its reference), the same for every dtype: the overhead a request adds is
# the same whatever the forward pass costs (issue 29).
TARGETS = {"single": 1.15, "clients": 0.90, "large": 2.0}

# A figures_table row: figure, value, reference, ratio, target
Row = tuple[str, float, float | None, float | None, str]
# forward.models_figures' result: model -> dtype -> figure -> value
ByModel = Mapping[str, Mapping[str, Mapping[str, float]]]


def against(label: str, value: float, reference: float, target: str = "") -> Row:
    """A table row: a figure, its reference and their ratio."""
    return (label, value, reference, value / reference, target)


def figures_table(r: Mapping[str, Any]) -> list[Row]:
    raw1, raw8, p50 = r["raw_batch1_ms"], r["raw_batch8_images_per_s"], r["http_224_p50_ms"]
    rows: list[Row] = [
        ("raw encode_image, batch 1 (ms)", raw1, None, None, ""),
        ("raw encode_image, batch 8 (images/s)", raw8, None, None, ""),
        against("HTTP p50, 224×224 JPEG (ms)", p50, raw1, f"≤ {TARGETS['single']}"),
        *(
            [against("its forward pass, batch 1 (ms; the function's metrics)", r["served_batch1_forward_ms"], raw1)]
            if "served_batch1_forward_ms" in r
            else []
        ),
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
            f"≥ {TARGETS['clients']}",
        ),
        against("HTTP p50, 4000×3000 JPEG (ms)", r["http_4000x3000_p50_ms"], p50, f"≤ {TARGETS['large']}"),
        against("cold start with label cache (s)", r["cold_start_s"], 6.0, "≤ 1"),
        ("8 clients p50 / p99 (ms)", r["http_8_clients_p50_ms"], r["http_8_clients_p99_ms"], None, ""),
        *load_split(r),
        ("RSS at rest / peak under load (MB)", r["rss_at_rest_mb"], r["rss_under_load_peak_mb"], None, ""),
    ]
    if "original_design_s" in r:
        rows.append(against("original per-request design (ms)", r["original_design_s"] * 1000, p50, "≥ 50"))
    if "cold_start_without_cache_s" in r:
        rows.append(
            ("cold start, no label cache (s; encodes 1,800 prompts)", r["cold_start_without_cache_s"], None, None, "")
        )
    return rows


def load_split(r: Mapping[str, Any]) -> list[Row]:
    """Where the 8 clients' shortfall goes, from the function's own metrics (older JSON lacks them)."""
    if "load_model_busy_share" not in r:
        return []
    return [
        ("8 clients: share of the time in a forward pass", r["load_model_busy_share"], None, None, ""),
        ("8 clients: images per forward pass", r["load_mean_batch"], None, None, ""),
        against("8 clients: forward pass per image (ms)", r["load_forward_per_image_ms"], r["raw_batch8_per_image_ms"]),
    ]


def print_served(results: Mapping[str, Mapping[str, Any]], dtypes: Sequence[str]) -> None:
    """Each dtype's figures against their references, then where one 224 px request's time goes."""
    for d, r in results.items():
        print(f"\n{d} ({r['served_dtype']['dtype_reason']}):")
        print_table(["figure", "value", "reference", "ratio", "target"], figures_table(r))
    print(
        "\nwhere one 224×224 JPEG request's time goes (ms; in-function stages timed with the function's own "
        "code in this process, its forward pass from its metrics; the rest: the mean of the same requests "
        "less those):"
    )
    names = list(results[dtypes[0]]["stages_224_ms"])
    print_table(
        ["stage", *dtypes],
        [(n, *(results[d]["stages_224_ms"][n] for d in dtypes)) for n in names]
        + [("total (HTTP via gateway p50)", *(results[d]["gateway_224_p50_ms"] for d in dtypes))],
    )


def models_report(by_model: ByModel, dtypes: Sequence[str]) -> dict[str, dict[str, object]]:
    """The JSON of the model-choice table: published accuracy and size beside each dtype's raw figures."""
    report: dict[str, dict[str, object]] = {}
    for name, tag, accuracy in MODELS:
        first = by_model[name][dtypes[0]]
        report[name] = {
            "pretrained": tag,
            "cifar100_zero_shot": accuracy,
            "params_m": first["params_m"],
            "image_size": first["image_size"],
            "by_dtype": by_model[name],
        }
    return report


def print_models(by_model: ByModel, dtypes: Sequence[str]) -> None:
    rows: list[tuple[object, ...]] = []
    for name, tag, accuracy in MODELS:
        figures, first = by_model[name], by_model[name][dtypes[0]]
        cells: list[float | str] = []
        for d in ("fp32", "bf16"):
            cells += (
                [figures[d]["batch1_ms"], figures[d]["batch8_images_per_s"]] if d in figures else ["not run", "not run"]
            )
        rows.append((name, tag, accuracy, first["image_size"], round(first["params_m"], 1), *cells))
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


def print_sweep(table: Mapping[str, Mapping[int, float]], dtypes: Sequence[str]) -> None:
    print_table(
        ["batch", *(f"{d} images/s" for d in dtypes)],
        [(b, *(table[d][b] for d in dtypes)) for b in SWEEP_BATCHES],
    )
