"""URL input ({"url": …}): off by default; with an allow-list, only public addresses (checked after DNS
and after every redirect), http(s) only, within a size and a time limit.

Unit tests call url_input.fetch with a fake resolver. To download from the loopback test server they
also pass address_ok: the one deliberate seam (a keyword argument, never configuration), so the
test server stands in for a public host; every refusal test runs with the production check."""
import functools
import http.server
import socket
import threading
import time

import pytest
import requests
from clip import url_input
from clip.errors import ClientError
from support.images import noise_image
from support.inprocess import Event, service
from support.servers import FunctionProcess

ORIGIN_IP = "127.0.0.2"  # the test server's own loopback address: 127.0.0.1 stays refused everywhere
PICTURE = noise_image("PNG", size=(64, 48), seed=21)
HOSTS = ("images.test", ".cdn.test", "metadata.test", "private.test", "mixed.test", "localhost", "127.0.0.1",
         "::1", "rebind.test")
FAKE_DNS = {
    "images.test": [ORIGIN_IP],            # the loopback test server, standing in for a public host
    "a.cdn.test": [ORIGIN_IP],
    "metadata.test": ["169.254.169.254"],
    "private.test": ["10.1.2.3"],
    "mixed.test": ["93.184.216.34", "192.168.1.1"],
    "localhost": ["127.0.0.1", "::1"],
    "127.0.0.1": ["127.0.0.1"],
    "::1": ["::1"],
}


def fake_resolve(host, port, **kwargs):
    if host not in FAKE_DNS:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in FAKE_DNS[host]]


def loopback_ok(ip):
    """The seam: the test server's address counts as public; everything else as in production."""
    return ip == ORIGIN_IP or url_input.public_address(ip)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.hits.append(self.path)
        path, _, query = self.path.partition("?")
        if path == "/cat.png":
            self.reply(200, PICTURE)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query.replace("%3A", ":").replace("%2F", "/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/big":  # honest Content-Length over the limit
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 2**20))
            self.end_headers()
            self.stream(10 * 2**20)
        elif path == "/big-unannounced":  # no length: counted while reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.stream(10 * 2**20)
        elif path == "/lying-length":  # claims little, sends a lot
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.stream(10 * 2**20)
        elif path == "/bad-length":
            self.send_response(200)
            self.send_header("Content-Length", "lots")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(PICTURE)
        elif path == "/drip":  # headers at once, then a byte now and then, forever
            self.send_response(200)
            self.send_header("Content-Length", str(len(PICTURE)))
            self.end_headers()
            self.drip(PICTURE)
        elif path == "/drip-headers":  # the status line, then header bytes now and then
            self.drip(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 1000)
        elif path == "/hang":
            time.sleep(10)
        elif path == "/missing":
            self.reply(404, b"not found")
        elif path == "/text":
            self.reply(200, b"this is not a picture")

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self, total):
        piece = bytes(65536)
        try:
            for _ in range(total // len(piece)):
                self.wfile.write(piece)
        except OSError:
            pass

    def drip(self, data):
        try:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer((ORIGIN_IP, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://images.test:{server.server_address[1]}", server.server_address[1]
    server.shutdown()


def fetch(url, timeout_s=5.0, max_bytes=2**20, **kwargs):
    kwargs = {"resolve": fake_resolve, "address_ok": loopback_ok, **kwargs}
    return url_input.fetch(url, HOSTS, timeout_s, max_bytes, **kwargs)


def refused(url, code="url_refused", **kwargs):
    with pytest.raises(ClientError) as caught:
        fetch(url, **kwargs)
    assert 400 <= caught.value.status < 500 and caught.value.code == code, caught.value.message
    return caught.value


# ---- the address check ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ip", ["127.0.0.1", "127.1.2.3", "0.0.0.0", "10.0.0.1", "172.16.5.4", "192.168.0.1",
                                "169.254.169.254", "100.64.0.1", "224.0.0.1", "255.255.255.255", "::1", "::",
                                "fe80::1", "fe80::1%eth0", "fd00:ec2::254", "fc00::1", "ff02::1",
                                "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1", "2002:a00:1::",
                                "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "not an ip", ""])
def test_non_public_addresses_are_refused(ip):
    assert not url_input.public_address(ip)


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_accepted(ip):
    assert url_input.public_address(ip)


def test_allow_list_matches_hosts_and_subdomains_only():
    allow = ("images.example.com", ".cdn.example.org")
    assert url_input.host_allowed("images.example.com", allow) and url_input.host_allowed("IMAGES.example.com.", allow)
    assert url_input.host_allowed("cdn.example.org", allow) and url_input.host_allowed("a.b.cdn.example.org", allow)
    for host in ("example.com", "evil-images.example.com", "images.example.com.evil.net", "xcdn.example.org"):
        assert not url_input.host_allowed(host, allow)


# ---- fetching -------------------------------------------------------------------------------------------

def test_off_unless_hosts_are_allowed():
    with pytest.raises(ClientError) as caught:
        url_input.fetch("https://images.example.com/cat.jpg", (), 5, 2**20)
    assert caught.value.code == "url_disabled" and caught.value.status == 400


def test_a_picture_is_downloaded(origin):
    assert fetch(origin[0] + "/cat.png") == PICTURE
    assert fetch(f"http://a.cdn.test:{origin[1]}/cat.png?size=large") == PICTURE


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://images.test/cat.png", "gopher://images.test:70/",
                                 "dict://images.test:11211/stat", "data:image/png;base64,AAAA", "//images.test/x",
                                 "images.test/cat.png", "javascript:alert(1)", "http:///cat.png",
                                 "http://images.test:99999/cat.png", "http://[::1/cat.png", ""])
def test_other_schemes_and_malformed_urls_are_refused(url):
    refused(url)


@pytest.mark.parametrize("host", ["evil.test", "images.test.evil.net", "cdn.test.evil.net"])
def test_hosts_off_the_allow_list_are_refused(host):
    refused(f"http://{host}/cat.png")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "metadata.test", "private.test",
                                  "mixed.test"])
def test_hosts_resolving_to_non_public_addresses_are_refused(origin, host):
    """Even allow-listed by name: the production address check refuses them before connecting."""
    before = len(Handler.hits)
    refused(f"http://{host}:{origin[1]}/cat.png", address_ok=url_input.public_address)
    assert len(Handler.hits) == before  # nothing was fetched


def test_images_test_itself_is_refused_by_the_production_check(origin):
    refused(origin[0] + "/cat.png", address_ok=url_input.public_address)


def test_unresolvable_hosts_are_a_clear_400():
    refused("http://rebind.test/cat.png", code="url_unreachable")


@pytest.mark.parametrize("target", ["http://metadata.test/latest/meta-data/", "http://private.test/",
                                    "http://127.0.0.1/", "http://localhost:1/", "http://evil.test/cat.png",
                                    "file:///etc/passwd", "ftp://images.test/cat.png"])
def test_redirects_are_checked_like_the_url(origin, target):
    before = len(Handler.hits)
    error = refused(f"{origin[0]}/redirect?{target}")
    assert error.code == "url_refused"
    assert len(Handler.hits) == before + 1  # the redirect itself, and nothing after it


def test_a_relative_redirect_to_an_allowed_place_is_followed(origin):
    assert fetch(f"{origin[0]}/redirect?/cat.png") == PICTURE


def test_redirect_loops_end(origin):
    refused(origin[0] + "/loop")


def test_connections_go_to_the_checked_address_only(origin, monkeypatch):
    """DNS rebinding: a second lookup answering 127.0.0.1 must never be used. The resolver is asked once
    per hop, and the socket connects to exactly the address it returned."""
    calls, connected = [], []
    real_create = socket.create_connection

    def counting_resolve(host, port, **kwargs):
        calls.append(host)
        return fake_resolve(host, port)

    def recording_create(address, *args, **kwargs):
        connected.append(address[0])
        return real_create(address, *args, **kwargs)

    real_getaddrinfo = socket.getaddrinfo

    def numeric_only(host, *args, **kwargs):  # connecting to an IP address looks it up without DNS
        if host not in (ORIGIN_IP,):
            pytest.fail(f"a second DNS lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)
    monkeypatch.setattr(socket, "create_connection", recording_create)
    assert fetch(origin[0] + "/cat.png", resolve=counting_resolve) == PICTURE
    assert calls == ["images.test"] and connected == [ORIGIN_IP]


@pytest.mark.parametrize("path", ["/big", "/big-unannounced"])
def test_downloads_over_the_size_limit_are_refused(origin, path):
    error = refused(origin[0] + path, code="url_too_large", max_bytes=2**20)
    assert error.status == 413


def test_a_body_longer_than_its_content_length_is_not_read_past_it(origin):
    assert fetch(origin[0] + "/lying-length", max_bytes=2**20) == bytes(100)


@pytest.mark.parametrize("path", ["/drip", "/drip-headers", "/hang"])
def test_slow_servers_time_out(origin, path):
    """A server that never finishes, or drips bytes just fast enough to beat any per-read timeout,
    is cut off by the one overall timer."""
    started = time.monotonic()
    refused(origin[0] + path, code="url_timeout", timeout_s=1.0)
    assert time.monotonic() - started < 5  # not a duration test: proof that the drip did not win


@pytest.mark.parametrize("path, code", [("/missing", "url_unreachable"), ("/bad-length", None)])
def test_odd_answers_are_client_errors(origin, path, code):
    if code:
        refused(origin[0] + path, code=code)
    else:
        assert fetch(origin[0] + path) == PICTURE  # a junk Content-Length is ignored, the body still counted


def test_nothing_listening_is_a_clear_400():
    with socket.socket() as s:
        s.bind((ORIGIN_IP, 0))
        port = s.getsockname()[1]
    refused(f"http://images.test:{port}/cat.png", code="url_unreachable")


# ---- through the classifier ------------------------------------------------------------------------------

@pytest.fixture
def url_service(tiny_model, clip_env, monkeypatch):
    """The in-process handler with URL input on for images.test, fetching through the seam."""
    from clip import handler
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"])
    monkeypatch.setattr(handler, "SERVICE", svc)
    monkeypatch.setattr(svc, "settings", svc.settings.__class__(**{**svc.settings.__dict__,
                                                                      "url_allow_hosts": ("images.test",),
                                                                      "url_timeout_s": 1.0}))
    monkeypatch.setattr(url_input, "fetch", functools.partial(url_input.fetch, resolve=fake_resolve,
                                                           address_ok=loopback_ok))
    return handler


def test_a_url_classifies_like_the_same_bytes(url_service, origin):
    import json
    direct = url_service.handle(Event(PICTURE), None)
    by_url = url_service.handle(Event(json.dumps({"url": origin[0] + "/cat.png"}).encode(), "application/json"),
                                None)
    assert direct["statusCode"] == by_url["statusCode"] == 200
    assert by_url["body"]["predictions"] == direct["body"]["predictions"]
    form = url_service.handle(Event(b"url=" + (origin[0] + "/text").encode(), "application/x-www-form-urlencoded"),
                              None)
    assert form["statusCode"] == 400 and form["body"]["error"]["code"] == "invalid_image"
    slow = url_service.handle(Event(json.dumps({"url": origin[0] + "/drip"}).encode(), "application/json"), None)
    assert slow["statusCode"] == 400 and slow["body"]["error"]["code"] == "url_timeout"


# ---- over HTTP, with the production checks ------------------------------------------------------------------

def test_url_input_is_off_by_default(clip_server, origin):
    before = len(Handler.hits)
    response = requests.post(clip_server.url, json={"url": f"http://127.0.0.1:{origin[1]}/cat.png"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "url_disabled"
    assert requests.get(clip_server.url, timeout=10).json()["url_input"] is False
    assert len(Handler.hits) == before


def test_an_allow_listed_loopback_or_metadata_host_is_still_refused(clip_env, tmp_path, origin):
    env = {**clip_env, "CLIP_URL_ALLOW_HOSTS": "localhost,127.0.0.1,::1,169.254.169.254,metadata.google.internal",
           "CLIP_URL_TIMEOUT_S": "2"}
    before = len(Handler.hits)
    with FunctionProcess("clip", tmp_path, env) as fn:
        assert requests.get(fn.url, timeout=10).json()["url_input"] is True
        for url in (f"http://localhost:{origin[1]}/cat.png", f"http://127.0.0.1:{origin[1]}/cat.png",
                    f"http://[::1]:{origin[1]}/cat.png", "http://169.254.169.254/latest/meta-data/",
                    "http://metadata.google.internal/computeMetadata/v1/", "file:///etc/passwd",
                    f"ftp://localhost:{origin[1]}/cat.png", "http://evil.example/cat.png"):
            for kwargs in ({"json": {"url": url}}, {"files": {"url": (None, url)}}):
                response = requests.post(fn.url, timeout=10, **kwargs)
                assert response.status_code == 400, (url, response.text)
                assert response.json()["error"]["code"] in ("url_refused", "url_unreachable"), response.text
        assert requests.post(fn.url, data=PICTURE, timeout=10).status_code == 200
    assert len(Handler.hits) == before  # the test server was never reached


# ---- named private networks (CLIP_URL_ALLOW_NETWORKS): an explicit opt-in --------------------------------

ORIGIN_NET = url_input.parse_networks(f"{ORIGIN_IP}/32")


def test_allow_networks_parses_cidrs_and_refuses_a_bad_one_by_name(monkeypatch):
    from clip import config
    monkeypatch.setenv("CLIP_URL_ALLOW_NETWORKS", "127.0.0.0/8, 10.0.0.0/8,fd00::/8, 192.168.1.7")
    assert [str(n) for n in config.from_env().url_allow_networks] == ["127.0.0.0/8", "10.0.0.0/8", "fd00::/8",
                                                                      "192.168.1.7/32"]
    monkeypatch.delenv("CLIP_URL_ALLOW_NETWORKS")
    assert config.from_env().url_allow_networks == ()  # off by default
    for bad in ("10.1.2.3/8", "not-a-network", "10.0.0.0/33"):
        monkeypatch.setenv("CLIP_URL_ALLOW_NETWORKS", bad)
        with pytest.raises(ValueError, match="CLIP_URL_ALLOW_NETWORKS"):
            config.from_env()


def test_a_named_network_lets_its_addresses_through_and_no_others():
    ok = url_input.address_check(url_input.parse_networks("127.0.0.0/8,10.0.0.0/8,fe80::/10"),
                                 url_input.public_address)
    for ip in ("127.0.0.1", "127.9.9.9", "::ffff:127.0.0.1", "10.1.2.3", "fe80::1%eth0", "8.8.8.8"):
        assert ok(ip), ip
    for ip in ("169.254.169.254", "192.168.0.1", "172.16.0.1", "::1", "0.0.0.0", "::", "fd00:ec2::254", "x"):
        assert not ok(ip), ip


def test_a_host_in_a_named_network_is_fetched_with_the_production_check(origin):
    assert fetch(origin[0] + "/cat.png", address_ok=url_input.public_address, allow_networks=ORIGIN_NET) == PICTURE


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "metadata.test", "private.test", "mixed.test"])
def test_addresses_outside_the_named_networks_stay_refused(origin, host):
    before = len(Handler.hits)
    refused(f"http://{host}:{origin[1]}/cat.png", address_ok=url_input.public_address, allow_networks=ORIGIN_NET)
    assert len(Handler.hits) == before


def test_a_redirect_out_of_the_named_network_is_refused(origin):
    before = len(Handler.hits)
    refused(f"{origin[0]}/redirect?http://metadata.test/latest/meta-data/", address_ok=url_input.public_address,
            allow_networks=ORIGIN_NET)
    assert len(Handler.hits) == before + 1  # the redirect itself, and nothing after it


def test_the_address_actually_connected_to_is_checked(origin, monkeypatch):
    """The name resolves to an allowed address, but the socket ends up elsewhere (DNS, a rewrite or a
    race between the check and the connect): the peer is refused before a byte of the request is sent."""
    real_create = socket.create_connection

    def elsewhere(address, *args, **kwargs):  # asked for 127.0.0.3, connected to the origin at 127.0.0.2
        return real_create((ORIGIN_IP, address[1]), *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", elsewhere)
    monkeypatch.setitem(FAKE_DNS, "images.test", ["127.0.0.3"])
    before = len(Handler.hits)
    error = refused(origin[0] + "/cat.png", address_ok=url_input.public_address,
                    allow_networks=url_input.parse_networks("127.0.0.3/32"))
    assert ORIGIN_IP in error.message
    assert len(Handler.hits) == before


def test_a_clip_with_a_named_network_fetches_from_it_and_nowhere_else(clip_env, tmp_path, origin):
    """Over HTTP, production checks: loopback 127.0.0.2 named, so the local file server answers; 127.0.0.1,
    allow-listed by name but outside the network, and the metadata address stay refused."""
    env = {**clip_env, "CLIP_URL_ALLOW_HOSTS": f"{ORIGIN_IP},127.0.0.1,169.254.169.254",
           "CLIP_URL_ALLOW_NETWORKS": f"{ORIGIN_IP}/32", "CLIP_URL_TIMEOUT_S": "2"}
    with FunctionProcess("clip", tmp_path, env) as fn:
        fetched = requests.post(fn.url, json={"url": f"http://{ORIGIN_IP}:{origin[1]}/cat.png"}, timeout=30)
        direct = requests.post(fn.url, data=PICTURE, timeout=30)
        assert fetched.status_code == direct.status_code == 200, fetched.text
        assert fetched.json()["predictions"] == direct.json()["predictions"]
        before = len(Handler.hits)
        for url in (f"http://127.0.0.1:{origin[1]}/cat.png", "http://169.254.169.254/latest/meta-data/"):
            response = requests.post(fn.url, json={"url": url}, timeout=30)
            assert response.status_code == 400 and response.json()["error"]["code"] == "url_refused", response.text
        assert len(Handler.hits) == before
