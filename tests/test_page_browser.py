"""The page as a person uses it: Debian's Chromium driven by Playwright, against the real local stack
(gateway + index + clip on the tiny model). Screenshots go to test-artifacts/ (git-ignored); with
UPDATE_SCREENSHOTS=1 they are also copied to docs/ for the README."""
import io
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # never fetch a browser of its own

from playwright.sync_api import expect, sync_playwright  # noqa: E402
from support.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, ROOT, FakeClip, picture, run_axe  # noqa: E402
from support.images import noise_image  # noqa: E402
from support.servers import FunctionProcess, free_port  # noqa: E402

WAIT_MS = 20_000          # bound on every wait for the page (a classification takes well under a second)
DESKTOP = {"width": 1280, "height": 900}
MOBILE = {"width": 375, "height": 760}
SCREENSHOTS = ("desktop", "mobile", "result", "error", "batch", "dark", "address", "phone")
PCT = re.compile(r"^\d{1,3}\.\d%$")

expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module", autouse=True)
def screenshots_to_docs():
    ARTIFACTS.mkdir(exist_ok=True)
    yield
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        for name in SCREENSHOTS:
            shot = ARTIFACTS / f"screenshot-{name}.png"
            if shot.exists():
                shutil.copyfile(shot, ROOT / "docs" / shot.name)


def shoot(page, name, full_page=True):
    page.evaluate("() => document.activeElement && document.activeElement.blur()")  # as a person would see it
    page.screenshot(path=str(ARTIFACTS / f"screenshot-{name}.png"), full_page=full_page)


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup --browser installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class Visit:
    """One browser context on one page, recording what a person would not see: JavaScript errors,
    console errors, and every request (those to other hosts are refused, and recorded)."""

    def __init__(self, browser, base, viewport=DESKTOP, javascript=True, **options):
        self.host = urlparse(base).netloc
        self.context = browser.new_context(viewport=viewport, java_script_enabled=javascript, **options)
        self.context.route(re.compile(r"^https?://"), self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.requests, self.foreign, self.js_errors, self.console_errors = [], [], [], []
        self.page.on("pageerror", lambda error: self.js_errors.append(str(error)))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.posts = []  # the size of every POST body the page sent
        self.page.on("request", lambda r: r.method == "POST" and self.posts.append(len(r.post_data_buffer or b"")))
        # Listening from the start: file-chooser interception is then on before any key is pressed.
        self.choosers = []
        self.page.on("filechooser", lambda chooser: self.choosers.append(chooser))

    def file_chooser(self, key):
        """Press `key` on the focused element; return the file chooser it opened."""
        self.choosers.clear()
        self.page.keyboard.press(key)
        for _ in range(WAIT_MS // 50):
            if self.choosers:
                return self.choosers.pop()
            self.page.wait_for_timeout(50)
        raise AssertionError(f"{key} opened no file chooser")

    def _route(self, route):
        if urlparse(route.request.url).netloc == self.host:
            route.continue_()
        else:
            self.foreign.append(route.request.url)
            route.abort()

    def close(self):
        self.context.close()


@pytest.fixture
def visit(browser):
    opened = []

    def open_(base, path="", **kwargs):
        v = Visit(browser, base, **kwargs)
        opened.append(v)
        v.page.goto(base + path)
        return v
    yield open_
    for v in opened:
        v.close()


def choose(page, data, name="picture.png", mime="image/png"):
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def card(page, n=0):
    """The n-th picture's card in the results grid."""
    return page.locator("#cards > li.result").nth(n)


def rows(page, n=0):
    """The results as shown on card n: label, percent text, bar width in % of its track, bar height, per row."""
    return card(page, n).locator(".results li").evaluate_all("""items => items.map(li => {
        const bar = li.querySelector('.bar'), fill = li.querySelector('.bar > span');
        return [li.querySelector('.label').textContent, li.querySelector('.pct').textContent,
                bar && fill ? 100 * fill.getBoundingClientRect().width / bar.getBoundingClientRect().width : null,
                bar ? bar.getBoundingClientRect().height : 0];
    })""")


def assert_results(page, expected, n=0):
    """Rows shown on card n = clip's own answer: same labels in the same (sorted) order, percentages, bars."""
    expect(card(page, n).locator(".results .label")).to_have_text([p["label"] for p in expected["predictions"]])
    shown = rows(page, n)
    assert [label for label, *_ in shown] == [p["label"] for p in expected["predictions"]]
    for (_, pct, width, height), p in zip(shown, expected["predictions"]):
        assert PCT.match(pct), pct
        assert float(pct[:-1]) == pytest.approx(p["score"] * 100, abs=0.051)
        assert height > 0 and width == pytest.approx(p["score"] * 100, abs=1.0)
    percents = [float(pct[:-1]) for _, pct, *_ in shown]
    assert percents == sorted(percents, reverse=True)


def clip_answer(stack, data, **params):
    response = requests.post(stack.url + "/function/clip", data=data, params=params, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def no_results(page):
    expect(page.locator("#cards .results li")).to_have_count(0)


def spinning(page):
    return page.locator("#status .spinner").count() > 0


# 1 ------------------------------------------------------------------------------------------------
def test_page_loads_only_from_its_own_host_without_errors(stack, visit):
    v = visit(stack.url, "/function/index")
    page = v.page
    page.wait_for_load_state("networkidle")
    expect(page.locator("h1")).to_have_text("What's in this picture?")
    expect(page.locator("#file")).to_be_visible()
    expect(page.locator("#camera")).to_be_hidden()  # a mouse: no camera path
    expect(page.locator("#camera-button")).to_be_hidden()
    expect(page.locator("#shrink")).to_be_checked()  # shrinking is on by default, and visible
    assert page.locator("#url").count() == 0  # clip's URL input is off by default: no address field
    assert page.locator("#label_set option").all_inner_texts() == list(
        requests.get(stack.url + "/function/clip", timeout=10).json()["label_sets"])
    assert v.requests and all(urlparse(url).netloc == v.host for url in v.requests if url.startswith("http")), \
        v.requests
    assert not v.foreign, v.foreign
    assert v.js_errors == [] and v.console_errors == []
    assert run_axe(page) == []
    shoot(page, "desktop")


# 2 ------------------------------------------------------------------------------------------------
def test_picker_shows_preview_then_sorted_results(stack, visit):
    data = picture()
    expected = clip_answer(stack, data, top_k=3)
    page = visit(stack.url, "/function/index").page
    page.fill("#top_k", "3")
    choose(page, data)
    expect(card(page).locator(".thumb")).to_be_visible()
    page.wait_for_function("() => document.querySelector('#cards .thumb').naturalWidth === 480")
    assert_results(page, expected)
    expect(card(page).locator(".name")).to_have_text("picture.png")
    expect(card(page).locator(".sent")).to_have_text(re.compile(r"^Sent \d+ KB · 480×320$"))
    expect(page.locator("#status")).to_have_text(f"Done. Most likely: {expected['predictions'][0]['label']}, "
                                                 f"{expected['predictions'][0]['score'] * 100:.1f}%.")
    assert page.locator("#status .sr-only").bounding_box()["width"] <= 1  # that part is for screen readers
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#another")).to_be_visible()
    assert run_axe(page) == []
    shoot(page, "result")


# 3 ------------------------------------------------------------------------------------------------
def test_drag_and_drop_classifies_like_the_picker(stack, visit):
    data = noise_image("PNG", size=(80, 60), seed=31)
    expected = clip_answer(stack, data)
    v = visit(stack.url, "/function/index")
    page = v.page
    zone = page.locator("#drop")
    page.evaluate("""bytes => {
        const file = new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'});
        window.__transfer = new DataTransfer();
        window.__transfer.items.add(file);
    }""", list(data))
    transfer = page.evaluate_handle("() => window.__transfer")
    zone.dispatch_event("dragenter", {"dataTransfer": transfer})
    zone.dispatch_event("dragover", {"dataTransfer": transfer})
    expect(zone).to_have_class(re.compile(r"\bover\b"))  # the drop zone shows it will take the file
    zone.dispatch_event("drop", {"dataTransfer": transfer})
    expect(zone).not_to_have_class(re.compile(r"\bover\b"))
    expect(card(page).locator(".thumb")).to_be_visible()
    assert_results(page, expected)
    # The dropped file is now the chosen one: "Classify" again (new options) uses it.
    assert page.evaluate("() => document.getElementById('file').files[0].name") == "dropped.png"
    page.fill("#top_k", "2")
    page.click("#submit")
    assert_results(page, clip_answer(stack, data, top_k=2))

    # A file dropped anywhere on the page is taken too (the browser does not leave the page to show it).
    other = noise_image("PNG", size=(80, 60), seed=39)
    page.evaluate("""bytes => {
        window.__transfer = new DataTransfer();
        window.__transfer.items.add(new File([new Uint8Array(bytes)], 'elsewhere.png', {type: 'image/png'}));
    }""", list(other))
    page.locator("h1").dispatch_event("drop", {"dataTransfer": page.evaluate_handle("() => window.__transfer")})
    assert_results(page, clip_answer(stack, other, top_k=2))
    assert page.url.endswith("/function/index")
    assert v.js_errors == []


# 4 ------------------------------------------------------------------------------------------------
def test_broken_file_shows_a_readable_error_then_another_file_works(stack, visit):
    v = visit(stack.url, "/function/index")
    page = v.page
    page.evaluate("() => { window.__samePage = true; }")
    page.click("#submit")  # nothing chosen yet
    expect(page.locator("#error")).to_contain_text("Choose a picture first")
    choose(page, b"this is not a picture at all", name="broken.png")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("not an image")
    text = error.inner_text()
    assert "{" not in text and "Traceback" not in text and len(text) < 300
    no_results(page)
    assert not spinning(page)
    expect(page.locator("#cards img")).to_have_count(0)  # no broken-image icon
    assert run_axe(page) == []
    shoot(page, "error")

    data = noise_image("JPEG", seed=32)
    expected = clip_answer(stack, data)
    choose(page, data, name="good.jpg", mime="image/jpeg")
    assert_results(page, expected)
    expect(error).to_be_hidden()
    assert page.evaluate("() => window.__samePage") is True  # no reload
    assert v.js_errors == []


# 5 ------------------------------------------------------------------------------------------------
def test_clip_down_or_slow_gives_an_error_and_the_page_recovers(stack, visit, tmp_path):
    data = noise_image("PNG", seed=33)
    expected = clip_answer(stack, data)
    with FakeClip(stack.url + "/function/clip", delay_s=6) as clip, \
            FunctionProcess("index", tmp_path, {"CLIP_URL": clip.url, "CLIP_TIMEOUT_S": "2",
                                                "CLIP_CONNECT_TIMEOUT_S": "2"}) as index:
        v = visit(index.url, "/")
        page = v.page
        error = page.locator("#error")

        # Down: nothing listens where clip should be.
        choose(page, data)
        expect(error).to_be_visible()
        expect(error).to_contain_text("could not be reached")
        assert not spinning(page)

        # Slow: answers only after the index's 2 s timeout. The spinner shows, then stops.
        clip.up("slow")
        page.click("#submit")
        expect(page.locator("#status .spinner")).to_be_visible()
        expect(error).to_be_hidden()
        expect(error).to_contain_text("did not answer within 2 s")
        expect(error).to_be_visible()
        assert not spinning(page)

        # A gateway in front of a scaled-down clip: plain-text 502.
        clip.mode = "gateway_502"
        page.click("#submit")
        expect(error).to_contain_text("not available right now")
        assert not spinning(page)

        # Back: the same page, no reload, classifies again.
        clip.mode = "proxy"
        page.click("#submit")
        assert_results(page, expected)
        expect(error).to_be_hidden()

        # A new picture while an answer is slow to come: the new one wins, the old one is dropped.
        clip.mode = "slow"
        choose(page, noise_image("PNG", seed=38), name="first.png")
        expect(page.locator("#status .spinner")).to_be_visible()
        clip.mode = "proxy"
        choose(page, data, name="second.png")
        assert_results(page, expected)
        expect(error).to_be_hidden()
        assert v.js_errors == []


# 6 ------------------------------------------------------------------------------------------------
def test_custom_labels_are_used_and_html_in_them_stays_text(stack, visit):
    labels = ["cat", "<b>dog</b>", "<img src=x onerror=window.__xss=1>"]
    data = noise_image("PNG", seed=34)
    expected = clip_answer(stack, data, labels=",".join(labels))
    v = visit(stack.url, "/function/index")
    page = v.page
    page.get_by_label(re.compile("own labels", re.I)).fill(", ".join(labels))
    choose(page, data)
    assert_results(page, expected)
    assert sorted(label for label, *_ in rows(page)) == sorted(labels)
    assert page.locator("#cards .results b, #cards .results img").count() == 0
    assert page.evaluate("() => window.__xss") is None
    assert "custom" in page.locator("#meta").inner_text()
    assert v.js_errors == []


# 7 ------------------------------------------------------------------------------------------------
FOCUS_STATE = """() => {
    const el = document.activeElement, style = getComputedStyle(el);
    return {id: el.id || el.tagName, visible: style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) >= 2};
}"""


def tab_to(page, element_id, limit=12):
    """Press Tab until element_id has the focus; every stop on the way must show where focus is."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        state = page.evaluate(FOCUS_STATE)
        if state["id"] != "BODY":
            assert state["visible"], f"no visible focus on #{state['id']}"
        if state["id"] == element_id:
            return
    raise AssertionError(f"#{element_id} not reached with Tab")


def test_keyboard_only(stack, visit):
    data = noise_image("PNG", seed=35)
    expected = clip_answer(stack, data)
    v = visit(stack.url, "/function/index")
    page = v.page
    tab_to(page, "file")
    v.file_chooser("Space").set_files(files=[{"name": "keys.png", "mimeType": "image/png", "buffer": data}])
    assert_results(page, expected)

    tab_to(page, "another")
    page.keyboard.press("Enter")
    no_results(page)
    expect(page.locator("#cards li")).to_have_count(0)
    expect(page.locator("#another")).to_be_hidden()
    assert page.evaluate("() => document.activeElement.id") == "file"
    assert page.evaluate(FOCUS_STATE)["visible"]

    # Options and the Classify button work from the keyboard too.
    v.file_chooser("Enter").set_files(files=[{"name": "keys.png", "mimeType": "image/png", "buffer": data}])
    assert_results(page, expected)
    tab_to(page, "top_k")
    page.keyboard.press("Control+A")
    page.keyboard.type("2")
    tab_to(page, "shrink")
    page.keyboard.press("Space")  # the shrink option is a plain, labelled checkbox
    expect(page.locator("#shrink")).not_to_be_checked()
    tab_to(page, "submit")
    page.keyboard.press("Enter")
    assert_results(page, clip_answer(stack, data, top_k=2))


# 8 ------------------------------------------------------------------------------------------------
OVERFLOW = """() => {
    const width = document.documentElement.clientWidth, out = [];
    for (const el of document.querySelectorAll('body *')) {
        const r = el.getBoundingClientRect();
        if (r.width && (r.right > width + 0.5 || r.left < -0.5))
            out.push(el.tagName + '#' + el.id + '.' + el.className);
    }
    return {scroll: document.documentElement.scrollWidth, width, out};
}"""


def test_narrow_and_wide_layouts(stack, visit):
    v = visit(stack.url, "/function/index", viewport=MOBILE)
    page = v.page
    layout = page.evaluate(OVERFLOW)
    assert layout["scroll"] <= MOBILE["width"] and layout["out"] == [], layout
    choose(page, picture())
    expect(card(page).locator(".results li")).to_have_count(5)
    expect(page.locator("#results-title")).to_be_in_viewport()  # brought into view below the form
    page.wait_for_function("() => document.querySelector('#cards .thumb').naturalWidth > 0")
    layout = page.evaluate(OVERFLOW)
    assert layout["scroll"] <= MOBILE["width"] and layout["out"] == [], layout
    assert run_axe(page) == []
    shoot(page, "mobile")

    # Long labels, with and without spaces, wrap instead of widening the page.
    page.fill("#labels", "a label far too long to fit on a phone screen in one line,"
                         "averyveryverylongwordwithoutanyspacesinit,ok")
    page.click("#submit")
    expect(card(page).locator(".results li")).to_have_count(3)
    layout = page.evaluate(OVERFLOW)
    assert layout["scroll"] <= MOBILE["width"] and layout["out"] == [], layout

    page.set_viewport_size(DESKTOP)
    cards = page.locator("section.card")
    upload, results = cards.nth(0).bounding_box(), cards.nth(1).bounding_box()
    assert upload["width"] + results["width"] >= 0.7 * DESKTOP["width"]     # the width is used...
    assert results["width"] > upload["width"]                              # most of it for the results
    assert results["x"] >= upload["x"] + upload["width"] and abs(results["y"] - upload["y"]) < 2  # ...side by side
    assert page.evaluate(OVERFLOW)["out"] == []


# 9 ------------------------------------------------------------------------------------------------
def test_without_javascript_the_form_posts_and_shows_scores(stack, visit):
    data = noise_image("PNG", seed=36)
    expected = clip_answer(stack, data, top_k=3, labels="<i>cat</i>,dog,teapot,bicycle")
    v = visit(stack.url, "/function/index", javascript=False)
    page = v.page
    choose(page, data)
    page.fill("#labels", "<i>cat</i>, dog, teapot, bicycle")
    page.fill("#top_k", "3")
    with page.expect_navigation():
        page.click("#submit")
    assert page.url.rstrip("/").endswith("/function/index")
    assert_results(page, expected)
    assert page.locator("#cards i").count() == 0
    expect(card(page).locator(".thumb")).to_be_visible()  # the picture sent, echoed as a data: URL
    assert card(page).locator(".thumb").evaluate("img => img.complete && img.naturalWidth") == 96
    expect(page.locator("#labels")).to_have_value("<i>cat</i>, dog, teapot, bicycle")  # the form is refilled
    shoot(page, "nojs-result")  # kept in test-artifacts/ only
    another = page.locator("#another-link")
    expect(another).to_be_visible()
    with page.expect_navigation():
        another.click()
    no_results(page)
    assert not v.foreign


# 10 -----------------------------------------------------------------------------------------------
def test_untrained_weights_warning(stack, visit, tmp_path):
    with FakeClip(stack.url + "/function/clip") as clip, \
            FunctionProcess("index", tmp_path, {"CLIP_URL": clip.up("untrained").url}) as index:
        page = visit(index.url, "/").page
        warning = page.locator("#untrained")
        expect(warning).to_be_visible()
        expect(warning).to_contain_text("Untrained weights")
        expect(warning).to_contain_text("CLIP_PRETRAINED=none")
        assert run_axe(page) == []
        shoot(page, "untrained")  # kept in test-artifacts/ only
        choose(page, noise_image("PNG", seed=37))
        expect(card(page).locator(".results li")).to_have_count(5)
        expect(page.locator(".warning")).to_have_count(1)
        expect(warning).to_be_visible()


# 11 -----------------------------------------------------------------------------------------------
def pictures_form(parts, **options):
    """What a browser posts for several pictures: one multipart body, one `image` part each."""
    files = [("image", (name, data, "application/octet-stream")) for name, data in parts]
    return requests.Request("POST", "http://x/", files=files, data=options).prepare()


def clip_batch(stack, parts, **options):
    prepared = pictures_form(parts, **options)
    response = requests.post(stack.url + "/function/clip", data=prepared.body, timeout=60,
                             headers={"Content-Type": prepared.headers["Content-Type"]})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def over_pixel_limit():
    """A tiny file that says 8,000 × 6,400 pixels: over clip's default 50 MP."""
    buffer = io.BytesIO()
    Image.new("1", (8000, 6400)).save(buffer, "PNG")
    return buffer.getvalue()


def test_several_pictures_one_request_errors_in_place(stack, visit, tmp_path):
    good, portrait, broken, huge = picture(), picture((240, 360)), b"this is not a picture at all", over_pixel_limit()
    heavy = noise_image("PNG", size=(1000, 800), seed=40)  # 2.3 MB: over this index's 2 MB request limit
    expected = clip_batch(stack, [("good.png", good), ("portrait.png", portrait), ("broken.png", broken),
                                  ("huge.png", huge)], top_k="3")
    with FunctionProcess("index", tmp_path, {"CLIP_URL": stack.url + "/function/clip",
                                             "MAX_BODY_BYTES": str(2 * 1024 * 1024)}) as index:
        v = visit(index.url, "/")
        page = v.page
        page.fill("#top_k", "3")
        page.uncheck("#shrink")  # sent as they are, so clip itself refuses the 51 MP one
        page.set_input_files("#file", files=[
            {"name": name, "mimeType": "image/png", "buffer": data}
            for name, data in (("good.png", good), ("portrait.png", portrait), ("broken.png", broken),
                               ("huge.png", huge), ("heavy.png", heavy))])
        expect(page.locator("#status")).to_have_text(re.compile(r"^Done: 2 of 5 pictures classified\."))
        expect(page.locator("#cards > li .name")).to_have_text(
            ["good.png", "portrait.png", "broken.png", "huge.png", "heavy.png"])
        assert_results(page, {"predictions": expected[0]["predictions"]}, 0)
        assert_results(page, {"predictions": expected[1]["predictions"]}, 1)
        for n in (2, 3):  # clip's own message for each refused picture, on its card
            expect(card(page, n).locator(".card-error")).to_have_text(expected[n]["error"]["message"])
            expect(card(page, n)).to_have_class(re.compile(r"\bfailed\b"))
        expect(card(page, 3).locator(".card-error")).to_contain_text("limit is 50,000,000 pixels")
        expect(card(page, 4).locator(".card-error")).to_have_text(
            f"Too large to send: {len(heavy) / 1024 / 1024:.1f} MB; at most 2.0 MB per request.")
        expect(card(page, 4).locator(".sent")).to_have_text("")
        expect(card(page, 0).locator(".sent")).to_have_text(f"Sent {round(len(good) / 1024)} KB")
        assert len(v.posts) == 1  # one batch request for all of them
        expect(page.locator("#error")).to_be_hidden()
        assert not spinning(page)
        assert run_axe(page) == []
        shoot(page, "batch")

        # Of two, only one goes out (the other is too large) and clip refuses it: both errors in place.
        page.set_input_files("#file", files=[{"name": name, "mimeType": "image/png", "buffer": data}
                                             for name, data in (("broken.png", broken), ("heavy.png", heavy))])
        expect(page.locator("#status")).to_have_text("Done: 0 of 2 pictures classified.")
        expect(page.locator("#cards > li.failed")).to_have_count(2)
        expect(card(page, 0).locator(".card-error")).to_have_text(expected[2]["error"]["message"])
        expect(page.locator("#error")).to_be_hidden()
        assert len(v.posts) == 2
        assert v.js_errors == []


def test_more_pictures_than_clip_takes(stack, visit):
    limit = requests.get(stack.url + "/function/clip", timeout=10).json()["limits"]["max_images"]
    v = visit(stack.url, "/function/index")
    page = v.page
    page.set_input_files("#file", files=[{"name": f"{i}.png", "mimeType": "image/png",
                                          "buffer": noise_image(size=(32, 32), seed=100 + i)}
                                         for i in range(limit + 2)])
    expect(page.locator("#status")).to_have_text(re.compile(
        f"^Only the first {limit} of {limit + 2} pictures were taken \\(the limit per request\\)\\. "
        f"Done: {limit} of {limit} pictures classified\\. 0.png: .+, [0-9.]+%\\."))
    expect(page.locator("#cards > li")).to_have_count(limit)
    expect(page.locator("#cards > li.failed")).to_have_count(0)
    assert len(v.posts) == 1


# 12 -----------------------------------------------------------------------------------------------
PASTE = """([bytes, type, text]) => {
    const transfer = new DataTransfer();
    if (bytes) transfer.items.add(new File([new Uint8Array(bytes)], 'image.png', {type}));
    if (text) transfer.setData('text/plain', text);
    const target = document.activeElement || document.body;
    const event = new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true});
    return target.dispatchEvent(event);
}"""


def test_paste_a_picture_from_the_clipboard(stack, visit):
    data = noise_image("PNG", seed=41)
    expected = clip_answer(stack, data)
    v = visit(stack.url, "/function/index")
    page = v.page
    page.focus("#labels")
    assert page.evaluate(PASTE, [None, "", "cat, dog"]) is True  # text: left to the field, not taken
    assert v.posts == [] and page.locator("#cards > li").count() == 0
    page.evaluate("() => document.activeElement.blur()")
    assert page.evaluate(PASTE, [list(data), "image/png", ""]) is False  # a picture: taken (default prevented)
    assert_results(page, expected)
    expect(card(page).locator(".name")).to_have_text("Pasted picture.png")
    expect(card(page).locator(".thumb")).to_be_visible()
    assert run_axe(page) == []
    assert v.js_errors == []


# 13 -----------------------------------------------------------------------------------------------
def test_phone_camera_path(stack, visit):
    data = noise_image("JPEG", seed=42)
    expected = clip_answer(stack, data)
    v = visit(stack.url, "/function/index", viewport=MOBILE, is_mobile=True, has_touch=True)
    page = v.page
    camera = page.get_by_role("button", name="Take a photo")
    expect(camera).to_be_visible()
    with page.expect_file_chooser() as chooser:
        camera.click()
    opened = chooser.value.element  # the camera input: capture offered, pictures only
    assert opened.get_attribute("capture") == "environment" and opened.get_attribute("accept") == "image/*"
    assert opened.get_attribute("id") == "camera" and not chooser.value.is_multiple()
    chooser.value.set_files(files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": data}])
    assert_results(page, expected)
    # A batch on a 375 px phone: one column of cards, nothing wider than the screen.
    page.set_input_files("#file", files=[{"name": f"holiday-photo-number-{i}.png", "mimeType": "image/png",
                                          "buffer": picture()} for i in range(3)])
    expect(page.locator("#cards > li .results li")).to_have_count(15)
    layout = page.evaluate(OVERFLOW)
    assert layout["scroll"] <= MOBILE["width"] and layout["out"] == [], layout
    assert run_axe(page) == []
    expect(camera).to_be_visible()
    page.evaluate("() => window.scrollTo(0, 0)")
    shoot(page, "phone", full_page=False)  # a full-page capture drops the touch emulation
    assert v.js_errors == []


# 14 -----------------------------------------------------------------------------------------------
class AddressClip:
    """A stand-in for a clip with URL input on, fetching from a public host this machine cannot
    reach: it records what index forwards and answers as the real clip does for `picture`."""

    def __init__(self, upstream, picture_bytes):
        self.upstream, self.picture, self.bodies = upstream, picture_bytes, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {**requests.get(fake.upstream, timeout=10).json(), "url_input": True})

            def do_POST(self):
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append((self.headers["Content-Type"], doc))
                options = {k: doc[k] for k in ("top_k", "labels", "label_set") if k in doc}
                answer = requests.post(fake.upstream, data=fake.picture, params=options, timeout=30)
                self._send(answer.status_code, answer.json())

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/function/clip"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_by_address_when_clip_allows_it(stack, visit, tmp_path):
    data = picture()
    expected = clip_answer(stack, data, top_k=3)
    clip = AddressClip(stack.url + "/function/clip", data)
    try:
        with FunctionProcess("index", tmp_path, {"CLIP_URL": clip.url}) as index:
            v = visit(index.url, "/")
            page = v.page
            field = page.get_by_label(re.compile("web address"))
            expect(field).to_be_visible()
            page.fill("#top_k", "3")
            field.fill("https://images.example/holiday/landscape.png")
            page.click("#url-submit")
            assert_results(page, expected)
            expect(card(page).locator(".name")).to_have_text("https://images.example/holiday/landscape.png")
            expect(card(page).locator(".thumb")).to_be_hidden()  # nothing is loaded from the other host
            assert clip.bodies == [("application/json", {"url": "https://images.example/holiday/landscape.png",
                                                         "labels": "", "label_set": "cifar100", "top_k": "3"})]
            assert not v.foreign
            assert run_axe(page) == []
            shoot(page, "address")

            field.fill("not an address")  # the browser's own check, before anything is sent
            field.press("Enter")
            expect(page.locator("#error")).to_have_text(
                "That is not a web address: it starts with https:// or http://.")
            assert len(clip.bodies) == 1
    finally:
        clip.close()


def test_by_address_refusals_are_clip_s_clear_messages(visit, clip_env, tmp_path):
    env = {**clip_env, "CLIP_URL_ALLOW_HOSTS": "images.example"}
    with FunctionProcess("clip", tmp_path / "clip", env) as clip, \
            FunctionProcess("index", tmp_path / "index", {"CLIP_URL": clip.url}) as index:
        v = visit(index.url, "/")
        page = v.page
        error = page.locator("#error")
        for address in ("http://127.0.0.1/cat.png", "https://elsewhere.example/cat.png", "ftp://images.example/a.png"):
            said = requests.post(clip.url, json={"url": address}, timeout=30).json()["error"]["message"]
            page.fill("#url", address)
            page.click("#url-submit")
            expect(error).to_have_text(said)
            text = error.inner_text()
            assert "{" not in text and "Traceback" not in text and len(text) < 300
            expect(page.locator("#cards > li")).to_have_count(0)
            assert not spinning(page)
        assert run_axe(page) == []
        assert v.js_errors == []


# 15 -----------------------------------------------------------------------------------------------
def twelve_megapixel_photo():
    """A 4,000 × 3,000 JPEG of 3.8 MB, as a phone's photo is: a scene, detail that survives shrinking
    to 1,024 px (so the shrunk JPEG is not trivially small), and sensor grain."""
    scene = np.asarray(Image.open(io.BytesIO(picture((4000, 3000)))), dtype=np.float32)
    rng = np.random.default_rng(7)
    detail = Image.fromarray(np.clip(rng.normal(128, 12, (750, 1000, 3)), 0, 255).astype(np.uint8))
    scene += np.asarray(detail.resize((4000, 3000), Image.BILINEAR), dtype=np.float32) - 128
    scene += rng.normal(0, 6, scene.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def test_big_photo_is_shrunk_before_upload_with_progress(stack, visit):
    photo = twelve_megapixel_photo()
    full = clip_answer(stack, photo, top_k=3)
    v = visit(stack.url, "/function/index")
    page = v.page
    page.fill("#top_k", "3")

    # Full size, over a slow link (1 MB/s up): the progress bar moves, then the answer.
    page.uncheck("#shrink")
    cdp = v.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 1_000_000})
    choose(page, photo, name="photo.jpg", mime="image/jpeg")
    page.wait_for_function("""() => { const p = document.getElementById('progress');
                                      return !p.hidden && p.value > 0 && p.value < 100; }""")
    assert run_axe(page) == []  # the progress bar is named
    assert_results(page, full)
    expect(page.locator("#progress")).to_be_hidden()
    assert v.posts[-1] > len(photo) > 2_000_000
    expect(card(page).locator(".sent")).to_have_text(f"Sent {len(photo) / 1024 / 1024:.1f} MB")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})

    # Shrunk in the browser (the default): well under 500 KB sent, and the same top label.
    page.check("#shrink")
    page.click("#submit")
    expect(card(page).locator(".sent")).to_have_text(re.compile(r"^Sent \d+ KB · 1024×768, shrunk from 4000×3000$"))
    expect(card(page).locator(".results li")).to_have_count(3)
    sent = v.posts[-1]
    print(f"12 MP photo: {len(photo)} bytes at full size; {sent} bytes sent shrunk")
    assert sent < 500_000
    shown = rows(page)
    print("full size:", [(p["label"], p["score"]) for p in full["predictions"]], "shrunk:", shown)
    assert shown[0][0] == full["predictions"][0]["label"]  # the same top label...
    # ...and, as the tiny test model puts most pictures' top label first, the same runners-up too.
    assert [label for label, *_ in shown] == [p["label"] for p in full["predictions"]]
    shown_kb = int(re.search(r"Sent (\d+) KB", card(page).locator(".sent").inner_text()).group(1))
    assert abs(shown_kb * 1024 - sent) < 4096  # the card tells the size that was sent
    assert v.js_errors == []


# 16 -----------------------------------------------------------------------------------------------
def test_dark_mode_follows_the_system(stack, visit):
    v = visit(stack.url, "/function/index", color_scheme="dark")
    page = v.page
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)", background
    choose(page, picture())
    expect(card(page).locator(".results li")).to_have_count(5)
    page.set_input_files("#file", files=[{"name": "landscape.png", "mimeType": "image/png", "buffer": picture()},
                                         {"name": "broken.png", "mimeType": "image/png", "buffer": b"nope"}])
    expect(page.locator("#cards > li.failed")).to_have_count(1)
    assert run_axe(page) == []  # contrast holds in dark colours too
    shoot(page, "dark")


# 17 -----------------------------------------------------------------------------------------------
def test_without_javascript_several_pictures_make_a_grid(stack, visit):
    parts = [("first.png", picture()), ("broken.png", b"not a picture"), ("second.png", noise_image(seed=43))]
    expected = clip_batch(stack, parts, top_k="5", labels="", label_set="cifar100")
    v = visit(stack.url, "/function/index", javascript=False)
    page = v.page
    expect(page.locator("#shrink-option")).to_be_hidden()  # shrinking needs JavaScript
    page.set_input_files("#file", files=[{"name": n, "mimeType": "image/png", "buffer": d} for n, d in parts])
    with page.expect_navigation():
        page.click("#submit")
    expect(page.locator("#cards > li .name")).to_have_text([n for n, _ in parts])
    assert_results(page, expected[0], 0)
    assert_results(page, expected[2], 2)
    expect(card(page, 1).locator(".card-error")).to_have_text(expected[1]["error"]["message"])
    expect(page.locator("#status")).to_have_text("Done: 2 of 3 pictures classified.")
    for n in (0, 2):
        assert card(page, n).locator(".thumb").evaluate("img => img.complete && img.naturalWidth") > 0
    shoot(page, "nojs-batch")  # kept in test-artifacts/ only
    assert not v.foreign
    # axe needs JavaScript: it checks the same markup, scripts removed, in a page that runs it.
    markup = re.sub(r"<script>.*?</script>", "", page.content(), flags=re.S)
    checker = visit(stack.url, "/function/index").page
    checker.set_content(markup)
    expect(checker.locator("#cards > li")).to_have_count(3)
    assert run_axe(checker) == []
