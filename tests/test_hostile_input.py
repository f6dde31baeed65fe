"""Hostile and unusual input against the clip function over real HTTP: every bad request gets a JSON
4xx quickly, every valid but unusual picture classifies, and the next good request still works."""
import base64
import io
import json
import re
import socket
import struct
import zlib

import numpy as np
import psutil
import pytest
import requests
from PIL import Image
from support.images import image_bytes, noise_image

GOOD = image_bytes("PNG")
RNG = np.random.default_rng(20240607)


def random_bytes(n):
    return RNG.integers(0, 256, n, dtype=np.uint8).tobytes()


def png_chunk(kind, data, crc=None):
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def png_claiming(width, height):
    """A PNG whose header claims a huge size over a few bytes of data: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + png_chunk(b"IEND", b""))


def bmp_claiming(width, height):
    """A BMP file header + info header claiming width×height 24-bit pixels, and no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", (54 + width * height * 3) & 0xFFFFFFFF, 0, 0, 54) + info


def tiff_claiming(width, height):
    """A little-endian TIFF whose one IFD claims width×height 8-bit grey pixels over 16 bytes of data."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 9 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(16)


def gif_claiming(width, height):
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08\x02\x02\x44\x01\x00\x3b"
    return b"GIF89a" + screen + frame


def webp_claiming(width, height):
    """An extended-format (VP8X) WebP header claiming a width×height canvas, and no image data."""
    vp8x = (b"VP8X" + struct.pack("<II", 10, 0) + (width - 1).to_bytes(3, "little")
            + (height - 1).to_bytes(3, "little"))
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def with_bad_idat_crc(png):
    """Flip the CRC of the first IDAT chunk (Pillow itself only checks the header chunks' CRCs)."""
    at = png.index(b"IDAT")
    end = at + 4 + struct.unpack(">I", png[at - 4:at])[0]
    return png[:end] + bytes([png[end] ^ 0xFF]) + png[end + 1:]


def jpeg_with_random_scan(jpeg):
    """Valid JPEG headers, then random entropy-coded data (stray markers included)."""
    scan = jpeg.index(b"\xff\xda") + 14
    return jpeg[:scan] + random_bytes(len(jpeg) - scan - 2) + b"\xff\xd9"


JPEG = noise_image("JPEG", size=(128, 96), seed=7)
PNG = noise_image("PNG", size=(128, 96), seed=7)

HOSTILE = {
    "empty body": b"",
    "one byte": b"\x00",
    "one letter": b"A",
    "text": b"hello, this is not a picture\n",
    "HTML": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "PDF": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    "ZIP": b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + random_bytes(200),
    "SVG": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
           b'<script>alert(1)</script></svg>',
    "random bytes": random_bytes(4096),
    "truncated JPEG": JPEG[:len(JPEG) // 2],
    "truncated PNG": PNG[:len(PNG) // 2],
    "JPEG header alone": JPEG[:20],
    "JPEG SOI alone": b"\xff\xd8\xff",
    "corrupt JPEG data (garbage after SOI)": b"\xff\xd8\xff\xe0" + random_bytes(3000),
    "corrupt JPEG data (garbage tables)": JPEG[:20] + random_bytes(300) + JPEG[320:],
    "corrupt JPEG data (random scan)": jpeg_with_random_scan(JPEG),
    "PNG with a bad IHDR CRC": PNG[:29] + bytes([PNG[29] ^ 0xFF]) + PNG[30:],
    "PNG with a bad IDAT CRC": with_bad_idat_crc(PNG),
    "PNG signature alone": b"\x89PNG\r\n\x1a\n",
    "GIF header alone": b"GIF89a\x10\x00\x10\x00",
    "TIFF header alone": b"II*\x00\x08\x00\x00\x00",
    "WebP header alone": b"RIFF\x24\x00\x00\x00WEBPVP8 ",
    "PNG claiming 100,000x100,000": png_claiming(100_000, 100_000),
    "BMP claiming 60,000x60,000": bmp_claiming(60_000, 60_000),
    "BMP claiming 60,000x-60,000": bmp_claiming(60_000, -60_000),
    "TIFF claiming 100,000x100,000": tiff_claiming(100_000, 100_000),
    "GIF claiming 65,535x65,535": gif_claiming(65_535, 65_535),
    "WebP claiming 16,384x16,384": webp_claiming(16_384, 16_384),
}
BOMBS = {name for name in HOSTILE if "claiming" in name}


def assert_json_error(response, status=None):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["error"]["code"] and body["error"]["message"], body
    # No internals: no traceback, no object addresses, no file paths of the server.
    assert "Traceback" not in response.text and " at 0x" not in response.text, body
    return body["error"]["code"]


def assert_still_serves(server):
    response = requests.post(server.url, data=GOOD, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"]


@pytest.mark.parametrize("form", ["raw", "multipart"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bytes_get_a_json_4xx_within_2_s(clip_server, name, form):
    payload = HOSTILE[name]
    kwargs = {"data": payload} if form == "raw" else {"files": {"image": ("upload.bin", payload)}}
    response = requests.post(clip_server.url, timeout=2, **kwargs)  # timeout: the 2 s bound
    code = assert_json_error(response, 413 if name in BOMBS else None)
    if name == "empty body":
        assert code == "missing_image"
    elif name in BOMBS:
        assert code == "image_too_large"
    assert_still_serves(clip_server)


def test_bombs_are_refused_before_their_pixels_are_allocated(clip_server):
    """100,000² RGB pixels would be 30 GB: the answer comes from the header, the process stays small."""
    process = psutil.Process(clip_server.host_pid)
    before = process.memory_info().rss
    for _ in range(5):
        for name in sorted(BOMBS):
            assert requests.post(clip_server.url, data=HOSTILE[name], timeout=2).status_code == 413
    assert process.memory_info().rss - before < 200 * 2**20


# ---- valid but unusual pictures ------------------------------------------------------------------

def picture(size=(160, 120), seed=3):
    """Blocks of colour: survives lossy codecs and palettes, so answers are comparable."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    big = np.kron(blocks, np.ones((size[1] // 6 + 1, size[0] // 8 + 1, 1), dtype=np.uint8))
    return Image.fromarray(np.ascontiguousarray(big[:size[1], :size[0]]), "RGB")


def encode(image, fmt, **save):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def with_alpha(image, mode="RGBA"):
    alpha = Image.linear_gradient("L").resize(image.size)
    base = image.convert(mode[:-1] if mode != "LA" else "L")
    base.putalpha(alpha)
    return base


def sixteen_bit(image):
    pixels = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(pixels.astype("<u2"))  # mode I;16


def animated_gif(frames):
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


UNUSUAL = {
    "CMYK JPEG": lambda: encode(picture().convert("CMYK"), "JPEG", quality=90),
    "grayscale JPEG": lambda: encode(picture().convert("L"), "JPEG"),
    "progressive JPEG": lambda: encode(picture(), "JPEG", progressive=True, quality=90),
    "RGBA PNG": lambda: encode(with_alpha(picture()), "PNG"),
    "LA PNG": lambda: encode(with_alpha(picture(), "LA"), "PNG"),
    "16-bit grayscale PNG": lambda: encode(sixteen_bit(picture()), "PNG"),
    "16-bit RGB PNG": lambda: _png16_rgb(picture()),
    "1-bit PNG": lambda: encode(picture().convert("1"), "PNG"),
    "palette PNG with transparency": lambda: encode(picture().convert("P", palette=Image.ADAPTIVE, colors=16),
                                                    "PNG", transparency=0),
    "WebP lossy": lambda: encode(picture(), "WEBP", quality=80),
    "WebP lossless with alpha": lambda: encode(with_alpha(picture()), "WEBP", lossless=True),
    "TIFF": lambda: encode(picture(), "TIFF"),
    "TIFF LZW": lambda: encode(picture(), "TIFF", compression="tiff_lzw"),
    "TIFF 16-bit grayscale": lambda: encode(sixteen_bit(picture()), "TIFF"),
    "BMP": lambda: encode(picture(), "BMP"),
    "BMP 8-bit palette": lambda: encode(picture().convert("P"), "BMP"),
    "GIF": lambda: encode(picture(), "GIF"),
    "GIF87a": lambda: encode(picture(), "GIF").replace(b"GIF89a", b"GIF87a", 1),
    "animated GIF": lambda: animated_gif([picture(seed=s) for s in (3, 4, 5)]),
}


def _png16_rgb(image):
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow writes 16-bit only for one channel)."""
    pixels = np.asarray(image, dtype=">u2") * 257
    raw = b"".join(b"\0" + row.tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", image.width, image.height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def classify(server, data, **params):
    response = requests.post(server.url, data=data, params={"top_k": 100, **params}, timeout=30)
    assert response.status_code == 200, response.text[:300]
    return response.json()["predictions"]


def scores(predictions):
    return {row["label"]: row["score"] for row in predictions}


def distance(a, b):
    a, b = scores(a), scores(b)
    return max(abs(a[k] - b[k]) for k in a)


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_valid_unusual_pictures_classify(clip_server, name):
    rows = classify(clip_server, UNUSUAL[name]())
    assert len(rows) == 100 and abs(sum(r["score"] for r in rows) - 1) < 1e-3


def test_animated_gif_is_classified_by_its_first_frame(clip_server):
    frames = [picture(seed=s) for s in (3, 4, 5)]
    first = classify(clip_server, encode(frames[0], "PNG"))
    other = classify(clip_server, encode(frames[1], "PNG"))
    animated = classify(clip_server, animated_gif(frames))
    assert distance(animated, first) < 1e-4 < distance(animated, other)


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180),
                                                     (8, Image.Transpose.ROTATE_270),
                                                     (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_exif_rotated_jpeg_is_classified_upright(clip_server, orientation, transpose):
    """A camera stores the sensor's pixels and an EXIF orientation: the answer is the upright picture's."""
    upright = picture(size=(192, 128), seed=9)
    stored = upright.transpose(transpose)  # what the camera wrote; orientation says how to undo it
    exif = Image.Exif()
    exif[0x0112] = orientation
    rotated = encode(stored, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    expected = classify(clip_server, encode(upright, "JPEG", quality=100, subsampling=0))
    sideways = classify(clip_server, encode(stored, "JPEG", quality=100, subsampling=0))
    got = classify(clip_server, rotated)
    # Same answer as the upright picture, and clearly not the answer for the pixels as stored.
    assert [r["label"] for r in got[:5]] == [r["label"] for r in expected[:5]]
    assert distance(got, expected) < distance(got, sideways) / 5


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (1, 3000), (3000, 1), (7, 4000)])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_degenerate_sizes_answer_200_or_a_clear_4xx(clip_server, size, fmt):
    if fmt == "JPEG" and max(size) > 65500:
        pytest.skip("JPEG cannot hold it")
    response = requests.post(clip_server.url, data=noise_image(fmt, size=size), timeout=30)
    if response.status_code != 200:
        assert_json_error(response)
    else:
        assert response.json()["predictions"]
    assert_still_serves(clip_server)


# ---- request abuse ---------------------------------------------------------------------------------

B64 = base64.b64encode(GOOD).decode()
MULTIPART = "multipart/form-data; boundary=XyZ"
ABUSE = {
    # name: (request kwargs, expected status, expected error code)
    "multipart, garbage body": (dict(data=b"garbage", headers={"Content-Type": MULTIPART}), 400, "invalid_form"),
    "multipart, no boundary": (dict(data=b"--XyZ\r\n\r\n", headers={"Content-Type": "multipart/form-data"}),
                               400, "invalid_form"),
    "multipart, unterminated part": (dict(data=b'--XyZ\r\nContent-Disposition: form-data; name="image"; '
                                               b'filename="a.png"\r\n\r\n' + GOOD[:50],
                                          headers={"Content-Type": MULTIPART}), 400, "invalid_form"),
    "multipart, part without headers": (dict(data=b"--XyZ\r\n\r\n\r\nabc\r\n--XyZ--\r\n",
                                             headers={"Content-Type": MULTIPART}), 400, "invalid_form"),
    "multipart without image": (dict(files={"top_k": (None, "3"), "labels": (None, "cat,dog")}),
                                400, "missing_image"),
    "multipart, empty file part": (dict(files={"image": ("", b"")}), 400, "missing_image"),
    "multipart, image field as text": (dict(files={"image": (None, "not base64 at all!")}), 400, "invalid_image"),
    "multipart, other field name": (dict(files={"picture": ("a.png", GOOD)}), 400, "missing_image"),
    "invalid JSON": (dict(data=b'{"image": ', headers={"Content-Type": "application/json"}), 400, "invalid_json"),
    "JSON, deeply nested": (dict(data=b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                 headers={"Content-Type": "application/json"}), 400, "invalid_json"),
    "JSON, not UTF-8": (dict(data=b'{"image": "\xff\xfe"}', headers={"Content-Type": "application/json"}),
                        400, "invalid_json"),
    "JSON array": (dict(json=[B64]), 400, "invalid_json"),
    "JSON string": (dict(json=B64), 400, None),
    "JSON null": (dict(json=None, data=b"null", headers={"Content-Type": "application/json"}), 400, "invalid_json"),
    "JSON, image a number": (dict(json={"image": 42}), 400, "invalid_json"),
    "JSON, image null": (dict(json={"image": None}), 400, "invalid_json"),
    "JSON, image a list": (dict(json={"image": [B64]}), 400, "invalid_json"),
    "JSON, images a string": (dict(json={"images": B64}), 400, "invalid_json"),
    "JSON, images of numbers": (dict(json={"images": [1, 2]}), 400, "invalid_json"),
    "JSON, images empty": (dict(json={"images": []}), 400, "missing_image"),
    "JSON, url a number": (dict(json={"url": 5}), 400, "invalid_json"),
    "JSON, no image key": (dict(json={"picture": B64}), 400, "missing_image"),
    "bad base64": (dict(data=b"!!!not*base64???"), 400, "invalid_image"),
    "bad base64 in JSON": (dict(json={"image": "%%%%"}), 400, "invalid_image"),
    "base64 of text": (dict(data=base64.b64encode(b"just some text, no picture")), 400, "invalid_image"),
    "data URL, not base64": (dict(data=b"data:image/png,hello"), 400, "invalid_image"),
    "data URL of text": (dict(data=b"data:image/png;base64," + base64.b64encode(b"text")), 400, "invalid_image"),
    "17 images": (dict(json={"images": [B64] * 17}), 400, "too_many_images"),
    "top_k 0": (dict(data=GOOD, params={"top_k": "0"}), 400, "invalid_option"),
    "top_k -1": (dict(data=GOOD, params={"top_k": "-1"}), 400, "invalid_option"),
    "top_k 1.5": (dict(data=GOOD, params={"top_k": "1.5"}), 400, "invalid_option"),
    "top_k abc": (dict(data=GOOD, params={"top_k": "abc"}), 400, "invalid_option"),
    "top_k 5000 digits": (dict(data=GOOD, params={"top_k": "9" * 5000}), 400, "invalid_option"),
    "JSON top_k 1.5": (dict(json={"image": B64, "top_k": 1.5}), 400, "invalid_option"),
    "JSON top_k -1": (dict(json={"image": B64, "top_k": -1}), 400, "invalid_option"),
    "JSON top_k true": (dict(json={"image": B64, "top_k": True}), 400, "invalid_option"),
    "JSON top_k a list": (dict(json={"image": B64, "top_k": [3]}), 400, "invalid_option"),
    "JSON top_k an object": (dict(json={"image": B64, "top_k": {"n": 3}}), 400, "invalid_option"),
    "JSON top_k NaN": (dict(data=b'{"image": "%s", "top_k": NaN}' % B64.encode(),
                            headers={"Content-Type": "application/json"}), 400, "invalid_option"),
    "JSON top_k Infinity": (dict(data=b'{"image": "%s", "top_k": Infinity}' % B64.encode(),
                                 headers={"Content-Type": "application/json"}), 400, "invalid_option"),
    "form top_k abc": (dict(files={"image": ("a.png", GOOD), "top_k": (None, "abc")}), 400, "invalid_option"),
    "label_set unknown": (dict(data=GOOD, params={"label_set": "nope"}), 400, "unknown_label_set"),
    "label_set path": (dict(data=GOOD, params={"label_set": "../../../etc/passwd"}), 400, "unknown_label_set"),
    "label_set absolute path": (dict(data=GOOD, params={"label_set": "/etc/passwd"}), 400, "unknown_label_set"),
    "label_set with NUL": (dict(data=GOOD, params={"label_set": "cifar10\0"}), 400, "unknown_label_set"),
    "label_set a number (JSON)": (dict(json={"image": B64, "label_set": 10}), 400, "unknown_label_set"),
    "label_set a list (JSON)": (dict(json={"image": B64, "label_set": ["cifar10"]}), 400, "unknown_label_set"),
    "labels an empty list (JSON)": (dict(json={"image": B64, "labels": []}), 400, "invalid_labels"),
    "labels only commas": (dict(data=GOOD, params={"labels": ", ,,"}), 400, "invalid_labels"),
    "labels of numbers (JSON)": (dict(json={"image": B64, "labels": [1, 2]}), 400, "invalid_labels"),
    "labels an object (JSON)": (dict(json={"image": B64, "labels": {"a": "b"}}), 400, "invalid_labels"),
    "labels, one too long": (dict(json={"image": B64, "labels": ["x" * 201, "cat"]}), 400, "invalid_labels"),
    "10,000 labels (JSON)": (dict(json={"image": B64, "labels": [f"thing {i}" for i in range(10_000)]}),
                             400, "too_many_labels"),
    "10,000 labels (form)": (dict(files={"image": ("a.png", GOOD),
                                         "labels": (None, ",".join(f"thing {i}" for i in range(10_000)))}),
                             400, "too_many_labels"),
}


@pytest.mark.parametrize("name", list(ABUSE))
def test_request_abuse_gets_a_clear_json_4xx(clip_server, name):
    kwargs, status, code = ABUSE[name]
    response = requests.post(clip_server.url, timeout=10, **kwargs)
    got = assert_json_error(response, status)
    if code:
        assert got == code
    assert_still_serves(clip_server)


@pytest.mark.parametrize("top_k", [10**9, 2**63, 1e9])
def test_huge_top_k_is_clamped_to_the_label_count(clip_server, top_k):
    response = requests.post(clip_server.url, json={"image": B64, "top_k": top_k, "labels": ["cat", "dog"]},
                             timeout=10)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2


def test_an_empty_labels_field_means_the_default_label_set(clip_server):
    """A browser form always sends its (empty) labels field: that is no custom labels, not an error."""
    response = requests.post(clip_server.url, files={"image": ("a.png", GOOD), "labels": (None, "")}, timeout=10)
    assert response.status_code == 200 and response.json()["label_set"] == "cifar100"


def test_the_limits_are_described(clip_server):
    limits = requests.get(clip_server.url, timeout=10).json()["limits"]
    assert limits["max_labels"] == 1000 and limits["max_label_chars"] == 200 and limits["max_images"] == 16


def _raw_exchange(url, head, body_prefix, read_timeout=10):
    """Send a request head and the start of its body on a raw socket; return the response head."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(head + body_prefix)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_64_mb_body_is_refused_with_413_before_it_is_read(clip_server):
    """The host answers from Content-Length alone: only 64 KB of the 64 MB are ever sent. (Sent to the
    host's own port: of-watchdog in front reads every body whole first; docs/robustness.md.)"""
    process = psutil.Process(clip_server.host_pid)
    before = process.memory_info().rss
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % (64 * 2**20))
    answer = _raw_exchange(clip_server.host_url, head, b"\xff\xd8\xff" + bytes(65533))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"application/json" in answer
    assert process.memory_info().rss - before < 32 * 2**20
    assert_still_serves(clip_server)


def test_64_mb_chunked_body_is_refused_with_413(clip_server):
    """Without a Content-Length the host counts while reading and stops at the limit."""
    def chunks():
        piece = bytes(2**20)
        for _ in range(64):
            yield piece
    try:
        response = requests.post(clip_server.url, data=chunks(), timeout=30)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
    except requests.ConnectionError:
        pass  # the server may close the connection while the client is still sending: also a refusal
    assert_still_serves(clip_server)


def test_request_id_header_cannot_inject(clip_server):
    response = requests.post(clip_server.url, data=GOOD, headers={"X-Request-Id": "<script>alert(1)</script>"},
                             timeout=10)
    assert response.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response.json()["request_id"])
    assert response.headers["X-Request-Id"] == response.json()["request_id"]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_index_refuses_other_methods_with_405(stack, method):
    response = requests.request(method, stack.url + "/function/index", data=GOOD, timeout=10)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


# ---- labels carrying HTML are escaped on the server-rendered page ----------------------------------------

EVIL = ['<script>alert("label")</script>', '<img src=x onerror=alert(1)>', '" autofocus onfocus="alert(1)',
        "</title><svg onload=alert(1)>"]


def test_html_in_labels_is_escaped_on_the_results_page(stack):
    """A plain form post (no JavaScript) renders labels in the title, the results and the refilled form."""
    response = requests.post(stack.url + "/function/index",
                             files={"image": ("a.png", GOOD, "image/png"), "labels": (None, ",".join(EVIL)),
                                    "top_k": (None, "4"), "label_set": (None, "cifar100")},
                             headers={"Accept": "text/html"}, timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    html = response.text
    shown = re.findall(r'<span class="label">([^<]*)</span>', html)
    assert len(shown) == 4
    for label in EVIL:
        assert label not in html
        assert _escaped(label) in shown
    # Nothing the labels carried became markup: no more script elements than the page's own.
    assert html.count("<script") == _page_scripts(stack) and "<img src=x" not in html and "<svg" not in html


def test_html_in_an_error_message_is_escaped(stack):
    label_set = '<script>alert("set")</script>'
    response = requests.post(stack.url + "/function/index",
                             files={"image": ("a.png", GOOD, "image/png"), "label_set": (None, label_set)},
                             headers={"Accept": "text/html"}, timeout=30)
    assert response.status_code == 400 and response.headers["Content-Type"].startswith("text/html")
    assert label_set not in response.text and response.text.count("<script") == _page_scripts(stack)
    assert "&lt;script&gt;" in response.text


def _page_scripts(stack):
    return requests.get(stack.url + "/function/index", timeout=30).text.count("<script")


def _escaped(text):
    """What Jinja's autoescape (markupsafe) writes for text."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;")
            .replace("'", "&#39;"))


def test_labels_with_html_come_back_as_plain_json_strings(clip_server):
    response = requests.post(clip_server.url, json={"image": B64, "labels": EVIL}, timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert {r["label"] for r in response.json()["predictions"]} == set(EVIL)
    assert json.loads(response.text)["predictions"]


def test_a_request_whose_headers_are_too_large_is_the_hosts_431(clip_server):
    """The template host refuses headers over waitress's limit (256 KiB) before clip sees them: 431
    headers_too_large, JSON, with a request id. (of-watchdog passes up to 1 MiB of headers.)"""
    response = requests.get(clip_server.url, headers={"X-Padding": "x" * 300_000}, timeout=30)
    assert response.status_code == 431, response.text[:300]
    assert response.json()["error"]["code"] == "headers_too_large" and response.headers["X-Request-Id"]
