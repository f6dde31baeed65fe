"""Every setting of the clip function, declared once (type, default, allowed values or range) with the
template host's settings.Setting, and read and checked together by from_env(). The handler calls it
when the host imports it, at start: a bad value (CLIP_MAX_BATCH=eight, CLIP_DTYPE=fp64) stops the
function there with one line naming the variable, the value and what is allowed (settings.SettingError),
never later when a request or the model meets it. The host's own settings (MAX_BODY_BYTES,
FUNCTION_WORKERS) are the host's declarations, read, not declared again. docs/configuration.md is held
to these declarations by tests/test_configuration_table.py."""

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import settings
from settings import Setting

from .decode_bombs import Limits
from .label_files import FileSet, folders, read_all
from .url_input import parse_networks

# Names clip declares choices with here, where torch may not be imported (a test holds each equal to its
# module's: labels.LABEL_SETS, precision.SETTINGS, device_decode.MODES). Label-set files add to the
# built-in sets (from_env).
LABEL_SET_NAMES = ("cifar100", "cifar10", "imagenet1k")
NAMING_SETS = ("CLIP_LABEL_SET", "CLIP_PRELOAD_LABEL_SETS")  # their choices: the built-in sets and the files
DTYPE_SETTINGS = ("auto", "fp32", "bf16", "fp16")
DEVICE_DECODE_MODES = ("auto", "on", "off")
MB = 1024 * 1024

# (Settings field, its declaration): one home per setting.
FIELDS: tuple[tuple[str, Setting], ...] = (
    ("model", Setting("CLIP_MODEL", str, "ViT-B-32", doc="open_clip model name, local-dir:/path or hf-hub:org/repo")),
    ("pretrained", Setting("CLIP_PRETRAINED", str, "datacomp_xl_s13b_b90k", doc="weights tag, file, or none")),
    ("device", Setting("CLIP_DEVICE", str, "auto", choices=("auto", "cpu", "cuda"), doc="where the model runs")),
    ("dtype", Setting("CLIP_DTYPE", str, "auto", choices=DTYPE_SETTINGS, doc="the model's precision")),
    ("cache_dir", Setting("CLIP_CACHE_DIR", str, "~/.cache/clip-function", doc="weights and label embeddings")),
    (
        "default_label_set",
        Setting("CLIP_LABEL_SET", str, "cifar100", choices=LABEL_SET_NAMES, doc="when none is asked"),
    ),
    # unset: the default label set (from_env)
    (
        "preload_label_sets",
        Setting("CLIP_PRELOAD_LABEL_SETS", "list", (), choices=LABEL_SET_NAMES, doc="built at start"),
    ),
    # read by label_files.py, with the function's own label_sets/ folder (from_env)
    ("label_sets_dir", Setting("CLIP_LABEL_SETS_DIR", str, "", doc="a folder of label-set files, NAME.txt")),
    ("custom_templates", Setting("CLIP_CUSTOM_TEMPLATES", str, "simple", choices=("simple", "cifar"), doc="prompts")),
    # 0: the default for the device and dtype (precision.default_max_batch)
    ("max_batch", Setting("CLIP_MAX_BATCH", int, 0, minimum=0, maximum=256, doc="images per forward pass")),
    ("max_wait_ms", Setting("CLIP_MAX_WAIT_MS", float, 25.0, minimum=0, maximum=10_000, doc="a batch's wait")),
    # images admitted at once (decoding, queued, encoding), function-wide: each worker takes its share
    ("max_queue", Setting("CLIP_MAX_QUEUE", int, 32, minimum=1, maximum=100_000, doc="images admitted at once")),
    ("deadline_s", Setting("CLIP_DEADLINE_S", float, 30.0, minimum=0, maximum=3600, doc="a request's deadline")),
    ("max_pixels", Setting("CLIP_MAX_PIXELS", int, 50_000_000, minimum=1, doc="largest picture")),
    ("max_images", Setting("CLIP_MAX_IMAGES", int, 16, minimum=1, maximum=10_000, doc="pictures per request")),
    ("max_labels", Setting("CLIP_MAX_LABELS", int, 1000, minimum=1, maximum=100_000, doc="custom labels per request")),
    ("max_label_chars", Setting("CLIP_MAX_LABEL_CHARS", int, 200, minimum=1, maximum=10_000, doc="per label")),
    ("label_cache_size", Setting("CLIP_LABEL_CACHE_SIZE", int, 4096, minimum=0, doc="custom label embeddings kept")),
    ("top_k", Setting("CLIP_TOP_K", int, 5, minimum=1, maximum=100_000, doc="default top_k")),
    # 0: the CPUs the process may use (threads())
    ("threads", Setting("CLIP_THREADS", int, 0, minimum=0, maximum=4096, doc="torch threads per process")),
    # 0: as many as the torch threads
    ("decoders", Setting("CLIP_DECODERS", int, 0, minimum=0, maximum=4096, doc="images decoded at once")),
    ("device_decode", Setting("CLIP_DEVICE_DECODE", str, "auto", choices=DEVICE_DECODE_MODES, doc="JPEGs on device")),
    ("url_allow_hosts", Setting("CLIP_URL_ALLOW_HOSTS", "list", (), doc="hosts URL input may fetch from")),
    # CIDRs, checked by url_input.parse_networks (from_env)
    ("url_allow_networks", Setting("CLIP_URL_ALLOW_NETWORKS", "list", (), doc="private networks URL input may reach")),
    ("url_timeout_s", Setting("CLIP_URL_TIMEOUT_S", float, 5.0, minimum=0, maximum=600, doc="a URL download")),
    ("url_max_bytes", Setting("CLIP_URL_MAX_BYTES", int, 20 * MB, minimum=1, doc="a URL download's size")),
    # the model thread on one piece of work longer: the replica is taken out
    ("stall_s", Setting("CLIP_STALL_S", float, 120.0, minimum=0, doc="the model thread's stall limit")),
    ("decode_memory_mb", Setting("CLIP_DECODE_MEMORY_MB", int, 1024, minimum=1, doc="decoded pixels held at once")),
    ("heavy_pixels", Setting("CLIP_HEAVY_PIXELS", int, 4_000_000, minimum=1, doc="never take the last decoder")),
    ("max_jpeg_segments", Setting("CLIP_MAX_JPEG_SEGMENTS", int, Limits.max_segments, minimum=1, doc="decode bombs")),
    ("max_jpeg_fill_bytes", Setting("CLIP_MAX_JPEG_FILL_BYTES", int, Limits.max_fill_bytes, minimum=0, doc="ditto")),
    ("max_scan_pixels", Setting("CLIP_MAX_SCAN_PIXELS", int, Limits.max_scan_pixels, minimum=1, doc="ditto")),
    ("max_rle_pixels", Setting("CLIP_MAX_RLE_PIXELS", int, Limits.max_rle_pixels, minimum=0, doc="ditto")),
)
DECLARATIONS: tuple[Setting, ...] = tuple(setting for _, setting in FIELDS)
_DEFAULTS = {field: setting.default for field, setting in FIELDS}


def _host_setting(name: str) -> Setting:
    return next(setting for setting in settings.HOST_SETTINGS if setting.name == name)


@dataclass(frozen=True)
class Settings:
    """The values from_env() read; the defaults are the declarations' (max_queue: this worker's share)."""

    model: str = _DEFAULTS["model"]
    pretrained: str = _DEFAULTS["pretrained"]
    device: str = _DEFAULTS["device"]
    dtype: str = _DEFAULTS["dtype"]  # auto|fp32|bf16|fp16 (precision.py)
    cache_dir: str = os.path.expanduser(_DEFAULTS["cache_dir"])
    default_label_set: str = _DEFAULTS["default_label_set"]
    preload_label_sets: tuple = (_DEFAULTS["default_label_set"],)
    label_sets_dir: str = _DEFAULTS["label_sets_dir"]
    file_sets: tuple[FileSet, ...] = ()  # the label sets read from files (label_files.py)
    custom_templates: str = _DEFAULTS["custom_templates"]  # "simple" (1 prompt per label) or "cifar" (the 18)
    max_batch: int = _DEFAULTS["max_batch"]  # 0 = the default for the device and dtype (precision.py)
    max_wait_ms: float = _DEFAULTS["max_wait_ms"]
    max_queue: int = _DEFAULTS["max_queue"]  # images admitted at once (decoding, queued, encoding), per worker
    deadline_s: float = _DEFAULTS["deadline_s"]
    max_body_bytes: int = _host_setting("MAX_BODY_BYTES").default  # the host's: enforced there, shown in GET /
    max_pixels: int = _DEFAULTS["max_pixels"]
    max_images: int = _DEFAULTS["max_images"]
    max_labels: int = _DEFAULTS["max_labels"]
    max_label_chars: int = _DEFAULTS["max_label_chars"]
    label_cache_size: int = _DEFAULTS["label_cache_size"]
    top_k: int = _DEFAULTS["top_k"]
    threads: int = _DEFAULTS["threads"]  # torch intra-op threads per process; 0 = the CPUs it may use (threads())
    decoders: int = _DEFAULTS["decoders"]  # images decoded at once; 0 = as many as the torch threads
    device_decode: str = _DEFAULTS["device_decode"]  # JPEGs decoded on the model's device: auto (CUDA only), on, off
    url_allow_hosts: tuple = _DEFAULTS["url_allow_hosts"]
    url_allow_networks: tuple = _DEFAULTS["url_allow_networks"]  # private networks URL input may reach (CIDRs)
    url_timeout_s: float = _DEFAULTS["url_timeout_s"]
    url_max_bytes: int = _DEFAULTS["url_max_bytes"]
    stall_s: float = _DEFAULTS["stall_s"]  # model thread on one piece of work longer: replica taken out
    decode_memory_mb: int = _DEFAULTS["decode_memory_mb"]  # decoded pixels held at once by concurrent decodes
    heavy_pixels: int = _DEFAULTS["heavy_pixels"]  # pictures bigger than this never take the last decoder
    max_jpeg_segments: int = _DEFAULTS["max_jpeg_segments"]
    max_jpeg_fill_bytes: int = _DEFAULTS["max_jpeg_fill_bytes"]
    max_scan_pixels: int = _DEFAULTS["max_scan_pixels"]
    max_rle_pixels: int = _DEFAULTS["max_rle_pixels"]

    def structure_limits(self) -> Limits:
        return Limits(self.max_jpeg_segments, self.max_jpeg_fill_bytes, self.max_scan_pixels, self.max_rle_pixels)


def workers() -> int:
    """Host processes serving this function (the host's FUNCTION_WORKERS, read as the host declares it);
    each has its own model."""
    return int(settings.read([_host_setting("FUNCTION_WORKERS")])["FUNCTION_WORKERS"])


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
    """Every setting, read and checked, and the label-set files with them; the first bad value or file raises
    settings.SettingError (one line)."""
    # the label-set names are checked once the files have said which sets there are
    values: dict[str, Any] = settings.read(
        dataclasses.replace(s, choices=None) if s.name in NAMING_SETS else s for s in DECLARATIONS
    )
    file_sets = read_all(
        folders(values["CLIP_LABEL_SETS_DIR"]),
        {**{name: "a built-in label set" for name in LABEL_SET_NAMES}, "custom": "the set a request's own labels make"},
        values["CLIP_MAX_LABELS"],
        values["CLIP_MAX_LABEL_CHARS"],
    )
    names = (*LABEL_SET_NAMES, *file_sets)
    values.update(settings.read(dataclasses.replace(s, choices=names) for s in DECLARATIONS if s.name in NAMING_SETS))
    read = {field: values[setting.name] for field, setting in FIELDS}
    read["file_sets"] = tuple(file_sets.values())
    read["cache_dir"] = os.path.expanduser(read["cache_dir"])
    read["preload_label_sets"] = read["preload_label_sets"] or (read["default_label_set"],)
    read["max_queue"] = per_worker(read["max_queue"], workers())
    read["url_allow_hosts"] = tuple(host.lower() for host in read["url_allow_hosts"])
    try:
        read["url_allow_networks"] = parse_networks(",".join(read["url_allow_networks"]))
    except ValueError as exc:
        raise settings.SettingError(str(exc)) from None
    return Settings(max_body_bytes=settings.host()["MAX_BODY_BYTES"], **read)
