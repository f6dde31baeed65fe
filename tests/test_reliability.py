"""Reliability, second battery: nothing a request sends can stop the model thread, starve other
requests, blow the memory, or skip admission; a replica that cannot serve any more leaves."""
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from clip import handler
from clip.decode_bombs import Limits
from clip.decode_gate import DecodeGate
from clip.errors import BadImage
from clip.images import load_image
from PIL import Image
from support.images import image_bytes, noise_image
from support.inprocess import Event, service
from support.servers import ROOT, FunctionProcess, free_port, wait_until

PNG = noise_image("PNG", size=(96, 64), seed=41)


def call(svc, body=PNG, content_type="image/png", query=(), headers=()):
    previous, handler.SERVICE = handler.SERVICE, svc
    try:
        answer = handler.handle(Event(body, content_type, query=query, headers=headers), None)
    finally:
        handler.SERVICE = previous
    return answer["statusCode"], answer["body"], answer["headers"]


class HeldModel:
    """The model's encode, held: the next forward pass waits on the model thread until the test lets it
    go (leaving the block does), so requests behind it meet a busy model however fast the machine is.
    Leaving the block also waits for that pass, so what follows meets an idle model."""

    def __init__(self, batcher):
        self.batcher, self.original = batcher, batcher.encode
        self.busy, self.gate, self.done = threading.Event(), threading.Event(), threading.Event()

    def held(self, batch):
        self.busy.set()
        try:
            assert self.gate.wait(30), "the test never let the model go"
            return self.original(batch)
        finally:
            self.batcher.encode = self.original
            self.done.set()

    def __enter__(self):
        self.batcher.encode = self.held
        return self

    def __exit__(self, *exc):
        self.gate.set()
        if self.busy.is_set():
            self.done.wait(30)
        self.batcher.encode = self.original


# ---- the model thread ---------------------------------------------------------------------------------------

def test_requests_past_their_deadline_get_504_and_the_next_one_is_answered(tiny_model, clip_env):
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"], deadline_s=0.5)
    with HeldModel(svc.batcher) as model, ThreadPoolExecutor(3) as pool:
        occupy = pool.submit(call, svc)  # occupies the model until the test lets it go
        assert model.busy.wait(30)
        behind = [pool.submit(call, svc) for _ in range(2)]  # queued behind it: give up at their deadline
        statuses = [f.result()[0] for f in behind]
        model.gate.set()
        occupy.result()
    assert statuses == [504, 504]
    status, body, _ = call(svc)
    assert status == 200 and body["predictions"], body
    assert svc.batcher.healthy()


def test_custom_labels_behind_a_busy_model_are_bounded_by_the_deadline(tiny_model, clip_env):
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"], deadline_s=0.5)
    with HeldModel(svc.batcher) as model:
        occupy = threading.Thread(target=call, args=(svc,))
        occupy.start()
        assert model.busy.wait(30)
        # answered at its deadline while the model is still held, not after the busy batch
        status, body, _ = call(svc, query=[("labels", "zebra crossing,lighthouse at dusk")])
        assert not model.gate.is_set()
        model.gate.set()
        occupy.join()
    assert status == 504 and body["error"]["code"] == "deadline_exceeded"
    assert call(svc, query=[("labels", "zebra crossing,lighthouse at dusk")])[0] == 200


def test_new_labels_take_their_share_of_the_queue(tiny_model, clip_env):
    """Text encoding is admitted like images: a flood of new labels is shed with 429."""
    svc = service(tiny_model, clip_env["CLIP_CACHE_DIR"], max_queue=4)
    labels = ",".join(f"thing number {i}" for i in range(200))  # 7 chunks of 32 prompts: the whole queue
    assert svc.admission([object()], svc_options(svc, labels)) == 4
    release = threading.Event()
    blocker = threading.Thread(target=svc.batcher.call, args=(lambda: release.wait(10),))
    blocker.start()  # the model thread is busy: the first request's encoding waits, admitted
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, svc, PNG, "image/png", [("labels", labels)])
            wait_until(lambda: svc.batcher.admitted == 4, 30, 0.005, "the first request admitted, waiting")
            second = call(svc, query=[("labels", labels.replace("thing", "object"))])
            release.set()
            assert first.result(30)[0] == 200
    finally:
        release.set()
        blocker.join()
    assert second[0] == 429 and second[1]["error"]["code"] == "queue_full"
    assert call(svc, query=[("labels", labels)])[0] == 200  # cached now: no text cost, admitted


def svc_options(svc, labels):
    from clip.options import parse_options
    from werkzeug.datastructures import MultiDict
    return parse_options(MultiDict([("labels", labels)]), svc.limits.options)


def test_a_stalled_model_thread_takes_the_replica_out_and_exits_non_zero(clip_env, tmp_path):
    """CLIP_STALL_S far below a forward pass: the first busy moment counts as a stall."""
    env = {**clip_env, "CLIP_STALL_S": "0.0001", "FUNCTION_ALIVE_INTERVAL_S": "0.01"}
    fn = FunctionProcess("clip", tmp_path, env).start()
    try:
        def hammer():
            try:
                requests.post(fn.url, data=noise_image("PNG", size=(640, 480), seed=3), timeout=10)
            except requests.RequestException:
                pass
        with ThreadPoolExecutor(4) as pool:
            deadline = time.monotonic() + 60
            while fn.process.poll() is None and time.monotonic() < deadline:
                list(pool.map(lambda _: hammer(), range(4)))
        assert fn.process.wait(10) == 1
        assert not fn.lock.exists()
        assert "can no longer serve" in fn.output()
    finally:
        fn.stop()


# ---- input that is not what it claims -------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b'{"image": "\\ud800"}', b'{"images": ["\\udfff"]}',
                                  b'{"image": "aGk=", "labels": ["cat\\ud83d"]}', b'{"url": "\\ud800"}'])
def test_lone_surrogates_are_a_400(clip_server, body):
    response = requests.post(clip_server.url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_lone_surrogates_through_index_are_a_400(stack):
    response = requests.post(f"{stack.url}/function/index", data=b'{"image": "\\ud800"}',
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_a_non_ascii_request_id_is_replaced_not_echoed(clip_server):
    response = requests.get(clip_server.url, headers={"X-Request-Id": "caf\u00e9".encode("utf-8")}, timeout=10)
    request_id = response.headers["X-Request-Id"]
    assert request_id.isascii() and "caf" not in request_id and response.json()["request_id"] == request_id


def test_the_description_shows_no_server_paths(clip_server, tiny_model):
    text = requests.get(clip_server.url, timeout=10).text
    assert str(tiny_model) not in text and str(tiny_model.parent) not in text
    assert json.loads(text)["pretrained"] == "local-dir:tiny"


# ---- CPU bombs: refused from their structure, at once --------------------------------------------------------

def jpeg(size=(64, 64), **save):
    return image_bytes("JPEG", size=size, **save)


def progressive_with_scans(extra_scans, size=(2000, 2000)):
    """A smooth progressive JPEG (small to send) with its last scan repeated: each scan decodes it again."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize(size).convert("RGB").save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda"):-2]
    return data[:-2] + last_scan * extra_scans + data[-2:]


def rle_bmp(width, height, pixels=b"\x00\x00" * 8):
    """An RLE8 BMP; by default 16 bytes of end-of-line escapes that make Pillow pad rows byte by byte."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 0, 0, 256, 0)
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    return b"BM" + struct.pack("<IHHI", 1078 + len(pixels), 0, 0, 1078) + info + palette + pixels


RLE_ROWS = (b"\xff\x07" + b"\x2d\x07" + b"\x00\x00") * 200 + b"\x00\x01"  # 255 + 45 pixels a row, 200 rows

BOMBS = {
    "fill bytes": jpeg()[:2] + b"\xff" * 3_000_000 + jpeg()[2:],
    "empty segments": jpeg()[:2] + b"\xff\xec\x00\x02" * 1_000_000 + jpeg()[2:],
    "hundreds of scans": progressive_with_scans(500),
    "RLE BMP": rle_bmp(50_000, 1_000),
}


@pytest.mark.parametrize("name", BOMBS)
def test_decode_bombs_are_refused_from_their_structure(clip_server, name):
    response = requests.post(clip_server.url, data=BOMBS[name], timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_too_complex"
    assert requests.post(clip_server.url, data=PNG, timeout=30).status_code == 200


@pytest.mark.parametrize("data", [jpeg(progressive=True), noise_image("JPEG", size=(3000, 2000), seed=5),
                                  progressive_with_scans(2, size=(400, 300)), rle_bmp(300, 200, RLE_ROWS),
                                  jpeg()[:2] + b"\xff" * 16 + jpeg()[2:]],
                         ids=["progressive", "12 MP photo", "a few extra scans", "small RLE BMP", "some fill"])
def test_real_pictures_pass_the_structure_checks(data):
    assert load_image(data, 50_000_000, 224).mode == "RGB"


def test_structure_limits_are_settings(clip_server):
    limits = requests.get(clip_server.url, timeout=10).json()["limits"]
    assert limits["max_scan_pixels"] == Limits.max_scan_pixels and limits["max_rle_pixels"] == Limits.max_rle_pixels
    with pytest.raises(BadImage) as refused:
        load_image(progressive_with_scans(2, size=(400, 300)), 50_000_000, 224, limits=Limits(max_scan_pixels=1000))
    assert refused.value.code == "image_too_complex"


# ---- memory and cores: what concurrent decodes may take ------------------------------------------------------

class Decodes:
    """Threads going through a DecodeGate, logging when each starts and ends. Each holds its slot until
    the test lets it go (order() lets them all go), and run() returns once its decode holds a slot or
    waits for one: the order of arrival is the test's, whatever the machine's speed."""

    def __init__(self, gate):
        self.gate, self.log, self.threads, self.release = gate, [], [], {}

    def run(self, name, pixels, cost, background=True):
        release = self.release[name] = threading.Event()

        def decode():
            with self.gate.enter(pixels, cost, time.monotonic() + 30):
                self.log.append(("start", name))
                assert release.wait(30)
                self.log.append(("end", name))  # inside: before the slot frees for the next one
        if not background:
            release.set()
            return decode()
        waiting = self.gate.waiting
        self.threads.append(threading.Thread(target=decode))
        self.threads[-1].start()
        wait_until(lambda: ("start", name) in self.log or self.gate.waiting > waiting, 30, 0.002,
                   f"{name} decoding or waiting")

    def order(self, *events):
        for release in self.release.values():
            release.set()
        for thread in self.threads:
            thread.join()
        return [self.log.index(event) for event in events]


def test_big_decodes_wait_for_memory():
    decodes = Decodes(DecodeGate(slots=4, memory_bytes=1000, heavy_pixels=10_000))
    decodes.run("big", 500, 800)
    decodes.run("big2", 500, 800)  # over the memory left: waits for the first
    decodes.run("small", 50, 10, background=False)  # fits beside the first
    first, second, third = decodes.order(("start", "small"), ("end", "big"), ("start", "big2"))
    assert first < second < third and decodes.gate.bytes_in_use == 0


def test_a_decoder_is_kept_for_small_pictures():
    decodes = Decodes(DecodeGate(slots=3, memory_bytes=10_000, heavy_pixels=100))
    for name in ("big", "big2", "big3"):  # two decode, the third waits: the last slot is not theirs
        decodes.run(name, 500, 10)
    decodes.run("small", 50, 10, background=False)
    small, big, big2, big3 = decodes.order(("start", "small"), ("end", "big"), ("end", "big2"), ("start", "big3"))
    assert small < min(big, big2) < big3  # the third big one only once one of the first two is done


def test_small_pictures_go_first_when_a_slot_frees():
    decodes = Decodes(DecodeGate(slots=1, memory_bytes=10_000, heavy_pixels=100))
    decodes.run("big", 500, 10)
    decodes.run("big2", 500, 10)  # waiting before the small one arrives...
    decodes.run("small", 50, 10)
    first, second = decodes.order(("start", "small"), ("start", "big2"))
    assert first < second  # ...and still after it


def test_a_decode_waiting_past_its_deadline_gives_up():
    from clip.errors import DeadlineExceeded
    gate = DecodeGate(slots=1, memory_bytes=1000, heavy_pixels=100)
    with gate.enter(10, 10, time.monotonic() + 5):
        with pytest.raises(DeadlineExceeded):
            with gate.enter(10, 10, time.monotonic() + 0.1):
                pass


def test_sixteen_bit_pictures_decode_without_float_copies():
    buffer = io.BytesIO()
    Image.new("I;16", (300, 200), 40000).save(buffer, "PNG")
    assert load_image(buffer.getvalue(), 50_000_000, 224).getpixel((0, 0)) == (155, 155, 155)


# ---- floods of structure ---------------------------------------------------------------------------------------

def test_a_million_item_image_list_is_refused_by_count(clip_server):
    body = b'{"images": [' + b'"x",' * 1_000_000 + b'"x"]}'
    response = requests.post(clip_server.url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_images"


def test_a_flood_of_form_parts_is_refused_by_count(clip_server):
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    response = requests.post(clip_server.url, data=part * 300_000 + b"--b--\r\n",
                             headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_parts"


# ---- connections and local stacks -------------------------------------------------------------------------------

def idle_connections(address, count):
    socks = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=5)
        socks.append(sock)
    return socks


def test_150_idle_connections_do_not_stall_the_function(clip_server):
    socks = idle_connections(clip_server.host_address, 150)  # the template host's own connection limit
    try:
        assert requests.post(clip_server.url, data=PNG, timeout=15).status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_150_idle_connections_do_not_stall_the_gateway(stack):
    socks = idle_connections(("127.0.0.1", stack.port), 150)
    try:
        assert requests.get(f"{stack.url}/function/clip", timeout=15).status_code == 200
    finally:
        for sock in socks:
            sock.close()


def gateway(port, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "localrun.gateway", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def test_a_busy_port_is_a_clear_error_and_leaves_nothing_running():
    import psutil
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = gateway(port, {"PATH": "/usr/bin:/bin", "CLIP_URL": "http://127.0.0.1:9/"})
        output, _ = process.communicate(timeout=60)
    assert process.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in output.decode() and "Traceback" not in output.decode()
    assert not [p for p in psutil.process_iter(["cmdline"]) if "index.py" in " ".join(p.info["cmdline"] or [])
                and str(ROOT) in " ".join(p.info["cmdline"] or []) and p.ppid() == process.pid]


def test_two_local_stacks_keep_their_own_working_folders():
    """Stopping one scripts/serve leaves another one healthy (each has build/serve-PORT)."""
    env = {"PATH": "/usr/bin:/bin", "CLIP_URL": "http://127.0.0.1:9/"}  # index only: no model to load
    ports = [free_port(), free_port()]
    first, second = (gateway(port, env) for port in ports)

    def healthy(port):
        try:
            return requests.get(f"http://127.0.0.1:{port}/function/index/_/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False
    try:
        wait_until(lambda: healthy(ports[0]) and healthy(ports[1]), 120, 0.2, "two local stacks")
        second.terminate()
        second.wait(60)
        time.sleep(0.5)
        assert healthy(ports[0])
        assert (ROOT / "build" / f"serve-{ports[0]}").is_dir()
    finally:
        for process in (first, second):
            process.terminate()
            process.wait(60)


# ---- the first minute without internet access ---------------------------------------------------------------

def test_weights_that_cannot_be_downloaded_are_one_clear_message(tmp_path):
    env = {"CLIP_MODEL": "ViT-B-32", "CLIP_PRETRAINED": "laion2b_s34b_b79k", "CLIP_CACHE_DIR": str(tmp_path / "c"),
           "HF_HUB_OFFLINE": "1"}  # offline: the download fails at once, as it does on an air-gapped machine
    fn = FunctionProcess("clip", tmp_path, env).start(wait_ready=False)
    try:
        def described():
            try:
                return requests.get(fn.url, timeout=5).json()
            except requests.RequestException:
                return {}
        wait_until(lambda: "error" in described(), 300, 0.5, "clip to say why it is not ready")
        info = described()
        assert info["ready"] is False and "CLIP_PRETRAINED=none" in info["error"] and "local-dir:" in info["error"]
        assert (info["model"], info["pretrained"]) == ("ViT-B-32", "laion2b_s34b_b79k")
        answer = requests.post(fn.url, data=PNG, timeout=10)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_unavailable"
        assert "CLIP_PRETRAINED=none" in answer.json()["error"]["message"]
        assert fn.process.poll() is None and not fn.lock.exists()  # up, never ready
        log = fn.output()
        assert log.count("CLIP_PRETRAINED=none") == 1 and "Traceback" not in log
        assert "Failed to download weights" not in log  # open_clip's own line would say it a second time
    finally:
        fn.stop()


def test_scripts_serve_without_the_hub_starts_clip_offline_with_one_clear_message(tmp_path):
    """No retries against an unreachable hub: the local gateway asks once, then clip runs offline."""
    with socket.socket() as closed:  # a port nobody listens on: the hub refuses at once
        closed.bind(("127.0.0.1", 0))
        hub = f"http://127.0.0.1:{closed.getsockname()[1]}"
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CLIP_MODEL": "ViT-B-32",
           "CLIP_PRETRAINED": "laion2b_s34b_b79k", "CLIP_CACHE_DIR": str(tmp_path / "c"), "HF_ENDPOINT": hub}
    process = gateway(port, env)
    try:
        def described():
            try:
                return requests.get(f"http://127.0.0.1:{port}/function/clip", timeout=5).json()
            except (requests.RequestException, ValueError):
                return {}
        # clip's own description (its "error" a sentence), not the gateway's 502 while clip starts
        wait_until(lambda: isinstance(described().get("error"), str), 300, 0.5, "clip to say why it is not ready")
        assert "CLIP_PRETRAINED=none" in described()["error"] and "local-dir:" in described()["error"]
    finally:
        process.terminate()
        output = process.communicate(timeout=90)[0].decode()
    assert f"{hub} is not reachable" in output and "HF_HUB_OFFLINE=1" in output
    assert "Retrying in" not in output and "Failed to download weights" not in output
    assert output.count("CLIP_PRETRAINED=none") == 1 and "Traceback" not in output


@pytest.mark.parametrize("raw", [
    b"POST /function/clip HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /function/clip HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 * 1024) + b"\r\n\r\n",
], ids=["duplicate Content-Length", "headers too large"])
def test_the_local_gateways_own_protocol_errors_are_json(stack, raw):
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1][:1] == b"4" and b"application/json" in head.lower()
    assert json.loads(body)["error"]["message"]
