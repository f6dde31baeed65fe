"""The clip function's HTTP contract, over real HTTP to the function started from its build context."""
import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support.held import clip_held_while
from support.images import image_bytes, noise_image
from support.servers import FunctionProcess, wait_until

from localrun.functions import FUNCTION_DIRS

CIFAR100_FIRST = {"apple", "aquarium fish", "baby"}


def post(server, path="", **kwargs):
    return requests.post(server.url + "/" + path.lstrip("/"), timeout=60, **kwargs)


def predictions(response):
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    return response.json()["predictions"]


def assert_well_formed(answer, top_k=5):
    rows = answer["predictions"]
    assert len(rows) == top_k
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 1 for s in scores) and sum(scores) <= 1.0001
    assert answer["label_set"] == "cifar100" and answer["model"] == "tiny"
    assert answer["request_id"] and answer["elapsed_ms"] >= 0


def test_raw_bytes_classify_with_the_contract_fields(clip_server):
    response = post(clip_server, data=noise_image("PNG"), headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    answer = response.json()
    assert_well_formed(answer)
    assert answer["untrained"] is False
    cifar = json.load(open(clip_server.dir / "function" / "zero_shot.json"))["cifar100"]
    shown = {name.replace("_", " ") for name in cifar}
    assert {row["label"] for row in answer["predictions"]} <= shown
    assert not any("_" in row["label"] for row in answer["predictions"])


def test_every_input_form_gives_the_same_answer(clip_server):
    png = noise_image("PNG", seed=3)
    b64 = base64.b64encode(png).decode()
    expected = predictions(post(clip_server, data=png))
    forms = {
        "raw, wrong content type": dict(data=png, headers={"Content-Type": "text/plain"}),
        "multipart": dict(files={"image": ("x.png", png, "image/png")}),
        "base64 body": dict(data=b64),
        "data URL body": dict(data="data:image/png;base64," + b64),
        "JSON image": dict(json={"image": b64}),
        "JSON data URL": dict(json={"image": "data:image/png;base64," + b64}),
        "urlencoded form field": dict(data={"image": b64}),
    }
    for name, kwargs in forms.items():
        assert predictions(post(clip_server, **kwargs)) == expected, name


def test_batches_answer_in_input_order_with_per_image_errors(clip_server):
    a, b = noise_image("PNG", seed=1), noise_image("JPEG", seed=2)
    single_a, single_b = predictions(post(clip_server, data=a)), predictions(post(clip_server, data=b))
    response = post(clip_server, files=[("image", ("a.png", a)), ("image", ("bad.png", b"not an image")),
                                        ("image", ("b.jpg", b))])
    assert response.status_code == 200
    results = response.json()["results"]
    assert results[0]["predictions"] == single_a
    assert results[1]["error"]["code"] == "invalid_image"
    assert results[2]["predictions"] == single_b
    response = post(clip_server, json={"images": [base64.b64encode(b).decode(), base64.b64encode(a).decode()]})
    assert [r["predictions"] for r in response.json()["results"]] == [single_b, single_a]


def test_top_k_from_query_form_and_json(clip_server):
    png = noise_image("PNG", seed=4)
    full = predictions(post(clip_server, data=png, params={"top_k": 100}))
    assert len(full) == 100
    assert predictions(post(clip_server, data=png, params={"top_k": 2})) == full[:2]
    assert predictions(post(clip_server, files={"image": png}, data={"top_k": "3"})) == full[:3]
    assert predictions(post(clip_server, json={"image": base64.b64encode(png).decode(), "top_k": 1})) == full[:1]
    assert len(predictions(post(clip_server, data=png, params={"top_k": 10**9}))) == 100  # clamped


def test_custom_labels_and_label_sets(clip_server):
    png = noise_image("PNG", seed=5)
    answer = post(clip_server, data=png, params={"labels": "cat, dog ,teapot"}).json()
    assert answer["label_set"] == "custom"
    assert sorted(row["label"] for row in answer["predictions"]) == ["cat", "dog", "teapot"]
    assert abs(sum(row["score"] for row in answer["predictions"]) - 1) < 1e-3
    form = post(clip_server, files={"image": png}, data={"labels": "cat,dog,teapot"}).json()
    as_json = post(clip_server, json={"image": base64.b64encode(png).decode(), "labels": ["cat", "dog", "teapot"]})
    assert form["predictions"] == answer["predictions"] == as_json.json()["predictions"]
    cifar10 = post(clip_server, data=png, params={"label_set": "cifar10", "top_k": 50}).json()
    assert cifar10["label_set"] == "cifar10" and len(cifar10["predictions"]) == 10
    assert {r["label"] for r in cifar10["predictions"]} >= {"airplane", "truck", "cat"}


@pytest.mark.parametrize("model, pretrained, shown", [
    ("local-dir:/srv/models/ViT-B-32/", "none", ("ViT-B-32", "local-dir:ViT-B-32")),
    ("ViT-B-32", "/srv/checkpoints/epoch_3.pt", ("ViT-B-32", "epoch_3.pt")),
    ("ViT-B-32", "laion2b_s34b_b79k", ("ViT-B-32", "laion2b_s34b_b79k")),
    ("ViT-B-32", "None", ("ViT-B-32", "none")),
    ("hf-hub:timm/ViT-B-16-SigLIP", "none", ("hf-hub:timm/ViT-B-16-SigLIP", "hf-hub:timm/ViT-B-16-SigLIP")),
])
def test_answers_name_the_model_and_weights_never_a_servers_paths(model, pretrained, shown):
    from clip.model import shown as shown_settings
    assert shown_settings(model, pretrained) == {"model": shown[0], "pretrained": shown[1]}


def test_description_lists_label_set_sizes_and_limits(clip_server):
    info = requests.get(clip_server.url + "/", timeout=10).json()
    assert info["ready"] is True and info["model"] == "tiny"
    assert {k: v["labels"] for k, v in info["label_sets"].items()} == {"cifar100": 100, "cifar10": 10,
                                                                         "imagenet1k": 1000}
    assert info["label_sets"]["cifar100"]["templates"] == 18
    assert info["label_sets"]["imagenet1k"]["templates"] == 80
    assert info["limits"]["max_pixels"] > 0 and info["untrained"] is False


def test_imagenet_is_built_in_the_background_never_per_request(clip_server):
    png = noise_image("PNG", seed=6)
    first = post(clip_server, data=png, params={"label_set": "imagenet1k"})
    if first.status_code == 503:  # not built yet: a clear answer, and the build runs in the background
        assert first.json()["error"]["code"] == "label_set_warming"
        assert int(first.headers["Retry-After"]) > 0
        assert predictions(post(clip_server, data=png))  # the default set keeps serving meanwhile

        def built():
            return post(clip_server, data=png, params={"label_set": "imagenet1k"}).status_code == 200
        wait_until(built, timeout=300, interval=2, what="imagenet1k embeddings")
    answer = post(clip_server, data=png, params={"label_set": "imagenet1k", "top_k": 2000}).json()
    assert answer["label_set"] == "imagenet1k" and len(answer["predictions"]) == 1000


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_get_405(clip_server, method):
    response = requests.request(method, clip_server.url + "/", data=b"x", timeout=10)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("kwargs, status, code", [
    (dict(data=b"definitely not an image"), 400, "invalid_image"),
    (dict(data=b""), 400, "missing_image"),
    (dict(data=image_bytes(), params={"top_k": "0"}), 400, "invalid_option"),
    (dict(data=image_bytes(), params={"top_k": "abc"}), 400, "invalid_option"),
    (dict(data=image_bytes(), params={"label_set": "../../etc/passwd"}), 400, "unknown_label_set"),
    (dict(json={"image": 42}), 400, "invalid_json"),
    (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json"),
])
def test_bad_input_gets_a_json_error_and_the_service_keeps_serving(clip_server, kwargs, status, code):
    response = post(clip_server, **kwargs)
    assert response.status_code == status
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"] and body["request_id"]
    assert "Traceback" not in response.text
    assert predictions(post(clip_server, data=image_bytes()))


def test_body_over_the_limit_is_refused_with_413(clip_env, tmp_path):
    with FunctionProcess("clip", tmp_path, {**clip_env, "MAX_BODY_BYTES": "100000"}) as fn:
        response = requests.post(fn.url, data=b"\xff\xd8\xff" + b"\0" * 200_000, timeout=30)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        assert requests.post(fn.url, data=image_bytes(), timeout=30).status_code == 200


def test_concurrent_requests_each_get_their_own_answer(clip_server):
    images = [noise_image("PNG", seed=100 + i) for i in range(8)]
    alone = [predictions(post(clip_server, data=img)) for img in images]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda img: predictions(post(clip_server, data=img)), images))
    for a, b in zip(alone, together):
        assert [r["label"] for r in a] == [r["label"] for r in b]
        assert all(abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(a, b))


def test_lock_file_follows_readiness_and_sigterm(clip_env, tmp_path, monkeypatch):
    hold = tmp_path / "loading"
    hold.touch()  # clip's init() waits while this file exists: loading until the test says
    monkeypatch.setitem(FUNCTION_DIRS, "clip-held", clip_held_while(hold, tmp_path / "clip-held-source"))
    fn = FunctionProcess("clip-held", tmp_path, clip_env).start(wait_ready=False)
    try:
        def answering():
            try:
                return requests.get(fn.host_url + "/ready", timeout=2) is not None
            except requests.ConnectionError:
                return False
        wait_until(answering, 60, what="server up")
        # Still loading: 503 and no lock file, so the watchdog's /_/health and Kubernetes readiness stay red.
        assert not fn.lock.exists()
        early = requests.post(fn.host_url, data=image_bytes(), timeout=30)
        assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
        assert "Retry-After" in early.headers
        assert requests.get(fn.host_url + "/ready", timeout=5).status_code == 503
        hold.unlink()
        fn.wait_ready()
        assert requests.get(fn.host_url + "/ready", timeout=5).status_code == 200
        assert requests.post(fn.url, data=image_bytes(), timeout=30).status_code == 200
    finally:
        code = fn.stop()
    assert code == 0
    assert not fn.lock.exists()
