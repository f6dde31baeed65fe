"""Helpers for the browser tests: Debian's Chromium under Playwright, a controllable stand-in for
clip, axe-core, and pictures that look like something in a screenshot."""
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from PIL import Image, ImageDraw

from support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Fresh profile per launch (Playwright makes a temporary user-data-dir), and nothing phoning home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = ROOT / "test-artifacts"


def picture(size=(480, 320), fmt="PNG"):
    """A small landscape (sky, sun, hills): a friendlier preview in screenshots than noise."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(90 + 100 * t), int(150 + 70 * t), int(230 - 20 * t)))
    draw.ellipse([width * 0.68, height * 0.12, width * 0.82, height * 0.12 + width * 0.14], fill=(255, 214, 90))
    draw.polygon([(0, height), (0, height * 0.7), (width * 0.3, height * 0.52), (width * 0.62, height * 0.72),
                  (width, height * 0.58), (width, height)], fill=(70, 140, 80))
    draw.polygon([(0, height), (0, height * 0.86), (width * 0.45, height * 0.74), (width, height * 0.9),
                  (width, height)], fill=(50, 110, 60))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def run_axe(page):
    """axe-core's WCAG checks on the page as it is now; returns the serious and critical violations."""
    if not AXE.exists():
        raise RuntimeError(f"{AXE} is missing: run scripts/setup --browser (npm ci installs axe-core)")
    if not page.evaluate("() => typeof window.axe === 'object'"):
        page.add_script_tag(path=str(AXE))
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.map(n => n.target.join(' ') + ': ' + n.failureSummary)}));
    }""")
    return [v for v in result if v["impact"] in ("serious", "critical")]


class FakeClip:
    """A stand-in for clip that a test controls: down (nothing listening), "slow" (answers after
    `delay_s`), "gateway_502" (a gateway's plain-text 502), "proxy" (forwards to the real clip) or
    "untrained" (forwards, and says the weights are random, as CLIP_PRETRAINED=none does)."""

    def __init__(self, upstream, delay_s=5.0):
        self.upstream = upstream
        self.delay_s = delay_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/function/clip"
        self.mode = "proxy"
        self.server = None
        self.thread = None
        self.released = threading.Event()
        self.requests = 0

    def up(self, mode):
        self.mode = mode
        if self.server is None:
            self.released.clear()
            self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
            self.server.daemon_threads = True
            self.server.block_on_close = False
            self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
            self.thread.start()
        return self

    def down(self):
        if self.server is not None:
            self.released.set()  # wake slow answers so nothing lingers
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(10)
            self.server = None
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the caller gave up waiting, as it should

            def _forward(self, method):
                fake.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if fake.mode == "slow":
                    fake.released.wait(fake.delay_s)
                if fake.mode == "gateway_502":
                    return self._send(502, b"Bad Gateway", "text/plain")
                query = self.path.partition("?")[2]
                upstream = fake.upstream + (f"?{query}" if query else "")
                headers = {"Content-Type": self.headers.get("Content-Type", "application/octet-stream")}
                try:
                    response = requests.request(method, upstream, data=body, headers=headers, timeout=30)
                except requests.RequestException:
                    return self._send(502, b"Bad Gateway", "text/plain")
                answer = response.json()
                if fake.mode == "untrained":
                    answer.update(pretrained="none", untrained=True)
                    if method == "POST":
                        answer["warning"] = ("Random, untrained weights (CLIP_PRETRAINED=none): "
                                             "predictions are meaningless.")
                self._send(response.status_code, answer)

            def do_GET(self):
                self._forward("GET")

            def do_POST(self):
                self._forward("POST")

        return Handler
