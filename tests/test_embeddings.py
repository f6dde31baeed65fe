"""Embeddings out (issue 26.2): `embedding=true` adds each picture's normalised image embedding to its result,
and POST /embeddings answers normalised text embeddings in OpenAI's /embeddings shape; both equal
open_clip's own encode_image / encode_text, normalised, within 1e-5 in fp32 (the reference is computed
here, from open_clip directly, on the same preprocessed input), under the same admission, deadline and
limits as pictures."""
import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import pytest
import requests
import torch
from clip import config, handler
from clip.embeddings import parse_text_request
from clip.errors import ClientError
from clip.labels import LABEL_SETS
from clip.options import OptionRules, parse_flag
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from support.images import noise_image
from support.inprocess import Event, service
from support.servers import wait_until

TOLERANCE = 1e-5
WIDTH = 32  # the tiny model's embed_dim
PNGS = [noise_image("PNG", size=size, seed=seed) for seed, size in enumerate([(64, 64), (96, 64), (50, 120)])]
TEXTS = ["a photo of a cat", "a diagram", "ünïcödé text, with commas", "x" * 200]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """open_clip's own model, transform and tokenizer on the same weights: normalised embeddings."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_model}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_model}")

    class Reference:
        @staticmethod
        def image(data):
            with torch.no_grad():
                features = model.encode_image(preprocess(Image.open(io.BytesIO(data))).unsqueeze(0))
            return torch.nn.functional.normalize(features, dim=-1)[0].numpy()

        @staticmethod
        def text(text):
            with torch.no_grad():
                features = model.encode_text(tokenizer([text]))
            return torch.nn.functional.normalize(features, dim=-1)[0].numpy()

    return Reference


def close(served, expected):
    served = np.asarray(served, dtype=np.float64)
    return served.shape == expected.shape and float(np.abs(served - expected).max()) < TOLERANCE


@pytest.fixture(scope="module")
def svc(tiny_model, clip_env):
    return service(tiny_model, clip_env["CLIP_CACHE_DIR"], dtype="fp32")


def call(svc, body, path="/", content_type="application/json", query=()):
    previous, handler.SERVICE = handler.SERVICE, svc
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        answer = handler.handle(Event(data, content_type, query=query, path=path), None)
    finally:
        handler.SERVICE = previous
    return answer["statusCode"], answer["body"]


def embed(svc, body):
    return call(svc, body, path="/embeddings")


# ---- image embeddings -----------------------------------------------------------------------------------------

def test_image_embeddings_equal_open_clips_over_http(clip_server, reference):
    """One picture (query option), and a batch with a bad picture in it (form field): each good picture's
    embedding is open_clip's, the dtype is said once, and the predictions are those answered without it."""
    response = requests.post(clip_server.url, data=PNGS[0], params={"embedding": "true"}, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["embedding_dtype"] == "float32"
    assert len(answer["embedding"]) == WIDTH and all(isinstance(value, float) for value in answer["embedding"])
    assert close(answer["embedding"], reference.image(PNGS[0]))
    plain = requests.post(clip_server.url, data=PNGS[0], timeout=60).json()
    assert plain["predictions"] == answer["predictions"]
    assert "embedding" not in plain and "embedding_dtype" not in plain

    files = [("image", (f"{i}.png", png)) for i, png in enumerate(PNGS)] + [("image", ("bad.png", b"no image"))]
    response = requests.post(clip_server.url, files=files, data={"embedding": "true"}, timeout=60)
    assert response.status_code == 200, response.text
    batch = response.json()
    assert batch["embedding_dtype"] == "float32"
    for result, png in zip(batch["results"], PNGS):
        assert close(result["embedding"], reference.image(png))
    assert batch["results"][-1] == {"error": batch["results"][-1]["error"]}  # a refused picture: no embedding


def test_the_option_is_read_from_json_query_and_form_alike(svc):
    b64 = base64.b64encode(PNGS[1]).decode()
    as_json = call(svc, {"image": b64, "embedding": True})[1]
    as_query = call(svc, PNGS[1], content_type="image/png", query=[("embedding", "1")])[1]
    assert as_json["embedding"] == as_query["embedding"] and len(as_json["embedding"]) == WIDTH
    assert call(svc, {"image": b64, "embedding": 1})[1]["embedding"] == as_json["embedding"]
    for off in (False, 0, "false", "0", "off", ""):
        answer = call(svc, {"image": b64, "embedding": off})[1]
        assert "embedding" not in answer and "embedding_dtype" not in answer


@pytest.mark.parametrize("value", ["maybe", 2, [True], {"a": 1}, "truee"])
def test_an_embedding_value_that_is_not_yes_or_no_is_a_400(svc, value):
    status, body = call(svc, {"image": base64.b64encode(PNGS[0]).decode(), "embedding": value})
    assert status == 400 and body["error"]["code"] == "invalid_option"
    assert "embedding" in body["error"]["message"]


def test_the_description_says_the_dimension(svc):
    previous, handler.SERVICE = handler.SERVICE, svc
    try:
        described = handler.handle(Event(method="GET"), None)["body"]
    finally:
        handler.SERVICE = previous
    assert described["embedding_dimensions"] == WIDTH


def test_the_dtype_said_is_the_models(tiny_model, clip_env):
    """With bf16 (where the CPU runs it, or not: the setting decides), the answer says bfloat16."""
    bf16 = service(tiny_model, clip_env["CLIP_CACHE_DIR"], dtype="bf16")
    status, body = call(bf16, PNGS[0], content_type="image/png", query=[("embedding", "true")])
    assert status == 200 and body["embedding_dtype"] == "bfloat16"
    assert abs(float(np.linalg.norm(body["embedding"])) - 1) < 1e-3
    assert embed(bf16, {"input": "a cat"})[1]["embedding_dtype"] == "bfloat16"


# ---- text embeddings ------------------------------------------------------------------------------------------

def test_text_embeddings_equal_open_clips_in_openais_shape(svc, reference):
    status, answer = embed(svc, {"input": TEXTS, "model": "text-embedding-3-small"})
    assert status == 200, answer
    assert answer["object"] == "list" and answer["model"] == "tiny" and answer["embedding_dtype"] == "float32"
    assert [row["index"] for row in answer["data"]] == list(range(len(TEXTS)))
    assert {row["object"] for row in answer["data"]} == {"embedding"}
    for row, text in zip(answer["data"], TEXTS):
        assert len(row["embedding"]) == WIDTH and close(row["embedding"], reference.text(text))
    usage = answer["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] and len(TEXTS) * 2 < usage["prompt_tokens"] <= 77 * 4


def test_one_string_base64_and_dimensions_as_openai_takes_them(svc, reference):
    status, answer = embed(svc, {"input": "a photo of a cat", "encoding_format": "base64", "dimensions": WIDTH})
    assert status == 200, answer
    [row] = answer["data"]
    assert row["index"] == 0
    assert close(np.frombuffer(base64.b64decode(row["embedding"]), "<f4"), reference.text("a photo of a cat"))
    floats = embed(svc, {"input": "a photo of a cat"})[1]["data"][0]["embedding"]
    assert np.array_equal(np.asarray(floats, np.float32), np.frombuffer(base64.b64decode(row["embedding"]), "<f4"))


def test_text_embeddings_over_http_through_the_watchdog(clip_server, reference):
    response = requests.post(clip_server.url + "/embeddings", json={"input": ["a diagram", "a cat"]}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    data = response.json()["data"]
    assert close(data[0]["embedding"], reference.text("a diagram"))
    assert close(data[1]["embedding"], reference.text("a cat"))


def test_text_embeddings_through_the_gateway(stack):
    response = requests.post(f"{stack.url}/function/clip/embeddings", json={"input": "a cat"}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == WIDTH


@pytest.mark.parametrize(("body", "code"), [
    ({}, "invalid_input"),
    ({"input": []}, "invalid_input"),
    ({"input": ""}, "invalid_input"),
    ({"input": ["a cat", ""]}, "invalid_input"),
    ({"input": [[320, 2368]]}, "invalid_input"),  # token ids: OpenAI takes them, a CLIP tokenizer's are its own
    ({"input": None}, "invalid_input"),
    ({"input": ["x" * 201]}, "invalid_input"),  # CLIP_MAX_LABEL_CHARS, as a request's own labels
    ({"input": ["a cat"] * 1001}, "too_many_inputs"),  # CLIP_MAX_LABELS
    ({"input": "a cat", "encoding_format": "int8"}, "invalid_option"),
    ({"input": "a cat", "dimensions": 16}, "invalid_option"),
    ({"input": "a cat", "dimensions": True}, "invalid_option"),
    (["a cat"], "invalid_json"),
    (b"{not json", "invalid_json"),
])
def test_bad_text_requests_are_400s_that_say_why(svc, body, code):
    status, answer = embed(svc, body)
    assert status == 400 and answer["error"]["code"] == code, answer
    assert answer["error"]["message"] and "Traceback" not in answer["error"]["message"]


def hold_the_model_thread(svc):
    """The model thread on a job of the test's until the test sets the event it returns."""
    running, release = threading.Event(), threading.Event()

    def hold():
        running.set()
        release.wait(30)

    busy = threading.Thread(target=svc.batcher.call, args=(hold,))
    busy.start()
    assert running.wait(30), "the model thread never took the job"
    return busy, release


def test_text_embeddings_are_admitted_like_pictures(tiny_model, clip_env):
    """64 texts take 2 queue slots (a chunk of 32 each): with the queue that full, texts and pictures
    alike are shed with 429 until the first request is answered."""
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"], dtype="fp32", max_queue=2)
    busy, release = hold_the_model_thread(svc)  # the first request waits, admitted
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(embed, svc, {"input": [f"thing {i}" for i in range(64)]})
            wait_until(lambda: svc.batcher.admitted == 2, 30, 0.005, "the first request admitted, waiting")
            shed_text = embed(svc, {"input": "a cat"})
            shed_picture = call(svc, PNGS[0], content_type="image/png")
            release.set()
            status, answer = first.result(30)
    finally:
        release.set()
        busy.join()
    assert status == 200 and len(answer["data"]) == 64
    for shed in (shed_text, shed_picture):
        assert shed[0] == 429 and shed[1]["error"]["code"] == "queue_full"
    assert embed(svc, {"input": "a cat"})[0] == 200


def test_text_embeddings_behind_a_busy_model_are_bounded_by_the_deadline(tiny_model, clip_env):
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"], dtype="fp32", deadline_s=0.5)
    busy, release = hold_the_model_thread(svc)
    try:
        status, answer = embed(svc, {"input": ["a lighthouse at dusk"]})
        held = not release.is_set()  # answered at its deadline, while the model is still busy
    finally:
        release.set()
        busy.join()
    assert held and status == 504 and answer["error"]["code"] == "deadline_exceeded"
    assert embed(svc, {"input": ["a lighthouse at dusk"]})[0] == 200


# ---- whatever arrives ---------------------------------------------------------------------------------------

RULES = OptionRules.of(config.Settings(), LABEL_SETS)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
KEYS = st.sampled_from(["input", "encoding_format", "dimensions", "model", "user", "other"])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(KEYS, JSON | st.lists(st.text(max_size=250), max_size=4), max_size=4) | JSON)
def test_any_json_body_is_a_text_request_or_a_400(body):
    try:
        request = parse_text_request(json.dumps(body).encode(), RULES, WIDTH)
    except ClientError as refused:
        assert refused.status == 400 and refused.message
        return
    assert request.texts and all(isinstance(text, str) and 0 < len(text) <= 200 for text in request.texts)
    assert request.encoding in ("float", "base64")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(JSON)
def test_any_embedding_value_is_yes_no_or_a_400(value):
    try:
        assert parse_flag(value, "embedding") in (True, False)
    except ClientError as refused:
        assert refused.status == 400 and refused.code == "invalid_option"
