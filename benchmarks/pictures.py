"""Synthetic photos for the benchmarks, the load test and the device-decode tests: smooth gradients,
shapes and sensor noise, so JPEG sizes and decode costs are like a real photo's."""

import io

import numpy as np
from PIL import Image, ImageDraw


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A synthetic photo (smooth gradients, shapes, sensor noise): JPEG sizes and decode costs like a real one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(x / width * 3 + seed),
            128 + 100 * np.cos(y / height * 4),
            128 + 80 * np.sin((x + y) / (width + height) * 6),
        ],
        -1,
    )
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0, r = (
            int(v) for v in (rng.integers(0, width), rng.integers(0, height), rng.integers(width // 40, width // 6))
        )
        draw.ellipse([x0, y0, x0 + r, y0 + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
