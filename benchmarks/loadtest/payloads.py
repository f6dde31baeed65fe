"""The load test's inputs: good ones (each format and option the API takes) and bad and hostile ones,
each with the statuses and error codes it must get."""

import base64
import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import TypedDict

from urllib3.filepost import encode_multipart_formdata

from benchmarks.pictures import jpeg, photo, png

CIFAR10 = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
CUSTOM = ("cat", "dog", "teapot", "bicycle")


@dataclass
class Payload:
    name: str
    good: bool
    body: bytes = b""
    content_type: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    weight: int = 1
    statuses: tuple[int, ...] = (200,)
    codes: tuple[str, ...] = ()  # error codes allowed (for the error statuses)
    images: int = 1
    top_k: int = 5
    label_set: str = "cifar100"
    labels: tuple[str, ...] = ()  # the predictions' labels must come from these (when given)

    def __post_init__(self) -> None:
        if self.method == "POST":  # a full function refuses any POST at once, before it reads the body (docs/api.md)
            self.statuses = tuple(dict.fromkeys((*self.statuses, 429)))
            self.codes = tuple(dict.fromkeys((*self.codes, "queue_full")))

    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type} if self.content_type else {}


class Expected(TypedDict):
    """The answers a bad payload must get: Payload's statuses and codes, shared by several."""

    statuses: tuple[int, ...]
    codes: tuple[str, ...]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming 10 gigapixels, a few bytes of pixel data: refused from its header (413)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def payloads() -> tuple[list[Payload], list[Payload]]:
    small = jpeg(photo(224, 224, seed=1))
    medium = jpeg(photo(640, 480, seed=2))
    large = jpeg(photo(1920, 1080, seed=3), quality=85)
    small_png = png(photo(224, 224, seed=4))
    b64 = base64.b64encode(medium).decode("ascii")
    form, form_type = encode_multipart_formdata(
        [("image", ("photo.jpg", medium, "image/jpeg")), ("label_set", "cifar10"), ("top_k", "3")]
    )
    good = [
        Payload("jpeg_224_raw", True, small, "image/jpeg", weight=3),
        Payload("jpeg_640x480_raw", True, medium, "application/octet-stream", weight=2),
        Payload("jpeg_1920x1080_raw", True, large, "image/jpeg"),
        Payload("png_224_raw", True, small_png, "image/png"),
        Payload("multipart_cifar10_top3", True, form, form_type, top_k=3, label_set="cifar10", labels=tuple(CIFAR10)),
        Payload("json_base64_top3", True, json.dumps({"image": b64, "top_k": 3}).encode(), "application/json", top_k=3),
        Payload("data_url", True, f"data:image/jpeg;base64,{b64}".encode(), "text/plain"),
        Payload(
            "custom_labels_query",
            True,
            small,
            "image/jpeg",
            params={"labels": ",".join(CUSTOM), "top_k": "2"},
            top_k=2,
            label_set="custom",
            labels=CUSTOM,
        ),
        Payload(
            "json_batch_of_2",
            True,
            json.dumps({"images": [base64.b64encode(small).decode(), b64]}).encode(),
            "application/json",
            images=2,
        ),
    ]
    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(4096))
    shed: Expected = {"statuses": (400,), "codes": ("invalid_image", "invalid_json")}
    bad = [
        Payload("random_bytes", False, noise, "application/octet-stream", **shed),
        Payload("truncated_jpeg", False, medium[: len(medium) // 2], "image/jpeg", **shed),
        Payload("text", False, b"this is not a picture, just some words.", "text/plain", **shed),
        Payload("empty_body", False, b"", "application/octet-stream", statuses=(400,), codes=("missing_image",)),
        Payload("bad_json", False, b'{"image": "abc', "application/json", statuses=(400,), codes=("invalid_json",)),
        Payload(
            "top_k_abc", False, small, "image/jpeg", params={"top_k": "abc"}, statuses=(400,), codes=("invalid_option",)
        ),
        Payload(
            "png_bomb_header",
            False,
            png_bomb(),
            "image/png",
            statuses=(413,),
            codes=("image_too_large",),
        ),
        Payload(
            "unknown_label_set",
            False,
            small,
            "image/jpeg",
            params={"label_set": "no-such-set"},
            statuses=(400,),
            codes=("unknown_label_set",),
        ),
        Payload("put_method", False, small, "image/jpeg", method="PUT", statuses=(405,), codes=("method_not_allowed",)),
    ]
    return good, bad


def hostile_payloads() -> list[Payload]:
    """Bombs and floods an attacker would send: each refused (4xx) or served, never a 5xx."""
    import io

    from PIL import Image

    small = jpeg(photo(224, 224, seed=1))
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((2000, 2000)).convert("RGB").save(buffer, "JPEG", progressive=True)
    progressive = buffer.getvalue()
    last_scan = progressive[progressive.rindex(b"\xff\xda") : -2]
    buffer = io.BytesIO()
    Image.new("I;16", (8000, 6000), 40000).save(buffer, "PNG")  # 48 MP at 16 bits: 96 MB decoded
    info = struct.pack("<IiiHHIIiiII", 40, 50_000, 1_000, 1, 8, 1, 16, 0, 0, 256, 0)
    rle_bmp = b"BM" + struct.pack("<IHHI", 1094, 0, 0, 1078) + info + bytes(1024) + b"\x00\x00" * 8
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    complex_: Expected = {"statuses": (400,), "codes": ("image_too_complex",)}
    labels = {"labels": ",".join(f"hostile label {i}" for i in range(400))}
    return [
        Payload("jpeg_fill_bytes", False, small[:2] + b"\xff" * 3_000_000 + small[2:], "image/jpeg", **complex_),
        Payload(
            "jpeg_empty_segments",
            False,
            small[:2] + b"\xff\xec\x00\x02" * 1_000_000 + small[2:],
            "image/jpeg",
            **complex_,
        ),
        Payload(
            "jpeg_500_scans", False, progressive[:-2] + last_scan * 500 + progressive[-2:], "image/jpeg", **complex_
        ),
        Payload("rle_bmp_bomb", False, rle_bmp, "image/bmp", **complex_),
        Payload("png_48mp_16bit", False, buffer.getvalue(), "image/png"),
        Payload(
            "json_million_images",
            False,
            b'{"images": [' + b'"x",' * 1_000_000 + b'"x"]}',
            "application/json",
            statuses=(400,),
            codes=("too_many_images",),
        ),
        Payload(
            "form_300k_parts",
            False,
            part * 300_000 + b"--b--\r\n",
            "multipart/form-data; boundary=b",
            statuses=(400,),
            codes=("too_many_parts",),
        ),
        Payload(
            "lone_surrogate",
            False,
            b'{"image": "\\ud800"}',
            "application/json",
            statuses=(400,),
            codes=("invalid_json",),
        ),
        Payload(
            "400_new_labels",
            False,
            small,
            "image/jpeg",
            params=labels,
            statuses=(200, 504),
            codes=("deadline_exceeded",),
            top_k=5,
            label_set="custom",
        ),
    ]
