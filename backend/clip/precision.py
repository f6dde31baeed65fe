"""Which dtype the model computes in (CLIP_DTYPE), and why.

bf16 weights halve a CPU forward pass only where the processor multiplies bf16 natively (AMX, or
AVX512-BF16); elsewhere oneDNN emulates bf16 and a forward pass is several times slower than fp32.
So `auto` picks bf16 on a CPU only when torch reports one of those instruction sets (/proc/cpuinfo
where torch cannot say) AND a short measurement at start finds bf16 faster than fp32 on a block
shaped like the model's: never slower than fp32. On CUDA `auto` is fp16.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
SETTINGS = ("auto", *DTYPES)
# bf16 must beat fp32 by this factor at start: a tie is not worth bf16's rounding.
BF16_MUST_BE_FASTER = 0.9
# CLIP_MAX_BATCH when unset (docs/performance.md). fp32 on a CPU: 8 (2-core AMD EPYC: 21.6 images/s at
# batch 8 against 13.3 at batch 1; whether fp32 gains beyond 8 has not been measured). bf16 on a CPU:
# 16, from a 2-core AMX Xeon's raw encode_image (94-118 images/s at batch 8, 138 at 32): 16 takes most
# of that gain while two batches still fit CLIP_MAX_QUEUE's 32, one computing while the next fills.
# CUDA: 16, which bounds the wait; a GPU gains far beyond it (clip.gpu.yml sets 64, measured on an H100).
DEFAULT_MAX_BATCH = {
    ("cpu", torch.float32): 8,
    ("cpu", torch.bfloat16): 16,
    ("cpu", torch.float16): 8,
    ("cuda", torch.float32): 16,
    ("cuda", torch.bfloat16): 16,
    ("cuda", torch.float16): 16,
}


@dataclass(frozen=True)
class CpuFeatures:
    """What the processor offers for bf16, as torch (or, failing that, /proc/cpuinfo) reports it."""

    amx_bf16: bool
    avx512_bf16: bool
    capability: str  # torch's kernel level, e.g. "AVX2", "AVX512"
    source: str  # "torch" or "cpuinfo": who answered

    @property
    def native_bf16(self) -> bool:
        return self.amx_bf16 or self.avx512_bf16

    def describe(self) -> str:
        found = [name for name, on in (("AMX-BF16", self.amx_bf16), ("AVX512-BF16", self.avx512_bf16)) if on]
        return (
            f"{' and '.join(found) if found else 'no AMX-BF16, no AVX512-BF16'} "
            f"(per {self.source}; torch kernels: {self.capability})"
        )


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    setting: str  # what CLIP_DTYPE said
    reason: str  # one sentence: why this dtype, for GET /, the logs and the benchmark

    @property
    def name(self) -> str:
        return NAMES[self.dtype]


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> set:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_features(cpuinfo_path: str = "/proc/cpuinfo") -> CpuFeatures:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = "unknown"
    try:  # torch's own checks (cpuinfo + OS permission for the AMX tiles)
        return CpuFeatures(
            bool(torch.cpu._is_amx_tile_supported()), bool(torch.cpu._is_avx512_bf16_supported()), capability, "torch"
        )
    except AttributeError:  # an older or newer torch without these private checks
        flags = _cpuinfo_flags(cpuinfo_path)
        return CpuFeatures("amx_bf16" in flags, "avx512_bf16" in flags, capability, "cpuinfo")


def baked_dtypes(features: CpuFeatures) -> str:
    """What the build-ahead step bakes for CLIP_DTYPE=auto: bf16 too only where it may be chosen."""
    return "fp32,bf16" if features.native_bf16 else "fp32"


def measure_bf16(width: int = 768, tokens: int = 100, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one pre-norm transformer MLP (ViT-B width, two images' tokens) in fp32 and
    in bf16: the layers that dominate a CLIP forward pass. Weights from a private generator."""
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(4 * width, width, generator=gen) / width**0.5
    w2 = torch.randn(width, 4 * width, generator=gen) / (4 * width) ** 0.5
    x = torch.randn(tokens, width, generator=gen)

    def block(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.layer_norm(x, (x.shape[-1],))
        return x + torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(h, w1)), w2)

    def median(dtype: torch.dtype) -> float:
        args = [t.to(dtype) for t in (x, w1, w2)]
        times = []
        with torch.inference_mode():
            for i in range(repeats + 2):
                started = time.perf_counter()
                block(*args)
                if i >= 2:  # two warm-up runs: oneDNN builds its kernels on first use
                    times.append(time.perf_counter() - started)
        return statistics.median(times)

    return median(torch.float32), median(torch.bfloat16)


def choose(
    setting: str,
    device_type: str,
    features: CpuFeatures | None = None,
    measure: Callable[[], tuple[float, float]] | None = measure_bf16,
    cuda_bf16: bool = True,
) -> Precision:
    """The dtype for CLIP_DTYPE=`setting` on a `device_type` ("cpu"/"cuda") device. Pure but for
    `measure`, called only for `auto` on a CPU that reports native bf16."""
    setting = (setting or "auto").strip().lower()
    if setting not in SETTINGS:
        raise ValueError(f"CLIP_DTYPE must be one of {', '.join(SETTINGS)}; got {setting!r}")
    if device_type == "cuda":
        if setting == "auto":
            return Precision(torch.float16, setting, "auto on CUDA: fp16 (tensor cores, half the memory)")
        if setting == "bf16" and not cuda_bf16:
            raise ValueError("CLIP_DTYPE=bf16, but this GPU has no bf16 support; use fp16 or auto")
        return Precision(DTYPES[setting], setting, f"set by CLIP_DTYPE={setting}")
    if device_type != "cpu":
        safe = ": fp32, the safe choice" if setting == "auto" else ""
        return Precision(
            torch.float32 if setting == "auto" else DTYPES[setting],
            setting,
            f"{setting} on a {device_type} device{safe}",
        )
    features = features or cpu_features()
    if setting == "fp32":
        return Precision(torch.float32, setting, f"set by CLIP_DTYPE=fp32; CPU: {features.describe()}")
    if setting == "bf16":
        note = "native" if features.native_bf16 else "emulated, several times slower than fp32"
        return Precision(torch.bfloat16, setting, f"set by CLIP_DTYPE=bf16 ({note}); CPU: {features.describe()}")
    if setting == "fp16":
        return Precision(
            torch.float16,
            setting,
            f"set by CLIP_DTYPE=fp16 (most CPUs emulate fp16: usually slower than fp32); CPU: {features.describe()}",
        )
    if not features.native_bf16:
        return Precision(torch.float32, setting, f"auto: fp32, this CPU has {features.describe()}")
    if measure is None:
        return Precision(torch.bfloat16, setting, f"auto: bf16, this CPU has {features.describe()}")
    fp32_s, bf16_s = measure()
    timing = f"a ViT MLP block took {bf16_s * 1e3:.1f} ms in bf16 against {fp32_s * 1e3:.1f} ms in fp32"
    if bf16_s <= fp32_s * BF16_MUST_BE_FASTER:
        return Precision(torch.bfloat16, setting, f"auto: bf16, this CPU has {features.describe()} and {timing}")
    return Precision(torch.float32, setting, f"auto: fp32, this CPU has {features.describe()} but {timing}")


def default_max_batch(device_type: str, dtype: torch.dtype) -> int:
    return DEFAULT_MAX_BATCH.get((device_type, dtype), 8)
