"""Every knob of the clip function, read once from the environment (configuration as data)."""

import math
import os
from dataclasses import dataclass, field
from typing import TypeVar

from .decode_bombs import Limits
from .url_input import parse_networks

T = TypeVar("T")


def _env(name: str, default: T) -> str | T:
    value = os.environ.get(name, "").strip()
    return value if value else default


def _list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in _env(name, default).split(",") if item.strip()]


def _int(name: str, default: int) -> int:
    value = _env(name, default)
    try:
        return int(value)
    except ValueError:  # one line that names the setting, where int() would name only the value
        raise ValueError(f"{name} must be a whole number, not {value!r}") from None


def _float(name: str, default: float) -> float:
    value = _env(name, default)
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {value!r}") from None


@dataclass(frozen=True)
class Settings:
    model: str = "ViT-B-32"
    pretrained: str = "datacomp_xl_s13b_b90k"
    device: str = "auto"
    dtype: str = "auto"  # auto|fp32|bf16|fp16 (precision.py)
    cache_dir: str = os.path.expanduser("~/.cache/clip-function")
    default_label_set: str = "cifar100"
    preload_label_sets: tuple = ("cifar100",)
    custom_templates: str = "simple"  # "simple" (1 prompt per label) or "cifar" (the 18)
    max_batch: int = 0  # 0 = the default for the device and dtype (precision.py)
    max_wait_ms: float = 25.0
    max_queue: int = 32  # images admitted at once (decoding, queued, encoding), per worker
    deadline_s: float = 30.0
    max_body_bytes: int = 32 * 1024 * 1024  # the template host's MAX_BODY_BYTES: enforced there, shown in GET /
    max_pixels: int = 50_000_000
    max_images: int = 16
    max_labels: int = 1000
    max_label_chars: int = 200
    label_cache_size: int = 4096
    top_k: int = 5
    threads: int = 0  # torch intra-op threads per process; 0 = the CPUs it may use (threads())
    decoders: int = 0  # images decoded at once; 0 = as many as the torch threads
    device_decode: str = "auto"  # JPEGs decoded on the model's device: auto (CUDA only), on, off
    url_allow_hosts: tuple = field(default=())
    url_allow_networks: tuple = field(default=())  # private networks URL input may reach (opt-in, CIDRs)
    url_timeout_s: float = 5.0
    url_max_bytes: int = 20 * 1024 * 1024
    stall_s: float = 120.0  # model thread on one piece of work longer: replica taken out
    decode_memory_mb: int = 1024  # decoded pixels held at once by concurrent decodes
    heavy_pixels: int = 4_000_000  # pictures bigger than this never take the last decoder
    max_jpeg_segments: int = Limits.max_segments
    max_jpeg_fill_bytes: int = Limits.max_fill_bytes
    max_scan_pixels: int = Limits.max_scan_pixels
    max_rle_pixels: int = Limits.max_rle_pixels

    def structure_limits(self) -> Limits:
        return Limits(self.max_jpeg_segments, self.max_jpeg_fill_bytes, self.max_scan_pixels, self.max_rle_pixels)


def workers() -> int:
    """Host processes serving this function (the template's FUNCTION_WORKERS); each has its own model."""
    try:
        return max(1, int(os.environ.get("FUNCTION_WORKERS", "1") or 1))
    except ValueError:
        return 1


def per_worker(total: int, count: int) -> int:
    """A function-wide limit as each worker's share, rounded up: the function admits at most
    count × ceil(total / count), never fewer than `total`."""
    return max(1, math.ceil(total / count))


def cpu_share() -> tuple[int, str]:
    """The CPUs this process may use and where that count came from, as the template host found them
    (FUNCTION_CPUS: the cgroup's CPU quota or the affinity mask, shared among FUNCTION_WORKERS), never
    the node's cores. Outside a host (unit tests, the build hook): the affinity mask."""
    try:
        count = int(os.environ.get("FUNCTION_CPUS", ""))
    except ValueError:
        count = 0
    if count > 0:
        return count, os.environ.get("FUNCTION_CPUS_SOURCE", "FUNCTION_CPUS")
    mask = len(os.sched_getaffinity(0))
    return mask, f"affinity {mask}"


def threads(settings: Settings) -> tuple[int, str]:
    """torch intra-op threads for this process and where that count came from: CLIP_THREADS if set."""
    return (settings.threads, "CLIP_THREADS") if settings.threads > 0 else cpu_share()


def from_env() -> Settings:
    count = workers()
    return Settings(
        model=_env("CLIP_MODEL", Settings.model),
        pretrained=_env("CLIP_PRETRAINED", Settings.pretrained),
        device=_env("CLIP_DEVICE", Settings.device),
        dtype=_env("CLIP_DTYPE", Settings.dtype).lower(),
        cache_dir=_env("CLIP_CACHE_DIR", Settings.cache_dir),
        default_label_set=_env("CLIP_LABEL_SET", Settings.default_label_set),
        preload_label_sets=tuple(_list("CLIP_PRELOAD_LABEL_SETS", _env("CLIP_LABEL_SET", Settings.default_label_set))),
        custom_templates=_env("CLIP_CUSTOM_TEMPLATES", Settings.custom_templates),
        max_batch=_int("CLIP_MAX_BATCH", Settings.max_batch),
        max_wait_ms=_float("CLIP_MAX_WAIT_MS", Settings.max_wait_ms),
        max_queue=per_worker(_int("CLIP_MAX_QUEUE", Settings.max_queue), count),
        deadline_s=_float("CLIP_DEADLINE_S", Settings.deadline_s),
        max_body_bytes=_int("MAX_BODY_BYTES", Settings.max_body_bytes),
        max_pixels=_int("CLIP_MAX_PIXELS", Settings.max_pixels),
        max_images=_int("CLIP_MAX_IMAGES", Settings.max_images),
        max_labels=_int("CLIP_MAX_LABELS", Settings.max_labels),
        max_label_chars=_int("CLIP_MAX_LABEL_CHARS", Settings.max_label_chars),
        label_cache_size=_int("CLIP_LABEL_CACHE_SIZE", Settings.label_cache_size),
        top_k=_int("CLIP_TOP_K", Settings.top_k),
        threads=_int("CLIP_THREADS", 0),  # per process; unset: threads() decides
        decoders=_int("CLIP_DECODERS", Settings.decoders),
        device_decode=_env("CLIP_DEVICE_DECODE", Settings.device_decode).lower(),
        url_allow_hosts=tuple(h.lower() for h in _list("CLIP_URL_ALLOW_HOSTS")),
        url_allow_networks=parse_networks(_env("CLIP_URL_ALLOW_NETWORKS", "")),
        url_timeout_s=_float("CLIP_URL_TIMEOUT_S", Settings.url_timeout_s),
        url_max_bytes=_int("CLIP_URL_MAX_BYTES", Settings.url_max_bytes),
        stall_s=_float("CLIP_STALL_S", Settings.stall_s),
        decode_memory_mb=_int("CLIP_DECODE_MEMORY_MB", Settings.decode_memory_mb),
        heavy_pixels=_int("CLIP_HEAVY_PIXELS", Settings.heavy_pixels),
        max_jpeg_segments=_int("CLIP_MAX_JPEG_SEGMENTS", Settings.max_jpeg_segments),
        max_jpeg_fill_bytes=_int("CLIP_MAX_JPEG_FILL_BYTES", Settings.max_jpeg_fill_bytes),
        max_scan_pixels=_int("CLIP_MAX_SCAN_PIXELS", Settings.max_scan_pixels),
        max_rle_pixels=_int("CLIP_MAX_RLE_PIXELS", Settings.max_rle_pixels),
    )
