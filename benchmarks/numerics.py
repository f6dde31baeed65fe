"""bf16 against fp32 on the same random weights (scripts/bench --numerics, and after the served figures)."""

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from clip.images import load_image
from clip.labels import LABEL_SETS, Template, class_embeddings

from benchmarks.forward import create
from benchmarks.pictures import jpeg, photo


def numerics(name: str, templates: Sequence[Template] | None = None, images: int = 8) -> dict[str, Any]:
    """bf16 against fp32 on the same random weights: worst image- and text-feature cosine, and worst
    |Δp| over CIFAR-100's scores (each side's probabilities in fp32 from its own features)."""
    cifar = LABEL_SETS["cifar100"]
    templates = templates or cifar.templates
    bodies = [jpeg(photo(320, 240, seed=20 + i)) for i in range(images)]
    out = {}
    for d in ("fp32", "bf16"):
        clip = create(name, d)
        started = time.perf_counter()
        classes = class_embeddings(clip.encode_texts, cifar.labels, templates)
        text_s = time.perf_counter() - started
        features = clip.encode_prepared(
            [clip.prepare(load_image(b, 50_000_000, clip.image_size)) for b in bodies]
        ).numpy()
        logits = clip.logit_scale * features @ classes.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        out[d] = (features, classes, probs / probs.sum(axis=1, keepdims=True), text_s)
        del clip
    (f32, t32, p32, s32), (f16, t16, p16, s16) = out["fp32"], out["bf16"]
    return {
        "model": name,
        "images": images,
        "prompts_per_class": len(templates),
        "worst_image_feature_cosine": float((f32 * f16).sum(axis=1).min()),
        "worst_class_embedding_cosine": float((t32 * t16).sum(axis=1).min()),
        "worst_abs_delta_p": float(np.abs(p32 - p16).max()),
        "top1_agreement": float((p32.argmax(axis=1) == p16.argmax(axis=1)).mean()),
        "cifar100_prompts_encode_s": {"fp32": s32, "bf16": s16},
    }
