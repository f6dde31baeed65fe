"""The template host's connections: its own view of them (lifecycle.Listener), which the SIGTERM drain waits
on (a connection is busy from the first byte of a request until its answer has gone out whole), and how
it refuses a body over MAX_BODY_BYTES on the wire (before any 100 Continue; closed without a reset), and
its refusals answered as the function answers: its error page for a browser, JSON otherwise, counted."""
import json
import socket
from pathlib import Path

import lifecycle
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support.servers import FunctionProcess

from localrun.functions import FUNCTION_DIRS


@pytest.fixture
def listener():
    sock = lifecycle.Listener.wrap(socket.create_server(("127.0.0.1", 0)))
    yield sock
    sock.close()


def test_a_connection_is_busy_from_its_first_byte_until_its_answer_went_out(listener):
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        server_side, _ = listener.accept()
        assert isinstance(server_side, lifecycle.Connection)
        assert not listener.busy(), "an idle connection holds nothing"
        client.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")  # an upload still arriving
        assert server_side.recv(65536)
        assert listener.busy()
        server_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert not listener.busy(), "answered: a keep-alive connection waiting for more is idle"
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert server_side.recv(65536) and listener.busy()
        server_side.close()
        assert not listener.busy(), "a closed connection holds nothing"


def test_an_answer_the_kernel_has_not_taken_whole_keeps_the_connection_busy(listener):
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server_side, _ = listener.accept()
        server_side.setblocking(False)
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        server_side.recv(65536)
        big = bytes(64 * 2**20)  # more than the socket buffers take while the client reads nothing
        sent = server_side.send(big)
        assert sent < len(big) and listener.busy()
        with pytest.raises(BlockingIOError):
            while True:
                server_side.send(big)
        assert listener.busy()
        server_side.close()


# The host itself, as a process (the probe function: no model), spoken to on its own port in raw HTTP.
FUNCTION_DIRS.setdefault("probe", Path(__file__).parent / "support" / "probe_function")
LIMIT = 100_000


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with FunctionProcess("probe", tmp_path_factory.mktemp("host"), {"MAX_BODY_BYTES": str(LIMIT)}) as fn:
        yield fn


def read_answer(sock):
    """One HTTP answer's status line, headers and body (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of an answer"
        body += chunk
    return status, headers, body


def test_expect_100_continue_with_a_body_over_the_limit_is_refused_before_any_100(host):
    """curl sends Expect: 100-continue for uploads over 1 MB: the refusal comes from the header, and
    the client never gets an invitation to send a body that will be thrown away."""
    with socket.create_connection(host.host_address, timeout=30) as client:
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                       b"Expect: 100-continue\r\nContent-Length: 50000000\r\n\r\n")
        status, headers, body = read_answer(client)
    assert status.startswith("HTTP/1.1 413"), status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_expect_100_continue_within_the_limit_still_gets_its_100(host):
    with socket.create_connection(host.host_address, timeout=30) as client:
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert read_answer(client)[0] == "HTTP/1.1 100 Continue"
        client.sendall(b"hello")
        assert read_answer(client)[0].startswith("HTTP/1.1 200")


def test_a_client_still_sending_an_over_long_body_reads_the_413_and_is_never_reset(host):
    """A proxy that buffered the body (of-watchdog) writes all of it while the 413 is already on its
    way: the host must not reset the connection, which would throw the unread answer away."""
    with socket.create_connection(host.host_address, timeout=30) as client:
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n\r\n")
        status, _, body = read_answer(client)
        assert status.startswith("HTTP/1.1 413") and json.loads(body)["error"]["code"] == "body_too_large"
        client.sendall(bytes(8_000_000))  # a reset makes this fail (ECONNRESET / EPIPE)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(65536) == b"", "after its answer the host closes its side, nothing more"


# ---- refusals the host makes itself, answered as the function would (issue 25: handler.error_page) -------

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


def refusals(fn):
    """probe_requests_total by (status, code) for POST, from the host's /metrics."""
    text = requests.get(fn.url + "/metrics", timeout=30).text
    return {(s.labels["status"], s.labels["code"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "probe_requests_total" and s.labels["method"] == "POST"}


def test_a_no_js_form_post_over_the_limit_gets_the_functions_page_with_413(host):
    """A browser's plain form post (no JavaScript to check the size first) of a picture over MAX_BODY_BYTES:
    the host refuses it from its Content-Length, with the function's own page, not raw JSON."""
    before = refusals(host)
    response = requests.post(host.url, files={"image": ("big.jpg", bytes(3 * LIMIT), "image/jpeg")},
                             headers={"Accept": BROWSER_ACCEPT, "X-Request-Id": "form-413"}, timeout=60)
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["X-Request-Id"] == "form-413"
    assert "<p id=code>body_too_large</p>" in response.text and "<p id=request>form-413</p>" in response.text
    assert f"larger than {LIMIT} bytes" in response.text
    after = refusals(host)
    assert after.get(("413", "body_too_large"), 0) - before.get(("413", "body_too_large"), 0) == 1, \
        "a refusal is counted as the request it was"


def test_a_script_over_the_limit_gets_json_with_its_request_id(host):
    response = requests.post(host.url, data=bytes(2 * LIMIT), headers={"X-Request-Id": "script-413"}, timeout=60)
    assert response.status_code == 413 and response.headers["X-Request-Id"] == "script-413"
    assert response.json() == {"error": {"code": "body_too_large",
                                         "message": f"The request body is larger than {LIMIT} bytes."},
                               "request_id": "script-413"}


def test_a_browsers_malformed_request_gets_the_page_with_400(host):
    with socket.create_connection(host.host_address, timeout=30) as client:
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"not-a-chunk-size\r\n\r\n")
        status, headers, body = read_answer(client)
    assert status.startswith("HTTP/1.1 400"), status
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert b"<p id=code>bad_request</p>" in body and headers["x-request-id"].encode() in body


def test_without_an_error_page_a_browser_gets_json(tmp_path):
    with FunctionProcess("probe", tmp_path, {"MAX_BODY_BYTES": str(LIMIT), "PROBE_ERROR_PAGE": "false"}) as fn:
        response = requests.post(fn.url, data=bytes(2 * LIMIT), headers={"Accept": BROWSER_ACCEPT}, timeout=60)
    assert response.status_code == 413 and response.headers["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "body_too_large"
    assert response.json()["request_id"] == response.headers["X-Request-Id"]
