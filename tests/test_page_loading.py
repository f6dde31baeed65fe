"""The page while clip starts: it says so and what clip is doing, shows the untrained-weights warning
from the first moment clip's description says so, and updates itself once clip is ready. clip is held
loading by a test-side copy of its handler (never raced)."""
import os
import re

import requests
from support.held import clip_held_while
from support.servers import FunctionProcess, wait_until

from localrun.functions import FUNCTION_DIRS

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # never fetch a browser of its own

# clip whose Service (the model) is built only once `hold` is gone: its description already names the
# model and weights, as clip's does while it loads them.
HELD_MODEL = '''import os
import time

from . import clip_handler, service
from .clip_handler import ERROR_CODES, NAME, alive, handle, sample  # noqa: F401


def init():
    real = service.Service

    def held(*args, **kwargs):
        deadline = time.monotonic() + 120
        while os.path.exists({hold!r}) and time.monotonic() < deadline:
            time.sleep(0.005)
        return real(*args, **kwargs)

    service.Service = held  # clip's init() imports it at call time
    clip_handler.init()
'''


def held_clip(tmp_path, monkeypatch, env):
    hold = tmp_path / "loading"
    hold.touch()
    folder = clip_held_while(hold, tmp_path / "clip-held-source")
    (folder / "handler.py").write_text(HELD_MODEL.format(hold=str(hold)))
    monkeypatch.setitem(FUNCTION_DIRS, "clip-held", folder)
    clip = FunctionProcess("clip-held", tmp_path / "clip", env)
    clip.start(wait_ready=False)
    return hold, clip


def described(clip):
    try:  # a clip busy importing torch on a loaded machine may answer late: asked again, not failed
        return requests.get(clip.url, timeout=5).json()
    except (requests.RequestException, ValueError):
        return {}


def test_loading_is_shown_with_the_untrained_warning_from_the_first_moment(tmp_path, monkeypatch):
    env = {"CLIP_MODEL": "ViT-B-32", "CLIP_PRETRAINED": "none", "CLIP_CACHE_DIR": str(tmp_path / "cache")}
    hold, clip = held_clip(tmp_path, monkeypatch, env)  # never released: the model is never built
    try:
        wait_until(lambda: described(clip).get("model") == "ViT-B-32", 180, what="clip describing its start")
        with FunctionProcess("index", tmp_path / "index", {"CLIP_URL": clip.url}) as index:
            status = requests.get(index.url, params={"status": ""}, timeout=30).json()
            assert status["ready"] is False and status["starting"] is True and status["untrained"] is True
            assert "ViT-B-32" in status["message"]
            page = requests.get(index.url, timeout=30).text
            assert 'id="clip-starting"' in page and "The\n    classifier is starting." in page
            assert "It is loading the model ViT-B-32 (weights: none)." in page
            assert 'id="untrained"' in page  # the warning, before clip is ready
            assert '<meta http-equiv="refresh"' in page  # without JavaScript, the page reloads itself too
            # a classification meanwhile: clip's 503 "loading", the page with the notice above it
            answer = requests.post(index.url, files={"image": ("a.png", b"\x89PNG\r\n\x1a\n")},
                                   headers={"Accept": "text/html"}, timeout=30)
            assert answer.status_code == 503 and 'id="clip-starting"' in answer.text
    finally:
        clip.stop()


def test_page_updates_itself_once_clip_is_ready(clip_env, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright
    from support.browser import CHROMIUM, CHROMIUM_ARGS

    hold, clip = held_clip(tmp_path, monkeypatch, clip_env)
    try:
        wait_until(lambda: "model" in described(clip), 180, what="clip describing its start")
        with FunctionProcess("index", tmp_path / "index", {"CLIP_URL": clip.url}) as index, \
                sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.goto(index.url)
            expect(page.locator("#clip-starting")).to_contain_text("It is loading the model")
            assert page.locator("#label_set option").all_inner_texts() == ["the classifier's default"]
            assert page.locator("#untrained").count() == 0  # the tiny model brings its own weights
            hold.unlink()
            clip.wait_ready()
            # the page asks index every few seconds (then less often): it reloads with clip's label sets
            expect(page.locator("#clip-starting")).to_have_count(0, timeout=60_000)
            expect(page.locator("#label_set option[selected]")).to_have_text("cifar100")
            browser.close()
    finally:
        clip.stop()


def test_results_to_show_follows_clip_top_k(clip_env, tmp_path):
    with FunctionProcess("clip", tmp_path / "clip", {**clip_env, "CLIP_TOP_K": "3"}) as clip, \
            FunctionProcess("index", tmp_path / "index", {"CLIP_URL": clip.url}) as index:
        def offered():
            field = re.search(r'<input id="top_k"[^>]*>', requests.get(index.url, timeout=30).text).group(0)
            return 'value="3"' in field
        wait_until(offered, 30, what="the page offering clip's CLIP_TOP_K")
