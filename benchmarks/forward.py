"""The model's own forward time in this process (open_clip's encode_image): the reference every served
figure of scripts/bench is a ratio to, the model-choice table (--models) and the batch sweep (--sweep)."""

import os
import sys
from collections.abc import Sequence

import torch
from clip import model as model_module

from benchmarks.timing import median_time

# Published zero-shot CIFAR-100 accuracy (open_clip's results table; MobileCLIP2 from Apple's tables).
MODELS = [
    ("ViT-B-32", "datacomp_xl_s13b_b90k", 80.3),
    ("ViT-B-32-256", "datacomp_s34b_b86k", 82.9),
    ("ViT-B-16", "datacomp_xl_s13b_b90k", 82.1),
    ("MobileCLIP2-S0", "dfndr2b", 77.8),
    ("MobileCLIP2-S2", "dfndr2b", 84.8),
    ("ViT-L-14", "datacomp_xl_s13b_b90k", 87.4),
]

SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)


def create(name: str, dtype: str) -> model_module.ClipModel:
    return model_module.create(name, "none", device=os.environ.get("CLIP_DEVICE", "auto"), dtype=dtype)


def raw_model(name: str, runs: int, dtype: str = "fp32") -> tuple[model_module.ClipModel, dict[str, float]]:
    """open_clip's encode_image alone, batch 1 and batch 8, in this process."""
    clip = create(name, dtype)
    size = clip.image_size
    batch = torch.randn(8, 3, size, size)
    one = median_time(lambda: clip.encode_images(batch[:1]), runs)
    eight = median_time(lambda: clip.encode_images(batch), max(3, runs // 4))
    params = sum(p.numel() for p in clip.model.parameters())
    return clip, {
        "batch1_ms": one * 1000,
        "batch8_images_per_s": 8 / eight,
        "params_m": params / 1e6,
        "image_size": size,
    }


def models_figures(dtypes: Sequence[str], runs: int) -> dict[str, dict[str, dict[str, float]]]:
    """MODELS' raw figures per dtype: name -> (dtype -> raw_model's figures), each printed as it comes."""
    by_model: dict[str, dict[str, dict[str, float]]] = {}
    for name, _, _ in MODELS:
        figures: dict[str, dict[str, float]] = {}
        by_model[name] = figures
        for d in dtypes:
            clip, figures[d] = raw_model(name, runs=runs, dtype=d)
            del clip
        print(f"{name}: {figures}", file=sys.stderr, flush=True)
    return by_model


def sweep(name: str, dtypes: Sequence[str], runs: int) -> dict[str, dict[int, float]]:
    """Raw images/s per batch size and dtype: how CLIP_MAX_BATCH's defaults are chosen."""
    table: dict[str, dict[int, float]] = {}
    for d in dtypes:
        table[d] = batch_rates(create(name, d), runs)  # the model is freed before the next dtype loads
        print(f"{d}: {table[d]}", file=sys.stderr, flush=True)
    return table


def batch_rates(clip: model_module.ClipModel, runs: int) -> dict[int, float]:
    """One model's raw images/s at each of SWEEP_BATCHES."""
    x = torch.randn(32, 3, clip.image_size, clip.image_size)
    return {b: b / median_time(lambda: clip.encode_images(x[:b]), max(3, runs // b), warmup=1) for b in SWEEP_BATCHES}
