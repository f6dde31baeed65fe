"""Property-based fuzzing of the input path: whatever arrives, only a ClientError with a 4xx status may come
out of the request and option parsers, only a BadImage of a 4xx code out of the image decoder, and handle()
never answers a 5xx."""
import base64
import io
import json
import os
import string

import pytest
from clip import config, handler, images, options, request
from clip.errors import BadImage, ClientError
from clip.labels import LABEL_SETS
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from support.images import noise_image
from support.inprocess import Event, service
from werkzeug.datastructures import MultiDict

# CI runs a fixed, derandomised set (same examples every run); FUZZ_SCALE=20 explores 20× more, at random.
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


def fuzz(examples):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=SUPPRESSED)

SETTINGS = config.Settings()
LIMITS = request.Limits(SETTINGS.max_images, options.OptionRules.of(SETTINGS, LABEL_SETS))
IMAGE_SIZE = 64  # the tiny model's input size
CONTENT_TYPES = ["", "application/octet-stream", "image/png", "image/jpeg", "text/plain", "application/json",
                 "application/json; charset=utf-16", "application/x-www-form-urlencoded",
                 "multipart/form-data", "multipart/form-data; boundary=XyZ", "multipart/form-data; boundary=",
                 "multipart/form-data; boundary=\"\"", "multipart/mixed; boundary=XyZ", "text/html; charset=bogus"]

# Option values as they arrive: text from a query or form, anything JSON can carry from a JSON body.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-10**30, max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)
# Not "imagenet1k": its first use starts an 80,000-prompt build in this process (a documented 503 meanwhile).
option_text = st.sampled_from(["", " ", "0", "-1", "1", "5", "1.5", "1e3", "abc", "cifar10", "cifar100",
                               "../etc/passwd", "cat,dog", ",,", "x" * 250, "٣", "10" * 20]) \
    | st.text(max_size=40)
option_values = option_text | json_values
option_keys = st.sampled_from(["top_k", "labels", "label_set"])


def small_images():
    formats = [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"quality": 60}),
               ("JPEG", {"progressive": True}), ("PNG", {"optimize": True})]
    return [noise_image(fmt, size=(24, 16), seed=i, **save) for i, (fmt, save) in enumerate(formats)]


VALID = small_images()


@st.composite
def mutated_images(draw):
    """A valid small picture with bytes flipped, inserted, deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif at > 0:
            del data[at:]
        if not data:
            data = bytearray(b"\x89PNG\r\n\x1a\n")
    return bytes(data)


magic_prefixed = st.builds(lambda magic, rest: magic + rest,
                           st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM",
                                            b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 "]),
                           st.binary(max_size=300))
image_bytes = mutated_images() | magic_prefixed | st.binary(max_size=200) | st.sampled_from(VALID)


@st.composite
def multipart_bodies(draw):
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["image", "url", "top_k", "labels", "label_set", "other", ""]))
        filename = draw(st.none() | st.sampled_from(["a.png", "", "x\"y", "../../etc/passwd"]))
        value = draw(image_bytes | option_text.map(str.encode))
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        if draw(st.booleans()):
            disposition = draw(st.sampled_from(["", "form-data", "attachment", "form-data; name"]))
        parts.append(b"--XyZ\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n")
    ending = draw(st.sampled_from([b"--XyZ--\r\n", b"--XyZ--", b"", b"--XyZ", b"--Xy"]))
    return b"".join(parts) + ending, "multipart/form-data; boundary=XyZ"


def json_bodies():
    b64 = st.sampled_from(VALID).map(lambda d: base64.b64encode(d).decode())
    image_values = b64 | b64.map(lambda s: "data:image/png;base64," + s) | json_values
    doc = st.fixed_dictionaries({}, optional={"image": image_values, "images": st.lists(image_values, max_size=3)
                                              | json_values, "url": json_values | st.text(max_size=40),
                                              "top_k": option_values, "labels": option_values,
                                              "label_set": option_values})
    encoded = (doc | json_values).map(lambda d: json.dumps(d, allow_nan=True).encode())
    return st.tuples(encoded | st.binary(max_size=100).map(lambda b: b"{" + b),
                     st.sampled_from(["application/json", "", "text/plain"]))


bodies = (st.tuples(image_bytes, st.sampled_from(CONTENT_TYPES))
          | st.tuples(st.binary(max_size=300), st.sampled_from(CONTENT_TYPES))
          | multipart_bodies() | json_bodies()
          | st.tuples(st.sampled_from(VALID).map(base64.b64encode), st.sampled_from(["", "text/plain"]))
          | st.tuples(st.text(string.printable, max_size=200).map(str.encode),
                      st.sampled_from(["application/x-www-form-urlencoded", ""])))
queries = st.lists(st.tuples(option_keys | st.text(max_size=5), option_text), max_size=4)


def assert_client_error(error):
    if isinstance(error, BadImage):  # a decoder's: its status is the catalogue's
        error = error.as_client_error()
    assert isinstance(error, ClientError)
    assert 400 <= error.status < 500 and error.code and error.message


@fuzz(150)
@given(st.lists(st.tuples(option_keys, option_values), max_size=6))
def test_parse_options_raises_only_client_errors(pairs):
    try:
        parsed = options.parse_options(MultiDict(pairs), LIMITS.options)
    except ClientError as error:
        assert_client_error(error)
        return
    assert isinstance(parsed.top_k, int) and parsed.top_k >= 1
    assert parsed.label_set in LABEL_SETS or (parsed.label_set == "custom" and parsed.labels)
    assert len(parsed.labels) <= SETTINGS.max_labels
    assert all(isinstance(label, str) and label.strip() == label and label for label in parsed.labels)


@fuzz(150)
@given(bodies, queries)
def test_parse_request_raises_only_client_errors(body_and_type, query):
    body, content_type = body_and_type
    event = Event(body, content_type, query=query)
    try:
        parsed = request.parse_request(event, LIMITS)
    except ClientError as error:
        assert_client_error(error)
        return
    assert 1 <= len(parsed.items) <= SETTINGS.max_images
    for item in parsed.items:
        if item.error:
            assert_client_error(item.error)
        elif item.url is None:
            assert isinstance(item.data, bytes) and item.data  # file parts are sniffed by load_image
        else:
            assert isinstance(item.url, str) and item.url
    assert isinstance(parsed.options, options.Options) and parsed.options.top_k >= 1


@fuzz(150)
@given(image_bytes)
def test_load_image_gives_an_rgb_picture_or_a_refusal(data):
    try:
        image = images.load_image(data, SETTINGS.max_pixels, IMAGE_SIZE)
    except BadImage as error:
        assert_client_error(error)
        event(f"load_image: {error.code}")
        return
    event("load_image: decoded")
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    assert max(image.size) <= images.MAX_ASPECT * min(image.size)


@fuzz(60)
@given(st.integers(1, 3000), st.integers(1, 3000),
       st.sampled_from(["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"]),
       st.sampled_from(["PNG", "TIFF", "BMP", "GIF", "JPEG", "WEBP"]))
def test_any_size_and_mode_a_format_can_hold_decodes(width, height, mode, fmt):
    assume(width * height <= 2_000_000)
    try:
        buffer = io.BytesIO()
        Image.new(mode, (width, height)).save(buffer, fmt)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # the format cannot hold this mode: nothing to test
    try:
        image = images.load_image(buffer.getvalue(), SETTINGS.max_pixels, IMAGE_SIZE)
    except BadImage as error:
        assert_client_error(error)
        return
    assert image.mode == "RGB"


@pytest.fixture(scope="module")
def warm_handler(tiny_model, clip_env):
    previous = handler.SERVICE
    handler.SERVICE = service(tiny_model, clip_env["CLIP_CACHE_DIR"])
    yield handler
    handler.SERVICE = previous


@fuzz(200)
@given(bodies, queries, st.sampled_from(["POST"] * 20 + ["GET", "HEAD", "PUT", "OPTIONS"]),
       st.sampled_from(["/", "/", "/ready", "/_/ready", "/x"]))
def test_handle_never_answers_5xx(warm_handler, body_and_type, query, method, path):
    body, content_type = body_and_type
    answer = warm_handler.handle(Event(body, content_type, method=method, query=query, path=path), None)
    assert answer["statusCode"] < 500, answer
    assert answer["headers"]["Content-Type"] == "application/json"
    doc = answer["body"]
    event(f"handle: {answer['statusCode']} {doc.get('error', {}).get('code', '')}")
    json.dumps(doc, allow_nan=False)  # always valid JSON (no NaN scores)
    if answer["statusCode"] >= 400:
        assert doc["error"]["code"] and doc["error"]["message"]
    elif method == "POST":
        assert "predictions" in doc or "results" in doc
