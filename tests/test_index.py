"""The index function over real HTTP, forwarding to a real clip server through the local gateway."""
import re

import pytest
import requests
from support.images import noise_image
from support.servers import FunctionProcess, free_port, wait_until

import localrun


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


def test_label_sets_come_from_clip(stack, tmp_path):
    described = requests.get(stack.url + "/function/clip", timeout=10).json()
    page = requests.get(stack.url + "/function/index", timeout=10).text
    options = re.findall(r'<option value="([^"]*)"( selected)?>', page)
    assert [name for name, _ in options] == list(described["label_sets"])
    assert [name for name, selected in options if selected] == [described["default_label_set"]]
    # clip unreachable: one neutral choice that lets clip pick its default, and the page still renders.
    env = {"CLIP_URL": f"http://127.0.0.1:{free_port()}/function/clip"}
    with FunctionProcess("index", tmp_path, env) as index:
        page = requests.get(index.url, timeout=30).text
        assert re.findall(r'<option value="([^"]*)"', page) == [""]


def multipart(parts):
    """A multipart body from (name, filename or None, bytes) parts, however many."""
    boundary = "----flood"
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_form_floods_are_refused_before_forwarding(tmp_path):
    # clip is unreachable here: a 4xx (not a 502) shows the form was refused before any forwarding.
    # too_many_parts is 400, as clip answers it: one status per code.
    env = {"CLIP_URL": f"http://127.0.0.1:{free_port()}/function/clip"}
    with FunctionProcess("index", tmp_path, env) as index:
        body, content_type = multipart([("x", None, b"1")] * 300_000)  # 300,000 tiny parts, 13 MB
        response = requests.post(index.url, data=body, headers={"Content-Type": content_type,
                                                                "Accept": "application/json"}, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_parts"

        # 17 pictures where clip takes 16 (its default; clip cannot be asked here).
        body, content_type = multipart([("image", f"{i}.png", noise_image(seed=i)) for i in range(17)])
        response = requests.post(index.url, data=body, timeout=60, headers={"Content-Type": content_type})
        assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_images"


def test_a_huge_field_is_clips_to_refuse_and_the_page_does_not_echo_it(stack):
    # A 7 MB labels field: clip's limits are on labels (how many, how long), not on a field's bytes, and
    # index answers what clip answers; the page shows clip's message, not the field.
    labels = ",".join(f"label{i}" for i in range(600_000)).encode()
    body, content_type = multipart([("image", "a.png", noise_image()), ("labels", None, labels)])
    direct = requests.post(stack.url + "/function/clip", data=body, timeout=60,
                           headers={"Content-Type": content_type})
    response = requests.post(stack.url + "/function/index", data=body, timeout=60,
                             headers={"Content-Type": content_type, "Accept": "text/html"})
    assert direct.status_code == 400 and direct.json()["error"]["code"] == "too_many_labels"
    assert response.status_code == 400 and "text/html" in response.headers["Content-Type"]
    assert "600000 labels sent" in response.text and "label1,label2" not in response.text
    empty_page = requests.get(stack.url + "/function/index", timeout=10).text
    assert len(re.sub(r'src="data:[^"]*"', "", response.text)) - len(empty_page) < 2_000


def test_results_page_echoes_at_most_a_screenful(stack):
    labels = ",".join(f"label number {i} " + "x" * 180 for i in range(60))  # 12 KB, within every limit
    body, content_type = multipart([("image", "a.png", noise_image(seed=13)), ("labels", None, labels.encode()),
                                    ("top_k", None, b"1000")])
    response = requests.post(stack.url + "/function/index", data=body, timeout=60,
                             headers={"Content-Type": content_type, "Accept": "text/html"})
    assert response.status_code == 200, response.text[:500]
    empty_page = requests.get(stack.url + "/function/index", timeout=10).text
    text_added = len(re.sub(r'src="data:[^"]*"', "", response.text)) - len(empty_page)
    assert text_added < 12_000  # 20 rows of 200 characters, not 60; the 12 KB field is not refilled
    assert len(re.findall(r'<span class="label">', response.text)) == 20
    assert 'value=""' in re.search(r'<input id="labels"[^>]*>', response.text).group(0)


def test_plain_form_post_of_several_pictures_renders_a_grid(stack):
    good, other = noise_image("PNG", seed=14), noise_image("JPEG", seed=15)
    parts = [("image", "good.png", good), ("image", "broken.png", b"not a picture"), ("image", "other.jpg", other),
             ("top_k", None, b"3")]
    body, content_type = multipart(parts)
    expected = requests.post(stack.url + "/function/clip", data=body, headers={"Content-Type": content_type},
                             timeout=60).json()["results"]
    response = requests.post(stack.url + "/function/index", data=body, timeout=60,
                             headers={"Content-Type": content_type, "Accept": "text/html"})
    assert response.status_code == 200
    cards = re.findall(r'<li class="result( failed)?">(.*?)</li>\s*(?=<li class="result|</ul>)', response.text, re.S)
    assert len(cards) == 3
    for (failed, card), name, answer in zip(cards, ("good.png", "broken.png", "other.jpg"), expected):
        assert f'<h3 class="name">{name}</h3>' in card
        if "error" in answer:
            assert failed and answer["error"]["message"] in card.replace("&#39;", "'")
        else:
            labels = re.findall(r'<span class="label">([^<]*)</span>', card)
            assert labels == [row["label"] for row in answer["predictions"]] and 'src="data:image/' in card
    assert "Done: 2 of 3 pictures classified." in response.text


def test_index_takes_every_form_clip_takes(stack):
    """Each way docs/api.md sends a picture gets the same answer through index as from clip: curl's -d and
    --data-binary send under curl's default type (a form), which index must not take for a form."""
    import base64

    photo = noise_image("PNG", size=(300, 300), seed=16)  # 270 KB: its base64 is over 256 KB (index's old field limit)
    coded = base64.b64encode(photo).decode()
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl -d / --data-binary send
    ways = {
        "raw bytes, curl's default type": {"data": photo, "headers": form_type},
        "raw bytes, image/png": {"data": photo, "headers": {"Content-Type": "image/png"}},
        "multipart": {"files": {"image": ("a.png", photo, "image/png")}, "data": {"top_k": "2"}},
        "base64 text": {"data": coded, "headers": form_type},
        "a data URL": {"data": "data:image/png;base64," + coded, "headers": form_type},
        "a form field of base64": {"data": {"image": coded, "top_k": "2"}},
        "a multipart field of base64": {"files": {"image": (None, coded)}, "data": {"top_k": "2"}},
        "a form of more fields than a picture needs": {
            "data": [(f"note{i}", "x") for i in range(40)] + [("image", coded)]},
        "a form of many fields and no picture": {"data": "a=1&" * 20_000, "headers": form_type},
        "JSON": {"json": {"image": coded, "labels": "cat,dog"}},
        "JSON, a batch": {"json": {"images": [coded, "data:image/png;base64," + coded]}},
        "not a picture, curl's default type": {"data": b"\x00\xff" * 100, "headers": form_type},
        "JSON, too many": {"json": {"images": [coded] * 17}},
    }
    for way, request in ways.items():
        direct = requests.post(stack.url + "/function/clip", timeout=60, **request)
        via_index = requests.post(stack.url + "/function/index", timeout=60, **request)
        assert via_index.headers["Content-Type"] == "application/json", way
        assert via_index.status_code == direct.status_code, (way, via_index.text[:300])
        expected, got = direct.json(), via_index.json()
        for key in ("predictions", "results", "label_set"):
            assert got.get(key) == expected.get(key), way
        assert got.get("error", {}).get("code") == expected.get("error", {}).get("code"), way
    assert direct.status_code == 400  # the last way: refused by both, with one code


def test_empty_plain_form_post_says_what_to_do(stack):
    # the page without JavaScript, submitted with no picture chosen: the browser sends an empty file part
    body, content_type = multipart([("image", "", b""), ("labels", None, b""), ("top_k", None, b"5")])
    body = body.replace(b'name="image"', b'name="image"; filename=""')
    response = requests.post(stack.url + "/function/index", data=body, timeout=60,
                             headers={"Content-Type": content_type, "Accept": "text/html"})
    assert response.status_code == 400 and "text/html" in response.headers["Content-Type"]
    error = re.search(r'id="error" class="error" role="alert">([^<]*)<', response.text).group(1)
    assert error.startswith("Choose a picture first") and "multipart" not in error


def test_the_hosts_own_413_carries_a_request_id(tmp_path):
    env = {"CLIP_URL": f"http://127.0.0.1:{free_port()}/function/clip", "MAX_BODY_BYTES": "100000"}
    with FunctionProcess("index", tmp_path, env) as index:
        response = requests.post(index.url, data=b"\xff\xd8\xff" + b"\0" * 200_000, timeout=30)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        assert re.fullmatch(r"[0-9a-f]{32}", response.json()["request_id"])
        assert response.headers["X-Request-Id"] == response.json()["request_id"]


def test_a_plain_form_post_over_the_hosts_limit_gets_the_page(tmp_path):
    """The template host refuses a body over MAX_BODY_BYTES before index sees it; a browser without
    JavaScript gets index's page with the refusal in its error box (413), a script still gets JSON."""
    env = {"CLIP_URL": f"http://127.0.0.1:{free_port()}/function/clip", "MAX_BODY_BYTES": "100000"}
    body, content_type = multipart([("image", "big.jpg", b"\xff\xd8\xff" + b"\0" * 200_000), ("top_k", None, b"5")])
    with FunctionProcess("index", tmp_path, env) as index:
        response = requests.post(index.url, data=body, timeout=30, headers={
            "Content-Type": content_type, "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
            "X-Request-Id": "big-form-1"})
        assert response.status_code == 413 and response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert response.headers["X-Request-Id"] == "big-form-1"
        error = re.search(r'id="error" class="error" role="alert">([^<]*)<', response.text).group(1)
        assert error == "The pictures sent are larger than 98 KB in all: choose fewer or smaller pictures."
        assert '<form id="form"' in response.text
        scripted = requests.post(index.url, data=body, timeout=30, headers={"Content-Type": content_type})
        assert scripted.status_code == 413 and scripted.json()["error"]["code"] == "body_too_large"


def test_the_error_page_escapes_what_it_shows():
    from frontend.index import handler

    html = handler.error_page(400, "bad_request", 'Bad <script>alert("x")</script> request.', "id-1")
    error = re.search(r'id="error" class="error" role="alert">([^<]*)<', html).group(1)
    assert error == "Bad &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; request." and "<script>alert" not in html

@pytest.mark.parametrize("env, line", [
    ({"CLIP_TIMEOUT_S": "soon"}, "CLIP_TIMEOUT_S must be a number from 0.1 to 3600, not 'soon'"),
    ({"INDEX_SHRINK_QUALITY": "90"}, "INDEX_SHRINK_QUALITY must be a number from 0.1 to 1, not '90'"),
    ({"CLIP_URL": "gateway:8080/function/clip"},
     "CLIP_URL must be an http:// or https:// URL with a host and no query, not 'gateway:8080/function/clip'"),
])
def test_a_bad_setting_stops_index_at_start_with_one_line(tmp_path, env, line):
    index = localrun.FunctionProcess("index", tmp_path, env)  # no watchdog: the host's own exit status
    index.start(wait_ready=False)
    try:
        wait_until(lambda: index.process.poll() is not None, 60, what="index to exit")
        output = index.output()
    finally:
        index.stop()
    assert index.process.returncode == 78 and "Traceback" not in output, output
    assert [text.partition(" ERROR ")[2] for text in output.splitlines() if " ERROR " in text] == [line], output


def test_every_setting_index_reads_is_declared_once():
    """index reads its settings through config.py's declarations alone (nothing else reads the environment)."""
    from frontend.index import config

    sources = {path.name: path.read_text() for path in localrun.ROOT.joinpath("frontend/index").glob("*.py")}
    assert [name for name, text in sources.items() if re.search(r"\bos\.environ|getenv", text)] == []
    names = [setting.name for setting in config.DECLARATIONS]
    assert len(names) == len(set(names)) and {"CLIP_URL", "CLIP_TIMEOUT_S", "INDEX_MAX_ANSWER_BYTES"} <= set(names)
