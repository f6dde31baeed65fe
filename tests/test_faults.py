"""Faults: clip stopped, slow, overloaded or terminated. index answers clearly and recovers on its own;
clip sheds load with 429, answers 504 past its deadline, and drains in-flight requests on SIGTERM."""
import io
import json
import select
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image
from support.held import sockets
from support.images import noise_image
from support.servers import WATCHDOG, FunctionProcess, wait_until

PNG = noise_image("PNG", size=(96, 64), seed=31)


def assert_json_error(response, status, codes):
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] in codes, response.text[:300]


def assert_html_error(response, status):
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("text/html")
    assert 'role="alert"' in response.text and "<form" in response.text


def post_index(index, html=False):
    accept = "text/html" if html else "application/json"
    return requests.post(index.url, files={"image": ("a.png", PNG, "image/png")}, headers={"Accept": accept},
                         timeout=60)


# ---- index when clip is away, silent or slow -----------------------------------------------------------

def test_index_answers_502_while_clip_is_stopped_and_recovers_when_it_is_back(clip_env, tmp_path):
    clip = FunctionProcess("clip", tmp_path / "first", clip_env).start()
    clip_url = clip.url + "/"
    with FunctionProcess("index", tmp_path, {"CLIP_URL": clip_url, "CLIP_TIMEOUT_S": "20"}) as index:
        expected = post_index(index)
        assert expected.status_code == 200
        assert clip.stop() == 0

        assert_json_error(post_index(index), 502, {"clip_unreachable"})
        assert_html_error(post_index(index, html=True), 502)
        assert requests.get(index.url, timeout=30).status_code == 200  # the page itself still renders

        # clip comes back on the same address; index is not restarted.
        again = FunctionProcess("clip", tmp_path / "second", clip_env, replaces=clip)
        again.start(wait_ready=False)
        try:
            seen = set()

            def recovered():
                response = post_index(index)
                seen.add(response.status_code)
                if response.status_code != 200:  # down, then loading: clear answers all along
                    # Behind of-watchdog, until the new host listens (its interpreter starting), the watchdog
                    # itself answers 500 with no body; index calls that a bad answer. (On a cluster, clip's
                    # readiness keeps its watchdog out of the Service until then.)
                    starting = {"clip_bad_answer"} if WATCHDOG else set()
                    assert_json_error(response, response.status_code, {"clip_unreachable", "loading", *starting})
                    assert response.status_code in (502, 503)
                    return False
                return True
            wait_until(recovered, 180, 0.2, "index recovering")
            assert post_index(index).json()["predictions"] == expected.json()["predictions"]
            assert index.process.poll() is None
        finally:
            assert again.stop() == 0


def test_index_answers_504_when_clip_accepts_but_never_answers(tmp_path):
    """A hung clip (or gateway): index's read timeout ends the wait with a clear 504."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections complete in the kernel's backlog; nothing ever reads or answers
    try:
        env = {"CLIP_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/", "CLIP_TIMEOUT_S": "1"}
        with FunctionProcess("index", tmp_path, env) as index:
            assert_json_error(post_index(index), 504, {"clip_timeout"})
            assert_html_error(post_index(index, html=True), 504)
            assert requests.get(index.url, timeout=30).status_code == 200
    finally:
        silent.close()


def test_clip_past_its_deadline_answers_504_and_index_passes_it_on(clip_env, tmp_path):
    """CLIP_DEADLINE_S shorter than any forward pass: every request outlives it."""
    with FunctionProcess("clip", tmp_path / "clip", {**clip_env, "CLIP_DEADLINE_S": "0.000001"}) as clip:
        assert_json_error(requests.post(clip.url, data=PNG, timeout=30), 504, {"deadline_exceeded"})
        with FunctionProcess("index", tmp_path, {"CLIP_URL": clip.url + "/"}) as index:
            assert_json_error(post_index(index), 504, {"deadline_exceeded"})
            assert_html_error(post_index(index, html=True), 504)
        described = requests.get(clip.url, timeout=10).json()
        assert described["limits"]["deadline_s"] == 0.000001


# ---- load shedding ------------------------------------------------------------------------------------------

def test_a_full_queue_answers_429_with_retry_after(clip_env, tmp_path):
    env = {**clip_env, "CLIP_MAX_QUEUE": "2", "CLIP_MAX_BATCH": "1"}
    with FunctionProcess("clip", tmp_path, env) as clip:
        # More images than the queue holds could never be admitted: a 400 naming the limit, not a 429.
        response = requests.post(clip.url, files=[("image", ("a.png", PNG))] * 3, timeout=30)
        assert_json_error(response, 400, {"too_many_images"})
        assert "At most 2 images" in response.json()["error"]["message"] and "Retry-After" not in response.headers

        # A burst of two-image requests against a two-image queue: each is served or shed, nothing else.
        images = [noise_image("PNG", size=(320, 240), seed=s) for s in range(4)]

        def burst(i):
            return requests.post(clip.url, files=[("image", ("a.png", images[i % 4])),
                                                  ("image", ("b.png", images[(i + 1) % 4]))], timeout=60)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(burst, range(64)))
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 429}, statuses
        for r in answers:
            if r.status_code == 429:
                assert_json_error(r, 429, {"queue_full"})
                assert int(r.headers["Retry-After"]) >= 1
            else:
                assert [len(x["predictions"]) for x in r.json()["results"]] == [5, 5]
        assert requests.post(clip.url, data=PNG, timeout=30).status_code == 200


# ---- SIGTERM -------------------------------------------------------------------------------------------------

def big_picture(n=5000):
    """A large picture that compresses well: small to send, a fraction of a second to decode."""
    y, x = np.mgrid[0:n, 0:n]
    pixels = np.stack([x * 255 // n, y * 255 // n, (x ^ y) & 255], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def http_request(port, images):
    boundary = b"drainboundary"
    parts = b"".join(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
                     b"Content-Type: image/png\r\n\r\n" + image + b"\r\n" for image in images)
    body = parts + b"--" + boundary + b"--\r\n"
    head = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=%s\r\nContent-Length: %d\r\n\r\n"
            % (port, boundary, len(body)))
    return head + body


def read_response(sock):
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if body else None


def answers_across_sigterm(fn, raw_requests, held_back=0.0, pause=0.0):
    """Send each request (all but its last `held_back` fraction), SIGTERM once the function has accepted
    every connection, check the lock file goes and the process stays, send the rest after `pause`;
    -> (answers, exit status). With part of each body held back, no answer can have come before the
    lock file went (a test that needs requests in the handler at SIGTERM holds them there: test_workers)."""
    cut = [len(raw) - int(len(raw) * held_back) for raw in raw_requests]
    socks = []
    try:
        accepted = sockets(fn.process.pid)
        for raw, at in zip(raw_requests, cut):
            sock = socket.create_connection(fn.address, timeout=120)
            sock.sendall(raw[:at])
            socks.append(sock)
        wait_until(lambda: sockets(fn.process.pid) >= accepted + len(socks), 30, 0.005, "connections accepted")
        assert fn.healthy()
        fn.process.send_signal(signal.SIGTERM)
        wait_until(lambda: not fn.lock.exists(), 30, 0.002, "lock file removed")
        if held_back:
            readable, _, _ = select.select(socks, [], [], 0)
            assert not readable, "an answer to a request still arriving"
        time.sleep(pause)
        assert fn.process.poll() is None, "exited with requests unanswered"
        for raw, at, sock in zip(raw_requests, cut, socks):
            sock.sendall(raw[at:])
        answers = [read_response(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
        code = fn.stop(timeout=120)
    return answers, code


def test_sigterm_lets_8_requests_being_processed_finish(clip_env, tmp_path):
    picture = big_picture()  # 4 per request: each takes a second or more of decoding
    fn = FunctionProcess("clip", tmp_path, clip_env).start()
    answers, code = answers_across_sigterm(fn, [http_request(fn.port, [picture] * 4)] * 8)
    assert [status for status, _ in answers] == [200] * 8, answers
    assert all(len(body["results"]) == 4 for _, body in answers)
    assert code == 0


def test_sigterm_waits_for_requests_still_arriving(clip_env, tmp_path):
    """8 uploads in progress when SIGTERM comes (the host has not seen a whole request yet): the lock
    file goes first, the uploads finish afterwards, each gets its answer, and the process exits 0."""
    fn = FunctionProcess("clip", tmp_path, clip_env).start()
    raw = [http_request(fn.port, [noise_image("PNG", size=(256, 256), seed=i)]) for i in range(8)]
    answers, code = answers_across_sigterm(fn, raw, held_back=0.5, pause=1.0)  # a slow client's second half
    assert [status for status, _ in answers] == [200] * 8, answers
    assert code == 0
