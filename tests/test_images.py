"""The two function images, built by scripts/images (the real faas-cli lays out the contexts, podman
builds the template's Dockerfile with the real of-watchdog) and run with podman as the stacks say:
uid 12000, clip's memory limit, a read-only root file system, the stacks' environment. Every check is
made from outside, through the watchdog's port 8080. Built once per session; podman keeps the layers.

Needs podman, runc, mmdebstrap (scripts/setup --images installs them as root), faas-cli and fwatchdog."""
import base64
import io
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support.containers import Container, build_images, missing_tools, podman, record, stack_function
from support.images import noise_image
from test_faults import http_request, read_response

ROOT = Path(__file__).resolve().parents[1]
MISSING = missing_tools()
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"image tests need {', '.join(MISSING)} "
                                "(scripts/setup --images installs Debian's podman, runc and mmdebstrap as root)")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    from support.tiny_model import make_tiny_model
    tiny = make_tiny_model(tmp_path_factory.mktemp("image-model") / "tiny")  # same seed: same layers
    label_sets = tmp_path_factory.mktemp("image-label-sets") / "label_sets"  # the function's folder's name
    shutil.copytree(ROOT / "docs" / "label-sets", label_sets)  # the documented example, kitchen
    built = build_images(tiny, label_sets)
    for name, image in built.items():
        record(f"{name}_image_bytes", int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout))
    return built


@pytest.fixture(scope="module")
def clip(images):
    """clip's container, its health and readiness watched from the start until it is ready (whichever
    test of this module runs first): what they answered while it loaded is in `loading_seen`."""
    container = Container(images["clip"], "clip", stack_function("clip")).start()
    container.loading_seen = set()
    while container.status() != 200 and time.monotonic() - container.started < 180 and container.running():
        container.loading_seen.add((container.status("/_/health"), container.status("/_/ready")))
        time.sleep(0.05)
    container.cold_start = container.wait_ready()
    yield container
    container.remove()


def jpeg(seed=3, size=(320, 240)):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(noise_image("PNG", size=size, seed=seed))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_clip_is_ready_only_once_loaded_and_its_healthcheck_passes(clip):
    seen, cold_start = clip.loading_seen, clip.cold_start
    assert (503, 503) in seen and seen <= {(None, None), (503, 503), (200, 200)}, seen  # never a dropped /_/ready
    assert clip.status("/_/ready") == 200
    assert podman("healthcheck", "run", clip.name, check=False).returncode == 0, clip.logs()
    assert clip.inspect("{{.Config.User}}") == "12000:12000"
    assert clip.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    first = requests.post(clip.url, data=jpeg(), headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert first.status_code == 200, first.text
    record("clip_ready_s_after_podman_run", round(cold_start, 1))


def test_clip_classifies_a_jpeg_raw_multipart_and_json_through_the_watchdog(clip):
    clip.wait_ready()
    picture = jpeg(seed=5)
    raw = requests.post(clip.url, data=picture, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert raw.status_code == 200, raw.text
    form = requests.post(clip.url, files={"image": ("cat.jpg", picture, "image/jpeg")}, timeout=60)
    as_json = requests.post(clip.url, json={"image": base64.b64encode(picture).decode()}, timeout=60)
    assert raw.json()["predictions"] == form.json()["predictions"] == as_json.json()["predictions"]
    assert len(raw.json()["predictions"]) == 5 and raw.json()["model"] == "tiny"


@pytest.mark.parametrize("kwargs, status, code", [
    ({"data": b"not an image"}, 400, "invalid_image"),
    ({"data": b""}, 400, "missing_image"),
    ({"json": {"image": "%%%"}}, 400, "invalid_image"),
    ({"data": b"{", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    ({"data": b"\xff\xd8\xff" + bytes(33 * 2**20)}, 413, "body_too_large"),
])
def test_clip_answers_the_contracts_errors_as_json_through_the_watchdog(clip, kwargs, status, code):
    clip.wait_ready()
    response = requests.post(clip.url, timeout=60, **kwargs)
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == code


def test_a_cold_start_downloads_nothing_and_embeds_nothing(clip):
    clip.wait_ready()
    env = podman("exec", clip.name, "cat", "/home/app/function.env").stdout
    assert "HF_HUB_OFFLINE=1" in env and "CLIP_MODEL=local-dir:/home/app/function/tiny" in env
    logs = clip.logs()
    assert "encoding" not in logs and "Downloading" not in logs, logs


def test_a_label_set_shipped_as_a_file_is_baked_and_served(clip):
    """docs/images.md's path: a NAME.txt in the function's label_sets/ is embedded at build (the cold start
    above encodes nothing) and classified into as label_set=NAME."""
    clip.wait_ready()
    described = requests.get(clip.url, timeout=30).json()
    assert "kitchen" in described["label_sets"], described["label_sets"]
    answer = requests.post(clip.url, params={"label_set": "kitchen"}, data=jpeg(), timeout=60)
    assert answer.status_code == 200, answer.text
    labels = (ROOT / "docs" / "label-sets" / "kitchen.txt").read_text().splitlines()
    kitchen = {line.strip() for line in labels if line.strip() and not line.startswith("#")}
    assert answer.json()["label_set"] == "kitchen"
    assert {p["label"] for p in answer.json()["predictions"]} <= kitchen
    assert "encoding" not in clip.logs()


def test_the_functions_deadline_answers_before_the_watchdogs_exec_timeout_cuts(images):
    env = {"CLIP_DEADLINE_S": "0.000001"}
    with Container(images["clip"], "clip-deadline", stack_function("clip"), env) as fn:
        fn.wait_ready()
        answer = requests.post(fn.url, data=jpeg(), timeout=60)
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "deadline_exceeded", answer.text
    with Container(images["clip"], "clip-cut", stack_function("clip"), {"exec_timeout": "1ms"}) as fn:
        fn.wait_ready()
        cut = requests.post(fn.url, data=jpeg(), timeout=60)
        assert cut.status_code in (502, 503, 504) and "predictions" not in cut.text, cut.text


def test_index_forwards_to_clip_over_a_podman_network_and_recovers(images):
    network = f"clip-test-{os.getpid()}"
    podman("network", "create", network)
    clip_fn, index_fn = stack_function("clip"), stack_function("index")
    clip = Container(images["clip"], "clip", clip_fn, network=network).start()
    index = Container(images["index"], "index", index_fn, {"CLIP_URL": "http://clip:8080/", "CLIP_TIMEOUT_S": "20"},
                      network=network).start()
    try:
        index.wait_ready(), clip.wait_ready()
        page = requests.get(index.url, timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        post = dict(files={"image": ("a.jpg", jpeg(), "image/jpeg")}, headers={"Accept": "application/json"},
                    timeout=60)
        answer = requests.post(index.url, **post)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 5, answer.text
        podman("stop", "-t", "30", clip.name)
        away = requests.post(index.url, **post)
        assert away.status_code in (502, 503) and away.json()["error"]["code"], away.text
        podman("start", clip.name)
        clip.started = time.monotonic()
        clip.wait_ready()
        assert requests.post(index.url, **post).status_code == 200
    finally:
        index.remove(), clip.remove()
        podman("network", "rm", "-f", network, check=False)


def test_podman_stop_answers_8_requests_in_flight_and_exits_0(images):
    with Container(images["clip"], "clip-stop", stack_function("clip")) as fn:
        fn.wait_ready()
        socks = []
        try:
            for i in range(8):
                sock = socket.create_connection(("127.0.0.1", fn.port), timeout=120)
                sock.sendall(http_request(fn.port, [noise_image("PNG", size=(640, 480), seed=i)] * 2))
                socks.append(sock)
            time.sleep(0.3)
            podman("kill", "--signal", "TERM", fn.name)
            deadline = time.monotonic() + 10
            while fn.status() == 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert fn.status() == 503, "the lock goes first: health is red while requests finish"
            answers = [read_response(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        assert [status for status, _ in answers] == [200] * 8, answers
        podman("wait", fn.name, timeout=90)
        assert fn.inspect("{{.State.ExitCode}}") == "0", fn.logs()


def big_png(seed):
    """A 12-megapixel photo-like PNG of about 25 MB: under the body limit, 36 MB of pixels decoded."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (750, 1000, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((4000, 3000), Image.BILINEAR).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_clip_under_its_memory_limit_answers_or_sheds_16_large_pngs(clip):
    clip.wait_ready()
    pictures = [big_png(i) for i in range(4)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: requests.post(clip.url, data=pictures[i % 4], timeout=120), range(16)))
    # answered, or shed with the contract's JSON (429 queue full, 504 past its own deadline on busy cores)
    assert {a.status_code for a in answers} <= {200, 429, 504}, [a.text[:200] for a in answers]
    assert all(a.json().get("predictions") or a.json()["error"]["code"] in ("queue_full", "deadline_exceeded")
               for a in answers)
    assert clip.running() and clip.inspect("{{.State.OOMKilled}}") == "false", clip.logs()
    peak = podman("stats", "--no-stream", "--format", "json", clip.name).stdout
    record("clip_memory_after_16_large_pngs", json.loads(peak)[0].get("mem_usage", peak[:200]))


CPU = min(os.sched_getaffinity(0))
NODE = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("limit, expected", [
    (["--cpus", "1"], "1 cgroup quota 1.0"),
    (["--cpuset-cpus", str(CPU)], "1 affinity 1"),
    ([], f"{NODE} affinity {NODE}"),
], ids=["cpus-1", "cpuset-1", "no-limit"])
def test_the_host_counts_the_cpus_the_container_may_use(images, limit, expected):
    """What the template host publishes as FUNCTION_CPUS, and clip sizes its threads by, read from the
    container's own cgroup: its CPU limit or CPU set, never the node's cores."""
    script = "import cpus; print(*cpus.available())"
    ran = podman("run", "--rm", "--no-healthcheck", "--user", "12000:12000", "--read-only", *limit, images["clip"],
                 "python", "-c", script, timeout=120)
    assert ran.stdout.strip() == expected, ran.stderr
