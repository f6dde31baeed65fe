"""The request path's host-CPU shortcuts keep every answer: base64 clean-up in one C pass,
multipart parts read up to their boundaries and kept in memory, in the order they arrived."""
import base64
import io
import os

import numpy as np
import pytest
from clip import request
from clip.errors import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.images import noise_image
from support.inprocess import Event
from werkzeug import formparser
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser

SCALE = int(os.environ.get("FUZZ_SCALE", "1"))  # as in test_fuzz.py: CI runs a fixed, derandomised set


def fuzz(examples):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

JPEG = noise_image("JPEG", size=(64, 48))
B64 = base64.b64encode(JPEG)


def folded(data: bytes, sep: bytes, width: int = 76) -> bytes:
    return sep.join(data[i:i + width] for i in range(0, len(data), width))


@pytest.mark.parametrize("text", [
    B64,
    base64.urlsafe_b64encode(JPEG),
    B64.rstrip(b"="),
    B64.replace(b"+", b" "),  # a urlencoded form's '+'
    folded(B64, b"\r\n"),  # MIME line breaks
    folded(B64, b"\n\t"),
    folded(B64, b"\x0b\x0c\x1c\x1d\x1e\x1f"),  # what \s matches in ASCII besides the usual ones
    b"  \n" + B64 + b"\n\n",
    b"data:image/jpeg;base64," + folded(B64, b"\n"),
    b"DATA:;base64," + B64,
], ids=range(10))
def test_base64_in_every_accepted_spelling_decodes_to_the_picture(text):
    assert request.decode_text(text) == JPEG


@pytest.mark.parametrize("text", [
    B64.replace(b"A", b"\xc2\xa0", 1),  # a non-ASCII space is no base64
    B64[:10] + b"*" + B64[10:],
    B64[:10] + b"\x00" + B64[10:],
    b"data:image/jpeg," + B64,
    base64.b64encode(b"not a picture"),
], ids=range(5))
def test_what_is_not_base64_of_a_picture_is_a_400(text):
    with pytest.raises(ClientError) as refused:
        request.decode_text(text)
    assert (refused.value.status, refused.value.code) == (400, "invalid_image")


# ---- multipart: werkzeug parses; only where its reads stop (and where parts are kept) changed ----------------

def werkzeug_default(body: bytes, boundary: str = "B"):
    """The form as werkzeug's own FormDataParser, with its defaults, makes it: the reference."""
    parser = FormDataParser(max_form_memory_size=len(body) + 1, silent=False, max_form_parts=24)

    def parse():
        _, form, files = parser.parse(io.BytesIO(body), "multipart/form-data", len(body), {"boundary": boundary})
        return sorted(form.items(multi=True)), sorted((k, f.read()) for k, f in files.items(multi=True))
    return outcome(parse)


def ours(body: bytes, boundary: str = "B"):
    def parse():
        parts = request._multipart(body, {"boundary": boundary}, 24)
        return (sorted((k, v) for k, v in parts if isinstance(v, str)),
                sorted((k, v) for k, v in parts if isinstance(v, bytes)))
    return outcome(parse)


def outcome(parse):
    try:
        return parse()
    except RequestEntityTooLarge:
        return "too many parts"
    except ValueError as exc:
        return f"ValueError: {exc}"


def part(name, data, filename="a.jpg", eol=b"\r\n"):
    head = f'--B{eol.decode()}Content-Disposition: form-data; name="{name}"'
    head += f'; filename="{filename}"' if filename else ""
    return head.encode() + eol + eol + data + eol


def noise(size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


BODIES = {
    "sixteen pictures": b"".join(part("image", noise(80_000, i)) for i in range(16)) + b"--B--\r\n",
    "picture over 500 KB and options": part("top_k", b"3", None) + part("image", noise(700_000)) + b"--B--\r\n",
    "parts of 4,095 to 4,097 bytes": b"".join(part("image", noise(n, n)) for n in (4095, 4096, 4097)) + b"--B--",
    "LF line breaks": b"".join(part("image", noise(9000, i), eol=b"\n") for i in range(3)) + b"--B--\n",
    "lone CR line breaks": b"".join(part("image", noise(9000, i), eol=b"\r") for i in range(3)) + b"--B--\r",
    "data ending in CR": part("image", noise(9000) + b"\r") + part("image", b"\r\r\n") + b"--B--\r\n",
    "delimiter text inside data": part("image", b"x--B" * 3000 + b"\n--Bx" * 2000) + b"--B--\r\n",
    "preamble and epilogue": b"hello\r\n" * 2000 + part("image", noise(9000)) + b"--B--\r\n" + b"bye" * 3000,
    "no closing delimiter": part("image", noise(70_000)),
    "truncated in the headers": part("image", noise(70_000)) + b"--B\r\nContent-Disp",
    "too many parts": b"".join(part("image", b"x" * 5000) for _ in range(30)) + b"--B--\r\n",
    "not multipart at all": noise(100_000),
    # found by a differential fuzz while writing the reads: a read that ended between a part's blank line
    # and the closing delimiter made werkzeug refuse what it accepts from one read
    "blank line then the closing delimiter": b"x" * 1529 + b'--B ---B\r\nContent-Disposition: form-data; '
    b'name="top_k"--\r\n' + b"x" * 2460 + b'\nContent-Disposition: form-data; name="top_k"\r\n\r\n--B--',
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_a_multipart_body_parses_as_werkzeug_alone_parses_it(body):
    assert ours(body) == werkzeug_default(body)


PIECES = [b"--B", b"--B--", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" ", b"-", b"B", b"x" * 5000, b"y" * 70_000,
          b'Content-Disposition: form-data; name="image"; filename="a"',
          b'Content-Disposition: form-data; name="top_k"']


@fuzz(300)
@given(st.lists(st.sampled_from(PIECES) | st.binary(max_size=20), max_size=40))
def test_any_body_of_multipart_pieces_parses_as_werkzeug_alone_parses_it(pieces):
    body = b"".join(pieces)
    assert ours(body) == werkzeug_default(body)


def test_file_parts_stay_in_memory_whatever_their_size(monkeypatch):
    """werkzeug's default spools every file part into a SpooledTemporaryFile, on disk past 500 KB."""
    def no_files(*args, **kwargs):
        raise AssertionError("a part went to werkzeug's temporary-file stream factory")
    monkeypatch.setattr(formparser, "default_stream_factory", no_files)
    body = BODIES["picture over 500 KB and options"]
    event = Event(body, content_type="multipart/form-data; boundary=B")
    parsed = request.sort_body(event, 16)
    assert [len(item.data) for item in parsed.items] == [700_000] and parsed.options.getlist("top_k") == ["3"]


# ---- a full function refuses before parsing ------------------------------------------------------------------

@pytest.fixture
def warm(tiny_model, clip_env):
    from clip import handler
    from support.inprocess import service
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"], max_queue=4)
    previous, handler.SERVICE = handler.SERVICE, svc
    yield handler, svc
    handler.SERVICE = previous


def test_a_full_function_answers_429_without_parsing_the_body(warm, monkeypatch):
    """Not even one image fits: every request would be refused, so its body is not parsed. A body that
    would be a 400 gets the 429 too; its retry, once there is room, gets the 400."""
    handler, svc = warm
    bad = Event(b"not an image", content_type="image/png")
    with svc.batcher.admit(svc.batcher.max_queue):  # the queue is full: all its slots admitted
        parsed = []
        monkeypatch.setattr(handler, "parse_request", lambda *args: parsed.append(args))
        answer = handler.handle(bad, None)
        assert parsed == [], "the body was parsed"
        monkeypatch.undo()
        assert answer["statusCode"] == 429 and answer["body"]["error"]["code"] == "queue_full"
        assert answer["headers"]["Retry-After"] == "1" and answer["headers"]["Content-Type"] == "application/json"
    answer = handler.handle(bad, None)
    assert answer["statusCode"] == 400 and answer["body"]["error"]["code"] == "invalid_image"


def test_with_room_for_one_image_a_request_is_parsed_and_admission_decides(warm):
    handler, svc = warm
    png = noise_image("PNG")
    body = b"".join(part("image", png) for _ in range(2)) + b"--B--\r\n"
    with svc.batcher.admit(svc.batcher.max_queue - 1):
        assert handler.handle(Event(b"not an image", content_type="image/png"), None)["statusCode"] == 400
        two = handler.handle(Event(body, content_type="multipart/form-data; boundary=B"), None)
        assert two["statusCode"] == 429 and two["body"]["error"]["code"] == "queue_full"
        one = handler.handle(Event(png, content_type="image/png"), None)
        assert one["statusCode"] == 200 and one["body"]["predictions"]


def test_a_request_that_could_never_be_admitted_is_a_400_naming_the_limit_never_a_429(warm):
    """max_queue 4 (a worker's share): 5 pictures would wait for room that never comes. The limit per
    request follows the share, GET shows it, and the refusal says it."""
    handler, svc = warm
    png = noise_image("PNG")
    described = handler.handle(Event(method="GET"), None)["body"]
    assert described["limits"]["max_queue"] == 4 and described["limits"]["max_images"] == 4
    five = handler.handle(Event(b"".join(part("image", png) for _ in range(5)) + b"--B--\r\n",
                                content_type="multipart/form-data; boundary=B"), None)
    assert five["statusCode"] == 400 and five["body"]["error"]["code"] == "too_many_images"
    assert "At most 4 images" in five["body"]["error"]["message"] and "Retry-After" not in five["headers"]
    four = handler.handle(Event(b"".join(part("image", png) for _ in range(4)) + b"--B--\r\n",
                                content_type="multipart/form-data; boundary=B"), None)
    assert four["statusCode"] == 200 and len(four["body"]["results"]) == 4
