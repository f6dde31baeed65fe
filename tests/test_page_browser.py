"""The page as a person uses it: Debian's Chromium driven by Playwright, against the real local stack
(gateway + index + clip on the tiny model). Screenshots go to test-artifacts/ (git-ignored); with
UPDATE_SCREENSHOTS=1 they are also copied to docs/ for the README."""
import os
import re
import shutil
from urllib.parse import urlparse

import pytest
import requests

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")  # never fetch a browser of its own

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from support.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, ROOT, FakeClip, picture, run_axe  # noqa: E402
from support.images import noise_image  # noqa: E402
from support.servers import FunctionProcess  # noqa: E402

WAIT_MS = 20_000          # bound on every wait for the page (a classification takes well under a second)
DESKTOP = {"width": 1280, "height": 900}
MOBILE = {"width": 375, "height": 760}
SCREENSHOTS = ("desktop", "mobile", "result", "error")
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

    def __init__(self, browser, base, viewport=DESKTOP, javascript=True):
        self.host = urlparse(base).netloc
        self.context = browser.new_context(viewport=viewport, java_script_enabled=javascript)
        self.context.route(re.compile(r"^https?://"), self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.requests, self.foreign, self.js_errors, self.console_errors = [], [], [], []
        self.page.on("pageerror", lambda error: self.js_errors.append(str(error)))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("request", lambda r: self.requests.append(r.url))
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


def rows(page):
    """The results as shown: label, percent text, bar width in % of its track, bar height, per row."""
    return page.eval_on_selector_all("#results li", """items => items.map(li => {
        const bar = li.querySelector('.bar'), fill = li.querySelector('.bar > span');
        return [li.querySelector('.label').textContent, li.querySelector('.pct').textContent,
                bar && fill ? 100 * fill.getBoundingClientRect().width / bar.getBoundingClientRect().width : null,
                bar ? bar.getBoundingClientRect().height : 0];
    })""")


def assert_results(page, expected):
    """Rows shown = clip's own answer: same labels in the same (sorted) order, percentages, bars."""
    expect(page.locator("#results .label")).to_have_text([p["label"] for p in expected["predictions"]])
    shown = rows(page)
    assert [label for label, *_ in shown] == [p["label"] for p in expected["predictions"]]
    for (label, pct, width, height), p in zip(shown, expected["predictions"]):
        assert PCT.match(pct), pct
        assert float(pct[:-1]) == pytest.approx(p["score"] * 100, abs=0.051)
        assert height > 0 and width == pytest.approx(p["score"] * 100, abs=1.0)
    percents = [float(pct[:-1]) for _, pct, *_ in shown]
    assert percents == sorted(percents, reverse=True)


def clip_answer(stack, data, **params):
    response = requests.post(stack.url + "/function/clip", data=data, params=params, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def spinning(page):
    return page.locator("#status .spinner").count() > 0


# 1 ------------------------------------------------------------------------------------------------
def test_page_loads_only_from_its_own_host_without_errors(stack, visit):
    v = visit(stack.url, "/function/index")
    page = v.page
    page.wait_for_load_state("networkidle")
    expect(page.locator("h1")).to_have_text("What's in this picture?")
    expect(page.locator("#file")).to_be_visible()
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
    expect(page.locator("#preview")).to_be_visible()
    page.wait_for_function("() => document.getElementById('preview').naturalWidth === 480")
    assert_results(page, expected)
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
    expect(page.locator("#preview")).to_be_visible()
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
    expect(page.locator("#results li")).to_have_count(0)
    assert not spinning(page)
    expect(page.locator("#preview")).to_be_hidden()  # no broken-image icon
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
    assert page.locator("#results b, #results img").count() == 0
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
    expect(page.locator("#results li")).to_have_count(0)
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator("#another")).to_be_hidden()
    assert page.evaluate("() => document.activeElement.id") == "file"
    assert page.evaluate(FOCUS_STATE)["visible"]

    # Options and the Classify button work from the keyboard too.
    v.file_chooser("Enter").set_files(files=[{"name": "keys.png", "mimeType": "image/png", "buffer": data}])
    assert_results(page, expected)
    tab_to(page, "top_k")
    page.keyboard.press("Control+A")
    page.keyboard.type("2")
    tab_to(page, "submit")
    page.keyboard.press("Enter")
    assert_results(page, clip_answer(stack, data, top_k=2))


# 8 ------------------------------------------------------------------------------------------------
OVERFLOW = """() => {
    const width = document.documentElement.clientWidth, out = [];
    for (const el of document.querySelectorAll('body *')) {
        const r = el.getBoundingClientRect();
        if (r.width && (r.right > width + 0.5 || r.left < -0.5)) out.push(el.tagName + '#' + el.id + '.' + el.className);
    }
    return {scroll: document.documentElement.scrollWidth, width, out};
}"""


def test_narrow_and_wide_layouts(stack, visit):
    v = visit(stack.url, "/function/index", viewport=MOBILE)
    page = v.page
    layout = page.evaluate(OVERFLOW)
    assert layout["scroll"] <= MOBILE["width"] and layout["out"] == [], layout
    choose(page, picture())
    expect(page.locator("#results li")).to_have_count(5)
    expect(page.locator("#results-title")).to_be_in_viewport()  # brought into view below the picture
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    layout = page.evaluate(OVERFLOW)
    assert layout["scroll"] <= MOBILE["width"] and layout["out"] == [], layout
    assert run_axe(page) == []
    shoot(page, "mobile")

    # Long labels, with and without spaces, wrap instead of widening the page.
    page.fill("#labels", "a label far too long to fit on a phone screen in one line,"
                         "averyveryverylongwordwithoutanyspacesinit,ok")
    page.click("#submit")
    expect(page.locator("#results li")).to_have_count(3)
    layout = page.evaluate(OVERFLOW)
    assert layout["scroll"] <= MOBILE["width"] and layout["out"] == [], layout

    page.set_viewport_size(DESKTOP)
    upload, results = page.locator("section.card").nth(0).bounding_box(), page.locator("section.card").nth(1).bounding_box()
    assert upload["width"] + results["width"] >= 0.7 * DESKTOP["width"]     # the width is used...
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
    assert page.locator("#results i").count() == 0
    expect(page.locator("#preview")).to_be_visible()  # the picture sent, echoed as a data: URL
    assert page.eval_on_selector("#preview", "img => img.complete && img.naturalWidth") == 96
    expect(page.locator("#labels")).to_have_value("<i>cat</i>, dog, teapot, bicycle")  # the form is refilled
    shoot(page, "nojs-result")  # kept in test-artifacts/ only
    another = page.locator("#another-link")
    expect(another).to_be_visible()
    with page.expect_navigation():
        another.click()
    expect(page.locator("#results li")).to_have_count(0)
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
        expect(page.locator("#results li")).to_have_count(5)
        expect(page.locator(".warning")).to_have_count(1)
        expect(warning).to_be_visible()
