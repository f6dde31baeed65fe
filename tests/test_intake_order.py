"""A batch is answered in the order its pictures were sent, whatever form each one took: file parts,
base64 text fields and URLs mixed in one multipart or urlencoded form, results[i] is the i-th picture's."""
import base64
import functools
import http.server
import json
import socket
import threading

import pytest
from clip import request, url_input
from support.images import noise_image
from support.inprocess import Event, service

A, B, C, FETCHED = (noise_image("PNG", size=(64, 48), seed=seed) for seed in (31, 32, 33, 34))
ORIGIN_IP = "127.0.0.2"  # a loopback address of its own, standing in for a public host (as test_url_input does)


def part(name, data, filename=None):
    head = f'--B\r\nContent-Disposition: form-data; name="{name}"'
    head += f'; filename="{filename}"' if filename else ""
    return head.encode() + b"\r\n\r\n" + data + b"\r\n"


def multipart(*parts):
    return Event(b"".join(parts) + b"--B--\r\n", "multipart/form-data; boundary=B")


def what(item):
    return item.url or item.data


def test_form_parts_of_every_kind_keep_their_order():
    event = multipart(part("image", A, "a.png"), part("top_k", b"3"), part("image", base64.b64encode(B)),
                      part("image", C, "c.png"), part("url", b" https://images.test/d.png "))
    parsed = request.sort_body(event, 16)
    assert [what(item) for item in parsed.items] == [A, B, C, "https://images.test/d.png"]
    assert parsed.options.getlist("top_k") == ["3"]


def test_a_url_first_and_text_between_files_keep_their_order():
    event = multipart(part("url", b"https://images.test/d.png"), part("image", base64.b64encode(B)),
                      part("image", A, "a.png"), part("image", base64.b64encode(C)))
    parsed = request.sort_body(event, 16)
    assert [what(item) for item in parsed.items] == ["https://images.test/d.png", B, A, C]


def test_a_urlencoded_form_keeps_its_order():
    body = "&".join([f"image={base64.urlsafe_b64encode(A).decode()}", "url=https://images.test/d.png",
                     f"image={base64.urlsafe_b64encode(C).decode()}"]).encode()
    parsed = request.sort_body(Event(body, "application/x-www-form-urlencoded"), 16)
    assert [what(item) for item in parsed.items] == [A, "https://images.test/d.png", C]


def test_a_refused_part_keeps_its_place():
    event = multipart(part("image", A, "a.png"), part("image", b"not base64 *"), part("image", C, "c.png"))
    items = request.sort_body(event, 16).items
    assert [item.data for item in items] == [A, None, C] and items[1].error.code == "invalid_image"


# ---- through the classifier: each result is its own picture's --------------------------------------------

class Origin(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(FETCHED)))
        self.end_headers()
        self.wfile.write(FETCHED)


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer((ORIGIN_IP, 0), Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://images.test:{server.server_address[1]}/d.png"
    server.shutdown()


def resolve(host, port, **kwargs):
    if host != "images.test":
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ORIGIN_IP, port))]


@pytest.fixture
def clip(tiny_model, clip_env, monkeypatch):
    """The in-process handler with URL input on for images.test (the test seams of test_url_input)."""
    from clip import handler
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"])
    monkeypatch.setattr(handler, "SERVICE", svc)
    monkeypatch.setattr(svc, "settings", svc.settings.__class__(**{**svc.settings.__dict__,
                                                                      "url_allow_hosts": ("images.test",)}))
    monkeypatch.setattr(url_input, "fetch", functools.partial(
        url_input.fetch, resolve=resolve, address_ok=lambda ip: ip == ORIGIN_IP or url_input.public_address(ip)))
    return lambda event: handler.handle(event, None)


def test_each_result_belongs_to_the_picture_sent_in_its_place(clip, origin):
    alone = []
    for picture in (A, B, C, FETCHED):
        answer = clip(Event(picture, "image/png"))
        assert answer["statusCode"] == 200, answer["body"]
        alone.append(answer["body"]["predictions"])
    assert all(alone[i] != alone[j] for i in range(4) for j in range(i)), "the pictures must tell apart"
    answer = clip(multipart(part("image", A, "a.png"), part("image", base64.b64encode(B)),
                            part("image", C, "c.png"), part("url", origin.encode())))
    assert answer["statusCode"] == 200, answer["body"]
    assert [result["predictions"] for result in answer["body"]["results"]] == alone
    doc = {"images": [base64.b64encode(p).decode() for p in (C, A)], "url": origin}
    shuffled = clip(Event(json.dumps(doc).encode(), "application/json"))
    assert [result["predictions"] for result in shuffled["body"]["results"]] == [alone[2], alone[0], alone[3]]
