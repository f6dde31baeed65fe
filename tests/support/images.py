"""Test pictures made on the fly."""
import io

import numpy as np
from PIL import Image


def image_bytes(fmt="PNG", size=(96, 64), color=(200, 40, 40), mode="RGB", **save):
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def noise_image(fmt="PNG", size=(96, 64), seed=0, **save):
    """A picture with structure, so different images give different answers."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, fmt, **save)
    return buffer.getvalue()
