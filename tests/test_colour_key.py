"""PNG colour-key transparency (a grey or RGB picture's tRNS chunk): the key colour's pixels are
transparent, and are classified on white like every other form of transparency."""
import io
import struct
import zlib

import numpy as np
import pytest
from clip.images import load_image
from PIL import Image
from support.inprocess import Event, service

SIZE = (40, 32)  # width, height


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(pixels: np.ndarray, depth: int, key=None) -> bytes:
    """A PNG written by hand (Pillow writes neither 16-bit RGB nor 2- and 4-bit grey): grey if pixels is
    2-D, else RGB; with a tRNS colour key when key is given."""
    height, width = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2
    if depth < 8:  # pack the samples into bytes, most significant bits first
        per_byte = 8 // depth
        padded = np.zeros((height, -(-width // per_byte) * per_byte), np.uint8)
        padded[:, :width] = pixels
        groups = padded.reshape(height, -1, per_byte)
        shifts = np.arange(per_byte - 1, -1, -1) * depth
        rows = [bytes((groups[y] << shifts).sum(axis=1).astype(np.uint8)) for y in range(height)]
    else:
        rows = [pixels[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(height)]
    body = b"".join(b"\x00" + row for row in rows)
    values = [int(k) for k in np.atleast_1d(key)] if key is not None else []
    trns = chunk(b"tRNS", struct.pack(f">{len(values)}H", *values)) if values else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
            + trns + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b""))


def picture(channels: int, depth: int, seed: int = 0):
    """Random pixels at this depth with a key colour in a block of them: (pixels, key, where the key is)."""
    rng = np.random.default_rng(seed)
    top = (1 << depth) - 1
    shape = (SIZE[1], SIZE[0]) if channels == 1 else (SIZE[1], SIZE[0], 3)
    pixels = rng.integers(0, top + 1, shape, dtype=np.int64)
    key = np.array([top // 3] * channels if channels == 3 else [top // 3])
    if depth == 16:  # 16-bit RGB is decoded to its high bytes: no other pixel may share the key's
        near = (pixels >> 8 == key >> 8).all(axis=-1) if channels == 3 else pixels >> 8 == key[0] >> 8
        pixels[near] = top
    else:
        same = (pixels == key).all(axis=-1) if channels == 3 else pixels == key[0]
        pixels[same] = top
    keyed = np.zeros(shape[:2], bool)
    keyed[8:20, 5:30] = True
    pixels[keyed] = key if channels == 3 else key[0]
    return pixels, key if channels == 3 else int(key[0]), keyed


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(load_image(data, 10**7, 224))


CASES = [(3, 8), (3, 16), (1, 8), (1, 16), (1, 4), (1, 2), (1, 1)]


@pytest.mark.parametrize(("channels", "depth"), CASES, ids=[f"{'RGB' if c == 3 else 'grey'} {d}-bit" for c, d in CASES])
def test_the_key_colours_pixels_are_white(channels, depth):
    pixels, key, keyed = picture(channels, depth)
    painted = pixels.copy()
    painted[keyed] = (1 << depth) - 1  # white
    expected = decoded(png(painted, depth))
    got = decoded(png(pixels, depth, key))
    assert not (decoded(png(pixels, depth))[keyed] == 255).all(), "the key colour is not white already"
    assert (got[keyed] == 255).all()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_pillow_saved_colour_key_is_white_too(mode):
    pixels, key, keyed = picture(3 if mode == "RGB" else 1, 8, seed=1)
    image = Image.fromarray(pixels.astype(np.uint8), mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=tuple(int(k) for k in key) if mode == "RGB" else key)
    painted = pixels.astype(np.uint8)
    painted[keyed] = 255
    np.testing.assert_array_equal(decoded(buffer.getvalue()), np.asarray(Image.fromarray(painted, mode).convert("RGB")))


def test_a_colour_keyed_png_is_classified_on_white(tiny_model, clip_env):
    from clip import handler
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"])
    pixels, key, keyed = picture(3, 8, seed=2)
    painted = pixels.copy()
    painted[keyed] = 255
    previous, handler.SERVICE = handler.SERVICE, svc
    try:
        answers = [handler.handle(Event(data, "image/png"), None) for data in
                   (png(pixels, 8, key), png(painted, 8), png(pixels, 8))]
    finally:
        handler.SERVICE = previous
    assert all(answer["statusCode"] == 200 for answer in answers)
    keyed_answer, on_white, on_key = (answer["body"]["predictions"] for answer in answers)
    assert keyed_answer == on_white and on_white != on_key
