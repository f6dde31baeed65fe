"""The functions behind the real of-watchdog (fwatchdog: $FWATCHDOG, PATH or ../shared/bin), configured
as the template's image configures it (mode=http, the Dockerfile's ENV, the stack's timeouts): what a
container answers on its port 8080, without building an image. The other tests' functions run behind it
too (support.servers); these check the watchdog's own endpoints, timeouts and drain with the stack's
settings."""
import base64
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from support.held import Held, clip_held_while
from support.images import noise_image
from support.servers import WATCHDOG, WATCHDOG_ABSENT, FunctionProcess, wait_until
from test_faults import answers_across_sigterm, http_request

from localrun.functions import FUNCTION_DIRS

FUNCTION_DIRS.setdefault("probe", Path(__file__).parent / "support" / "probe_function")

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not WATCHDOG, reason=f"these tests run the functions behind the real watchdog: "
                                f"{WATCHDOG_ABSENT}")


def stack_environment(name):
    """The stack's run-time environment: the function's settings and the watchdog's timeouts."""
    (fn,) = yaml.safe_load((ROOT / f"{name}.yml").read_text())["functions"].values()
    return {k: str(v) for k, v in fn["environment"].items()}


def behind_watchdog(name, workdir, env):
    return FunctionProcess(name, workdir, {**stack_environment(name), **env}, watchdog=WATCHDOG)


def test_health_and_ready_follow_the_lock_file_and_requests_pass_through(clip_env, tmp_path, monkeypatch):
    hold = tmp_path / "loading"
    hold.touch()  # clip's init() waits while this file exists: loading until the test says
    monkeypatch.setitem(FUNCTION_DIRS, "clip-held", clip_held_while(hold, tmp_path / "clip-held-source"))
    fn = FunctionProcess("clip-held", tmp_path, {**stack_environment("clip"), **clip_env}, watchdog=WATCHDOG)
    fn.start(wait_ready=False)
    try:
        def answering():
            try:
                return requests.get(fn.url + "/_/health", timeout=2) is not None
            except requests.ConnectionError:
                return False
        wait_until(answering, 60, what="watchdog up")
        assert not fn.lock.exists()  # still loading
        assert requests.get(fn.url + "/_/health", timeout=5).status_code == 503
        assert requests.get(fn.url + "/_/ready", timeout=5).status_code == 503
        hold.unlink()
        fn.wait_ready()
        assert requests.get(fn.url + "/_/health", timeout=5).status_code == 200
        assert requests.get(fn.url + "/_/ready", timeout=5).status_code == 200  # never a dropped connection
        png = noise_image("PNG", seed=8)
        raw = requests.post(fn.url, data=png, headers={"Content-Type": "image/png"}, timeout=60)
        assert raw.status_code == 200, raw.text
        form = requests.post(fn.url, files={"image": ("a.png", png, "image/png")}, timeout=60)
        as_json = requests.post(fn.url, json={"image": base64.b64encode(png).decode()}, timeout=60)
        assert form.json()["predictions"] == as_json.json()["predictions"] == raw.json()["predictions"]
        bad = requests.post(fn.url, data=b"not an image", timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
    finally:
        code = fn.stop()
    assert code == 0, fn.output()
    assert not fn.lock.exists()


def test_over_long_body_gets_the_hosts_json_413_through_the_watchdog(clip_env, tmp_path):
    with behind_watchdog("clip", tmp_path, {**clip_env, "MAX_BODY_BYTES": "100000"}) as fn:
        response = requests.post(fn.url, data=b"\xff\xd8\xff" + b"\0" * 200_000, timeout=30)
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"
        assert requests.post(fn.url, data=noise_image("PNG"), timeout=30).status_code == 200


def test_sigterm_through_the_watchdog_answers_8_requests_in_flight(tmp_path):
    """8 requests held in the handler (the template host's probe function) when SIGTERM reaches the
    watchdog: the lock file goes while they are held, and once let go all 8 are answered and it exits 0."""
    timeouts = {k: v for k, v in stack_environment("clip").items() if k.endswith("_timeout")}
    fn = FunctionProcess("probe", tmp_path, timeouts, watchdog=WATCHDOG).start()
    held = Held(tmp_path / "held")
    with ThreadPoolExecutor(8) as pool:
        asked = [pool.submit(requests.get, fn.url, params=held.params, timeout=60) for _ in range(8)]
        wait_until(lambda: len(held.holding()) == 8, 30, 0.005, "8 requests in the handler")
        fn.process.send_signal(signal.SIGTERM)
        wait_until(lambda: not fn.lock.exists(), 30, 0.002, "lock file removed")
        assert not any(f.done() for f in asked) and fn.process.poll() is None
        held.release()
        answers = [f.result() for f in asked]
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert fn.process.wait(60) == 0, fn.output()
    fn.stop()


def test_sigterm_through_the_watchdog_waits_for_uploads_still_arriving(clip_env, tmp_path):
    """The watchdog holds the uploads (it buffers bodies) and forwards SIGTERM at once: the host must
    keep answering until the watchdog has drained, or the uploads would meet a closed port (502)."""
    fn = behind_watchdog("clip", tmp_path, clip_env).start()
    raw = [http_request(fn.port, [noise_image("PNG", size=(256, 256), seed=i)]) for i in range(8)]
    answers, code = answers_across_sigterm(fn, raw, held_back=0.5, pause=1.0)
    assert [status for status, _ in answers] == [200] * 8, answers
    assert code == 0, fn.output()


def test_index_behind_the_watchdog_serves_the_page_and_forwards(clip_server, tmp_path):
    with behind_watchdog("index", tmp_path, {"CLIP_URL": clip_server.url + "/"}) as index:
        assert requests.get(index.url + "/_/ready", timeout=5).status_code == 200
        page = requests.get(index.url, timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        answer = requests.post(index.url, files={"image": ("a.png", noise_image("PNG"), "image/png")},
                               headers={"Accept": "application/json"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["predictions"], answer.text


def test_over_long_uploads_get_the_hosts_json_413_every_time_through_the_watchdog(clip_env, tmp_path):
    """The watchdog buffers the body and writes all of it to the host, which refuses it from its
    Content-Length at once: had the host closed with the body unread, the reset would throw its 413
    away and the watchdog would answer its own 500 (issue 28: 8 to 16 in 50 at 1 MB before the fix)."""
    with behind_watchdog("clip", tmp_path, {**clip_env, "MAX_BODY_BYTES": "100000"}) as fn:
        with requests.Session() as session:
            answers = [session.post(fn.url, data=b"\xff\xd8\xff" + b"\0" * 1_000_000, timeout=30) for _ in range(50)]
        wrong = [(a.status_code, a.text[:200]) for a in answers
                 if a.status_code != 413 or a.headers.get("Content-Type") != "application/json"
                 or a.json()["error"]["code"] != "body_too_large"]
        assert not wrong, f"{len(wrong)} of 50: {wrong[:3]}"
        assert requests.post(fn.url, data=noise_image("PNG"), timeout=30).status_code == 200
