"""The index function over real HTTP, forwarding to a real clip server through the local gateway."""
import re

import requests

from support.images import noise_image
from support.servers import FunctionProcess, free_port


def test_page_is_self_contained(stack):
    response = requests.get(stack.url + "/function/index", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    html = response.text
    assert '<form id="form" method="post" enctype="multipart/form-data"' in html
    assert 'type="file" name="image"' in html and 'name="labels"' in html
    # Nothing from another host: no absolute URLs in src/href, and the CSP forbids them too.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_post_forwards_to_clip_and_answers_its_json(stack):
    png = noise_image("PNG", seed=11)
    direct = requests.post(stack.url + "/function/clip", data=png, params={"top_k": 3}, timeout=60).json()
    via_index = requests.post(stack.url + "/function/index", files={"image": ("a.png", png, "image/png")},
                              data={"top_k": "3"}, headers={"Accept": "application/json"}, timeout=60)
    assert via_index.status_code == 200
    assert via_index.headers["Content-Type"] == "application/json"
    assert via_index.json()["predictions"] == direct["predictions"]
    raw = requests.post(stack.url + "/function/index", data=png, params={"labels": "cat,dog"}, timeout=60).json()
    assert raw["label_set"] == "custom" and {r["label"] for r in raw["predictions"]} == {"cat", "dog"}


def test_clip_errors_pass_through_with_their_status(stack):
    response = requests.post(stack.url + "/function/index", files={"image": ("x.png", b"garbage")},
                             headers={"Accept": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_image"


def test_plain_form_post_renders_a_results_page(stack):
    png = noise_image("PNG", seed=12)
    expected = requests.post(stack.url + "/function/clip", data=png, params={"top_k": 4}, timeout=60).json()
    response = requests.post(stack.url + "/function/index", files={"image": ("a.png", png, "image/png")},
                             data={"top_k": "4", "labels": "", "label_set": "cifar100"},
                             headers={"Accept": "text/html,application/xhtml+xml"}, timeout=60)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    rows = re.findall(r'<span class="label">([^<]*)</span><span class="pct">([\d.]+)%</span>', response.text)
    assert [label for label, _ in rows] == [r["label"] for r in expected["predictions"]]
    assert [float(p) for _, p in rows] == [round(r["score"] * 100, 1) for r in expected["predictions"]]


def test_form_post_error_renders_readable_html(stack):
    response = requests.post(stack.url + "/function/index", files={"image": ("x.png", b"garbage")},
                             headers={"Accept": "text/html"}, timeout=60)
    assert response.status_code == 400 and "text/html" in response.headers["Content-Type"]
    assert re.search(r'id="error" class="error" role="alert">[^<]*could not|not an image', response.text)


def test_clip_down_gives_a_clear_502_not_a_hang(tmp_path):
    env = {"CLIP_URL": f"http://127.0.0.1:{free_port()}/function/clip", "CLIP_TIMEOUT_S": "5"}
    with FunctionProcess("index", tmp_path, env) as index:
        response = requests.post(index.url, files={"image": ("a.png", noise_image())},
                                 headers={"Accept": "application/json"}, timeout=30)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "clip_unreachable"
        page = requests.get(index.url, timeout=30)  # the page itself still renders
        assert page.status_code == 200 and "<form" in page.text
