"""index treats clip's answers as untrusted input. A fake clip on 127.0.0.1 (behind CLIP_URL) answers as a
broken or hostile service would: gzip bombs, answers that drip, redirects elsewhere, wrong shapes, a
description with Infinity in it or one that never ends. index answers 502 `clip_bad_answer` (or 504 at its
deadline), its memory stays bounded, and the page always renders."""
import json
import re
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests
from support.images import noise_image
from support.servers import FunctionProcess, wait_until

PNG = noise_image("PNG", seed=41)
GOOD_DESCRIPTION = (
    b'{"ready": true, "model": "FakeCLIP", "pretrained": "none", "untrained": false, "url_input": false,'
    b' "label_sets": {"fake-set-a": {"labels": 2}, "fake-set-b": {"labels": 3}}, "default_label_set": "fake-set-b",'
    b' "limits": {"max_images": 3, "max_body_bytes": 1000000}}'
)
GOOD_ANSWER = b'{"predictions": [{"label": "fake cat", "score": 0.75}, {"label": "fake dog", "score": 0.25}]}'
UNTRAINED_ANSWER = GOOD_ANSWER[:-1] + (b', "model": "FakeCLIP", "pretrained": "none", "untrained": true,'
                                       b' "warning": "Random weights.", "label_set": "fake-set-b", "elapsed_ms": 1.5}')
FOUR_ANSWERS = b'{"results": [' + b", ".join([GOOD_ANSWER] * 4) + b"]}"
# A description that would be fine but for one value, and answers of every wrong shape.
BAD_DESCRIPTIONS = {
    "infinity": GOOD_DESCRIPTION.replace(b'"max_images": 3', b'"max_images": Infinity'),
    "huge": GOOD_DESCRIPTION.replace(b'"max_images": 3', b'"max_images": 1e999'),
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "sets-as-text": GOOD_DESCRIPTION.replace(b'"label_sets": {', b'"label_sets": "x", "_": {'),
}
BAD_ANSWERS = {
    "score-string": b'{"predictions": [{"label": "cat", "score": "0.9"}]}',
    "score-null": b'{"predictions": [{"label": "cat", "score": null}]}',
    "score-nan": b'{"predictions": [{"label": "cat", "score": NaN}]}',
    "predictions-string": b'{"predictions": "cat"}',
    "predictions-object": b'{"predictions": {"label": "cat", "score": 0.9}}',
    "label-object": b'{"predictions": [{"label": {"x": 1}, "score": 0.9}]}',
    "results-junk": b'{"results": [{"predictions": [{"label": "cat", "score": 0.9}]}, 7]}',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep-inside": b'{"predictions": [], "model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not-json": b"<html>oops</html>",
    "nothing": b"{}",
}
BAD_ERRORS = {  # (status, body): an error answer must carry an error of the contract's shape
    "error-string": (400, b'{"error": "bad"}'),
    "error-code-number": (400, b'{"error": {"code": 7, "message": "bad"}}'),
}
GATEWAY_ANSWERS = {  # a gateway or watchdog answering for clip, not in clip's shape: (status, body, index's answer)
    "gateway-504": (504, b"upstream request timeout", (504, "clip_timeout")),
    "gateway-502": (502, b"<html>502 Bad Gateway</html>", (503, "clip_unavailable")),
    "gateway-503": (503, b"no endpoints available for service clip", (503, "clip_unavailable")),
}
BOMB_BYTES = 256 * 1024 * 1024  # of spaces, as gzip: about 250 KB on the wire


def gzip_bomb():
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * (1024 * 1024)
    return b"".join(packer.compress(block) for _ in range(BOMB_BYTES // len(block))) + packer.flush()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # index hanging up on an answer it refuses is what the tests want


class FakeClip:
    """clip as a broken or hostile service. A GET (the description) answers by the path's first segment
    (CLIP_URL = …/<mode>/function/clip); a POST by its ?fake= (index forwards the query as it came)."""

    def __init__(self):
        self.seen = []  # (method, path) of every request, in order
        self.dripping = 0  # answers dripping right now
        self.release = threading.Event()  # "held" descriptions wait for it
        self.closing = threading.Event()
        self.bomb = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body, **headers):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                headers = {"Content-Length": str(len(body)), **{k.replace("_", "-"): v for k, v in headers.items()}}
                for name, value in headers.items():
                    if value is not None:
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def drip(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                with fake.counting():
                    for _ in range(600):  # a byte every 0.2 s for two minutes, unless the test ends first
                        if fake.closing.wait(0.2):
                            return
                        try:
                            self.wfile.write(b" ")
                        except OSError:
                            return  # index hung up: what we want

            def do_GET(self):
                fake.seen.append(("GET", self.path))
                mode = self.path.split("/")[1]
                if mode == "held":
                    fake.release.wait(60)
                if mode == "drip":
                    return self.drip()
                if mode == "redirect":
                    return self.send(302, b"{}", Location=fake.elsewhere.url + "/function/clip")
                self.send(200, BAD_DESCRIPTIONS.get(mode, GOOD_DESCRIPTION))

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.seen.append(("POST", self.path))
                mode = self.path.partition("fake=")[2]
                if mode == "drip":
                    return self.drip()
                if mode in ("302", "307"):
                    return self.send(int(mode), b"{}", Location=fake.elsewhere.url + "/function/clip")
                if mode == "bomb":
                    return self.send(200, fake.bomb, Content_Encoding="gzip")
                if mode == "big":  # no length: read until the connection closes
                    return self.send(200, b'{"predictions": [' + b" " * (64 * 1024 * 1024) + b"]}", Content_Length=None)
                if mode == "untrained":
                    return self.send(200, UNTRAINED_ANSWER)
                if mode == "four":
                    return self.send(200, FOUR_ANSWERS)
                if mode in BAD_ERRORS:
                    return self.send(*BAD_ERRORS[mode])
                if mode in GATEWAY_ANSWERS:
                    return self.send(*GATEWAY_ANSWERS[mode][:2])
                self.send(200, BAD_ANSWERS.get(mode, GOOD_ANSWER))

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def counting(self):
        fake = self

        class Counting:
            def __enter__(self):
                fake.dripping += 1

            def __exit__(self, *exc):
                fake.dripping -= 1

        return Counting()

    def described(self, mode):
        return sum(1 for method, path in self.seen if method == "GET" and path.startswith(f"/{mode}/"))

    def close(self):
        self.closing.set()
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fakes():
    elsewhere, clip = FakeClip(), FakeClip()
    clip.elsewhere = elsewhere  # where clip's redirects point: index must never go there
    clip.bomb = gzip_bomb()
    yield clip
    clip.close()
    elsewhere.close()


@pytest.fixture(scope="module")
def index(fakes, tmp_path_factory):
    env = {"CLIP_URL": fakes.url + "/function/clip", "CLIP_TIMEOUT_S": "3"}
    with FunctionProcess("index", tmp_path_factory.mktemp("index"), env) as index:
        yield index


def post_json(index, mode, timeout=60):
    return requests.post(index.url, data=PNG, params={"fake": mode}, headers={"Accept": "application/json"},
                         timeout=timeout)


def post_form(index, mode):
    return requests.post(index.url, params={"fake": mode}, files={"image": ("a.png", PNG, "image/png")},
                         headers={"Accept": "text/html"}, timeout=60)


def assert_bad_answer(response):
    assert response.status_code == 502, response.text[:300]
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "clip_bad_answer", response.text[:300]


def assert_page(response, status):
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("text/html")
    assert '<form id="form"' in response.text


def test_a_good_answer_passes_through(index):
    response = post_json(index, "good")
    assert response.status_code == 200
    assert [row["label"] for row in response.json()["predictions"]] == ["fake cat", "fake dog"]
    page = post_form(index, "good")
    assert_page(page, 200)
    assert '<span class="label">fake cat</span><span class="pct">75.0%</span>' in page.text
    every_field = post_json(index, "untrained").json()  # every field of the contract goes on
    assert every_field == {**json.loads(UNTRAINED_ANSWER), "request_id": every_field["request_id"]}


@pytest.mark.parametrize("mode", sorted(BAD_ANSWERS) + sorted(BAD_ERRORS))
def test_an_answer_of_another_shape_is_502_and_the_page_still_renders(index, mode):
    assert_bad_answer(post_json(index, mode))
    page = post_form(index, mode)
    assert_page(page, 502)
    assert re.search(r'id="error" class="error" role="alert">The classifier sent [^<]+\.<', page.text)


@pytest.mark.parametrize("mode", sorted(GATEWAY_ANSWERS))
def test_a_gateway_answering_for_clip_is_one_status_per_code(index, mode):
    """A gateway that gave up on clip is clip_timeout (504), one that could not reach it clip_unavailable
    (503): each code has one status, whoever answered."""
    response = post_json(index, mode)
    status, code = GATEWAY_ANSWERS[mode][2]
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text[:300]


@pytest.mark.parametrize("status", ["302", "307"])
def test_redirects_are_not_followed(fakes, index, status):
    before = len(fakes.elsewhere.seen)
    assert_bad_answer(post_json(index, status))
    assert_page(post_form(index, status), 502)
    assert len(fakes.elsewhere.seen) == before  # the upload went nowhere else


def test_an_answer_that_drips_ends_at_the_deadline(fakes, index):
    started = time.monotonic()
    response = post_json(index, "drip")  # 100,000 bytes at 5 a second: hours without a deadline
    elapsed = time.monotonic() - started
    assert response.status_code == 504 and response.json()["error"]["code"] == "clip_timeout"
    assert elapsed < 30, elapsed  # CLIP_TIMEOUT_S=3, with room for a busy machine; the drip goes on 120 s
    wait_until(lambda: fakes.dripping == 0, 30, what="index hanging up on the drip")


def host_process(function):
    """The template host's Python process of a function (under its watchdog, where there is one)."""
    top = psutil.Process(function.process.pid)
    return next(p for p in [top, *top.children(recursive=True)] if "index.py" in " ".join(p.cmdline()))


def peak_rss_mb(process):
    """The process's peak resident memory (VmHWM): a sample after the answer would miss a peak already freed."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024


def test_huge_answers_are_refused_with_bounded_memory(fakes, tmp_path):
    env = {"CLIP_URL": fakes.url + "/function/clip"}
    with FunctionProcess("index", tmp_path, env) as index:
        host = host_process(index)
        assert post_json(index, "good").status_code == 200  # everything imported and warm
        before = peak_rss_mb(host)
        modes = ("bomb", "big")  # 256 MB of spaces as 250 KB of gzip; 64 MB with no length given
        answers = [(post_json(index, mode), post_form(index, mode)) for mode in modes]
        grown = peak_rss_mb(host) - before
        assert grown < 50, f"index's peak memory grew by {grown:.0f} MB"
        for as_json, as_page in answers:
            assert_bad_answer(as_json)
            assert_page(as_page, 502)
        assert post_json(index, "good").status_code == 200


def page_options(html):
    return re.findall(r'<option value="([^"]*)"', html)


def test_the_page_renders_while_the_description_drips(fakes, tmp_path):
    env = {"CLIP_URL": fakes.url + "/drip/function/clip", "INDEX_DESCRIBE_TIMEOUT_S": "60"}
    with FunctionProcess("index", tmp_path, env) as index:
        for n in range(3):
            page = requests.get(index.url, timeout=30)
            assert_page(page, 200)
            assert page_options(page.text) == [""]  # the classifier's default: no description yet
            if n == 0:  # the first page load asked for the description; it is still arriving
                wait_until(lambda: fakes.dripping >= 1, 30, what="the description dripping")
            else:
                assert fakes.dripping >= 1  # this page rendered while it was still arriving
        assert fakes.described("drip") == 1


@pytest.mark.parametrize("mode", sorted(BAD_DESCRIPTIONS) + ["redirect"])
def test_a_bad_description_leaves_the_page_and_form_posts_working(fakes, tmp_path, mode):
    before = len(fakes.elsewhere.seen)
    with FunctionProcess("index", tmp_path, {"CLIP_URL": fakes.url + f"/{mode}/function/clip"}) as index:
        for _ in range(2):
            page = requests.get(index.url, timeout=30)
            assert_page(page, 200)
            assert page_options(page.text) == [""] and "Up to 16 at once" in page.text  # the fallback
        form = requests.post(index.url, params={"fake": "four"}, headers={"Accept": "text/html"}, timeout=60,
                             files=[("image", (f"{i}.png", PNG, "image/png")) for i in range(4)])
        assert_page(form, 200)  # 4 pictures: within the fallback limit of 16
        assert form.text.count('<span class="label">fake cat</span>') == 4
    assert len(fakes.elsewhere.seen) == before


def test_simultaneous_page_loads_share_one_description_fetch(fakes, tmp_path):
    env = {"CLIP_URL": fakes.url + "/held/function/clip", "INDEX_DESCRIBE_TIMEOUT_S": "60"}
    fakes.release.clear()
    try:
        with FunctionProcess("index", tmp_path, env) as index:
            with ThreadPoolExecutor(20) as pool:
                pages = list(pool.map(lambda _: requests.get(index.url, timeout=30), range(20)))
            for page in pages:  # all rendered while clip's description was held back
                assert_page(page, 200)
                assert page_options(page.text) == [""]
            assert 1 <= fakes.described("held") <= 2, fakes.seen
            fakes.release.set()
            wait_until(lambda: page_options(requests.get(index.url, timeout=30).text) == ["fake-set-a", "fake-set-b"],
                       30, 0.2, "the description on the page")
            assert 'value="fake-set-b" selected' in requests.get(index.url, timeout=30).text
            assert 1 <= fakes.described("held") <= 2, fakes.seen
    finally:
        fakes.release.set()


def test_one_thread_keeps_every_exchanges_deadline(fakes, monkeypatch):
    """index's exchanges with clip share one deadline thread for the process, not one thread each."""
    from frontend.index import clip_client, config, deadline

    monkeypatch.setattr(config, "CLIP_URL", fakes.url + "/function/clip")
    monkeypatch.setattr(config, "TIMEOUT_S", 2.0)
    started, caller, start = [], threading.current_thread(), threading.Thread.start

    def recorded(thread):  # the threads index starts while it calls clip (the fake's own are not index's)
        if threading.current_thread() is caller:
            started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recorded)
    for mode in ("good", "drip", "good", "drip", "bomb", "good"):
        status, answer, _ = clip_client.classify(PNG, "image/png", f"fake={mode}", "deadline-test")
        expected = {"good": 200, "drip": 504, "bomb": 502}[mode]
        assert status == expected, (mode, answer)
    assert set(started) <= {deadline.THREAD_NAME} and len(started) <= 1, started
    assert [t.name for t in threading.enumerate()].count(deadline.THREAD_NAME) == 1


def test_the_access_log_tells_a_pages_code_and_pictures(fakes, tmp_path):
    """A form post answered with the page (HTML, not a JSON error) still has its code and pictures in
    the host's access-log line, as a JSON answer has."""
    env = {"CLIP_URL": fakes.url + "/function/clip", "LOG_FORMAT": "json"}
    with FunctionProcess("index", tmp_path, env) as index:
        answers = {mode: post_form(index, mode) for mode in ("good", "not-json")}
        answers["batch-json"] = requests.post(  # the fake's four results: what the line counts is clip's answer
            index.url, params={"fake": "four"}, headers={"Accept": "application/json"}, timeout=60,
            files=[("image", (f"{i}.png", PNG, "image/png")) for i in range(3)])
        ids = {mode: answer.headers["X-Request-Id"] for mode, answer in answers.items()}

        def lines():
            text = (index.dir / "function.log").read_text(errors="replace")
            found = [json.loads(line) for line in text.splitlines() if line.startswith('{"time"')]
            return {line["request_id"]: line for line in found if line.get("function") == "index"}

        wait_until(lambda: set(ids.values()) <= set(lines()), 30, what="the access-log lines")
        logged = {mode: lines()[request_id] for mode, request_id in ids.items()}
    assert (logged["good"]["status"], logged["good"]["code"], logged["good"]["images"]) == (200, None, 1)
    assert (logged["not-json"]["status"], logged["not-json"]["code"]) == (502, "clip_bad_answer")
    assert (logged["batch-json"]["status"], logged["batch-json"]["images"]) == (200, 4)
