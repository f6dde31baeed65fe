"""Observability: GET /metrics on both functions (scraped from real processes and parsed with
prometheus_client's parser), one log line per request carrying the request id from index to clip, the
scrape wiring in the deploy files, and a Grafana dashboard that reads only what the functions export."""
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.images import noise_image
from support.servers import FunctionProcess, free_port, wait_until

import localrun
from localrun.functions import FUNCTION_DIRS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "clip.json"
PNG = noise_image("PNG", seed=41)


# ---- helpers ---------------------------------------------------------------------------------------

def scrape(url):
    """{(sample name, sorted labels): value} of one scrape, parsed as Prometheus parses it."""
    response = requests.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before, after, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)


def json_lines(fn):
    fn.log.flush()
    text = (fn.dir / "function.log").read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def log_for(lines, request_id):
    matching = [line for line in lines if line["request_id"] == request_id]
    assert len(matching) == 1, (request_id, matching)
    return matching[0]


def multipart(count):
    return [("image", (f"{i}.png", noise_image("PNG", seed=50 + i), "image/png")) for i in range(count)]


# ---- clip ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_json(clip_env, tmp_path_factory):
    """clip with JSON logs, room for 4 images (so at most 4 per request), a long batching wait
    (concurrent requests ride together), and prometheus_client's multiprocess mode, as the host runs
    several workers."""
    workdir = tmp_path_factory.mktemp("clip-observed")
    (workdir / "prom").mkdir()
    env = {**clip_env, "LOG_FORMAT": "json", "CLIP_MAX_QUEUE": "4", "CLIP_MAX_WAIT_MS": "150",
           "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prom")}
    with FunctionProcess("clip", workdir, env) as fn:
        yield fn


def test_clip_counters_move_by_exactly_the_requests_made(clip_json):
    before = scrape(clip_json.url)
    good = [requests.post(clip_json.url, data=PNG, headers={"X-Request-Id": f"good-{i}"}, timeout=60)
            for i in range(2)]
    bad = requests.post(clip_json.url, data=b"not an image", timeout=60)
    too_many = requests.post(clip_json.url, files=multipart(5), timeout=60)  # never admitted: a 400, not a 429
    after = scrape(clip_json.url)

    assert [r.status_code for r in good] == [200, 200] and bad.status_code == 400 and too_many.status_code == 400
    assert moved(before, after, "clip_requests_total", method="POST", status="200", code="") == 2
    assert moved(before, after, "clip_requests_total", method="POST", status="400", code="invalid_image") == 1
    assert moved(before, after, "clip_requests_total", method="POST", status="400", code="too_many_images") == 1
    assert moved(before, after, "clip_requests_total", method="GET", status="200", code="") == 0, \
        "a scrape is not a request"
    assert moved(before, after, "clip_request_duration_seconds_count") == 4
    assert moved(before, after, "clip_images_classified_total") == 2
    assert moved(before, after, "clip_shed_images_total") == 0  # shed: refused by a full queue (429) only
    # one image at a time: two forward passes of one image each
    assert moved(before, after, "clip_batch_size_count") == 2 and moved(before, after, "clip_batch_size_sum") == 2
    assert moved(before, after, "clip_queue_wait_seconds_count") == 2
    assert moved(before, after, "clip_encode_seconds_count") == 2
    assert value(after, "clip_images_admitted") == 0 and value(after, "clip_images_queued") == 0

    lines = json_lines(clip_json)
    for response, status, code, images in [(good[0], 200, None, 1), (good[1], 200, None, 1),
                                           (bad, 400, "invalid_image", 1), (too_many, 400, "too_many_images", 0)]:
        request_id = response.headers["X-Request-Id"]
        assert response.json()["request_id"] == request_id
        line = log_for(lines, request_id)
        assert (line["function"], line["method"], line["status"], line["code"]) == ("clip", "POST", status, code)
        assert line["images"] == images and line["ms"] >= 0
        assert line["bytes_in"] == len(response.request.body)
    assert good[0].headers["X-Request-Id"] == "good-0", "a caller's request id is kept"
    assert [len(log_for(lines, f"good-{i}")["batches"]) for i in range(2)] == [1, 1]


def test_clip_batches_concurrent_requests_and_the_histogram_and_logs_agree(clip_json):
    before = scrape(clip_json.url)
    ids, rounds = [], 0
    with ThreadPoolExecutor(4) as pool:
        while rounds < 6:  # a busy machine may still serve a round one by one; a few rounds suffice
            rounds += 1
            barrier = threading.Barrier(4)

            def one(i, round_=rounds, barrier=barrier):
                barrier.wait()
                request_id = f"load-{round_}-{i}"
                response = requests.post(clip_json.url, data=PNG, headers={"X-Request-Id": request_id},
                                         timeout=60)
                assert response.status_code == 200, response.text[:200]
                return request_id
            ids += list(pool.map(one, range(4)))
            after = scrape(clip_json.url)
            if moved(before, after, "clip_batch_size_count") < moved(before, after, "clip_batch_size_sum"):
                break
    batches = moved(before, after, "clip_batch_size_count")
    assert moved(before, after, "clip_batch_size_sum") == len(ids) == moved(before, after,
                                                                           "clip_images_classified_total")
    assert batches < len(ids), "concurrent requests never shared a forward pass"
    single = moved(before, after, "clip_batch_size_bucket", le="1.0")
    assert single < batches, "the histogram shows no batch of more than one image"
    # every request's log line names the batch it rode in; together they are the histogram's batches
    lines = json_lines(clip_json)
    rode = {}
    for request_id in ids:
        (batch,) = log_for(lines, request_id)["batches"]
        rode.setdefault(batch["id"], set()).add(batch["size"])
    assert len(rode) == batches and all(len(sizes) == 1 for sizes in rode.values())
    assert sum(size for (size,) in rode.values()) == len(ids)
    assert moved(before, after, "clip_queue_wait_seconds_count") == len(ids)


def test_clip_exports_its_model_label_sets_and_process_figures(clip_json):
    samples = scrape(clip_json.url)
    describe = requests.get(clip_json.url, timeout=30).json()
    (info,) = [dict(labels) for name, labels in samples if name == "clip_model_info"]
    assert {k: info[k] for k in ("model", "pretrained", "device", "dtype")} == \
           {k: describe[k] for k in ("model", "pretrained", "device", "dtype")}
    assert info["untrained"] == str(describe["untrained"]).lower()
    for name, label_set in describe["label_sets"].items():
        assert value(samples, "clip_label_set_ready", label_set=name) == (1 if label_set["ready"] else 0)
    assert value(samples, "clip_label_set_ready", label_set="cifar100") == 1
    assert value(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert value(samples, "process_cpu_seconds_total") > 0


def test_custom_label_cache_hits_and_misses_are_counted(clip_json):
    before = scrape(clip_json.url)
    responses = [requests.post(clip_json.url, data=PNG, params={"labels": labels}, timeout=60)
                 for labels in ("zebra,teapot", "zebra,teapot,lamp")]
    after = scrape(clip_json.url)
    assert [r.status_code for r in responses] == [200, 200]
    assert moved(before, after, "clip_custom_label_lookups_total", result="miss") == 3
    assert moved(before, after, "clip_custom_label_lookups_total", result="hit") == 2
    lines = [json.dumps(log_for(json_lines(clip_json), r.headers["X-Request-Id"])) for r in responses]
    assert not [line for line in lines if "zebra" in line or "teapot" in line], "labels stay out of the logs"


def test_url_fetches_are_counted_by_outcome(clip_json):
    """URL input is off here (no allow-list): each URL is refused, and counted as such."""
    before = scrape(clip_json.url)
    response = requests.post(clip_json.url, json={"url": "https://example.com/cat.jpg"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "url_disabled"
    after = scrape(clip_json.url)
    assert moved(before, after, "clip_url_fetches_total", outcome="url_disabled") == 1
    assert "example.com" not in json.dumps(log_for(json_lines(clip_json), response.headers["X-Request-Id"]))


# ---- index, and one request id through both functions -----------------------------------------------

def test_one_request_id_follows_a_request_through_index_and_clip(stack):
    index, clip = stack.url + "/function/index", stack.url + "/function/clip"
    before = scrape(index)
    response = requests.post(index, files={"image": ("a.png", PNG, "image/png")},
                             headers={"Accept": "application/json", "X-Request-Id": "trace-7f3a"}, timeout=60)
    anonymous = requests.post(index, data=PNG, timeout=60)
    after = scrape(index)
    assert response.status_code == anonymous.status_code == 200
    assert response.headers["X-Request-Id"] == response.json()["request_id"] == "trace-7f3a"
    generated = anonymous.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated) and anonymous.json()["request_id"] == generated
    assert moved(before, after, "index_requests_total", method="POST", status="200", code="") == 2
    assert moved(before, after, "index_upstream_duration_seconds_count") == 2
    assert sum(moved(before, after, "index_upstream_failures_total", kind=k)
               for k in ("refused", "timeout", "5xx", "bad_answer")) == 0

    def access_lines(request_id, function):
        log = (stack.workdir / "gateway.log").read_text(errors="replace")
        return [line for line in log.splitlines() if f" request_id={request_id} function={function} " in line]
    expected = [(request_id, function) for request_id in ("trace-7f3a", generated) for function in ("index", "clip")]
    # the functions' logs reach the gateway's as they grow (localrun.supervisor.Relay): wait for the lines
    wait_until(lambda: all(access_lines(*each) for each in expected), 30, 0.05, "the access log lines")
    for each in expected:
        lines = access_lines(*each)
        assert len(lines) == 1, (*each, lines)
        assert " method=POST status=200 code=- images=1 " in lines[0]
    assert "clip_requests_total" in requests.get(clip + "/metrics", timeout=30).text  # the gateway path too


class FakeClip(BaseHTTPRequestHandler):
    """Stands in for clip: ?fake=5xx answers 503 JSON, ?fake=html a 200 page, ?fake=slow nothing for 3 s,
    ?fake=code_x a 400 with the error code x."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mode = self.path.partition("fake=")[2]
        if mode == "slow":
            threading.Event().wait(3)
        status, body, kind = {"5xx": (503, b'{"error": {"code": "loading", "message": "x"}}', "application/json"),
                              "html": (200, b"<html>hello</html>", "text/html")}.get(mode, (200, b"{}", "text/plain"))
        if mode.startswith("code_"):  # ?fake=code_x: a 400 with a code of clip's choosing (x_y_z), not ours
            status, kind = 400, "application/json"
            body = json.dumps({"error": {"code": mode[5:], "message": "x"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_clip():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeClip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_index_counts_upstream_failures_by_kind(fake_clip, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/"
    with FunctionProcess("index", tmp_path / "a", {"CLIP_URL": fake_clip, "CLIP_TIMEOUT_S": "1",
                                                   "LOG_FORMAT": "json"}) as index, \
            FunctionProcess("index", tmp_path / "b", {"CLIP_URL": dead}) as orphan:
        before = scrape(index.url)
        answers = {mode: requests.post(index.url, data=PNG, params={"fake": mode}, timeout=30)
                   for mode in ("5xx", "html", "slow")}
        after = scrape(index.url)
        assert {mode: r.status_code for mode, r in answers.items()} == {"5xx": 503, "html": 502, "slow": 504}
        for kind in ("5xx", "bad_answer", "timeout"):
            assert moved(before, after, "index_upstream_failures_total", kind=kind) == 1, kind
        assert moved(before, after, "index_upstream_failures_total", kind="refused") == 0
        assert moved(before, after, "index_upstream_duration_seconds_count") == 3
        assert moved(before, after, "index_requests_total", method="POST", status="504", code="clip_timeout") == 1
        lines = json_lines(index)
        for response in answers.values():
            line = log_for(lines, response.headers["X-Request-Id"])
            assert (line["function"], line["status"], line["code"]) == \
                   ("index", response.status_code, response.json()["error"]["code"])

        before = scrape(orphan.url)
        assert requests.post(orphan.url, data=PNG, timeout=30).status_code == 502
        after = scrape(orphan.url)
        assert moved(before, after, "index_upstream_failures_total", kind="refused") == 1


def test_workers_sharing_a_multiprocess_dir_report_the_function_as_a_whole(tmp_path):
    """Two worker processes of one function (what FUNCTION_WORKERS runs): whichever answers the scrape,
    the counters are the sum of both, and a worker that exits leaves the live gauges."""
    (tmp_path / "prom").mkdir()
    env = {"CLIP_URL": f"http://127.0.0.1:{free_port()}/", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    with FunctionProcess("index", tmp_path / "one", env) as one, FunctionProcess("index", tmp_path / "two", env) as two:
        for fn, count in ((one, 3), (two, 2)):
            for _ in range(count):
                assert requests.post(fn.url, data=PNG, timeout=30).status_code == 502
        from_one, from_two = scrape(one.url), scrape(two.url)
        for samples in (from_one, from_two):
            assert value(samples, "index_requests_total", method="POST", status="502", code="clip_unreachable") == 5
            assert value(samples, "index_upstream_failures_total", kind="refused") == 5
        wait_until(lambda: value(scrape(two.url), "process_resident_memory_bytes") > 0, 10, 0.2, "memory sampled")
        both = value(scrape(two.url), "process_resident_memory_bytes")
        assert one.stop() == 0
        alone = scrape(two.url)
        assert value(alone, "index_requests_total", method="POST", status="502", code="clip_unreachable") == 5, \
            "counters keep what an exited worker counted"
        assert 0 < value(alone, "process_resident_memory_bytes") < both, "an exited worker's memory is not counted"


def test_a_crashed_workers_live_gauges_leave_the_function_sums(tmp_path):
    """A worker killed outright (no drain, no worker_exiting) stops counting in live gauges at the next scrape."""
    (tmp_path / "prom").mkdir()
    env = {"CLIP_URL": f"http://127.0.0.1:{free_port()}/", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    with FunctionProcess("index", tmp_path / "one", env) as one, FunctionProcess("index", tmp_path / "two", env) as two:
        scrape(one.url)  # a scrape samples the worker it reaches (and a sampler thread every 2 s)
        both = value(scrape(two.url), "process_resident_memory_bytes")
        worker = psutil.Process(one.host_pid)  # the worker itself, not a watchdog in front of it
        worker.kill()
        worker.wait(10)  # until its parent has reaped it, as a function's supervisor does within 50 ms
        assert 0 < value(scrape(two.url), "process_resident_memory_bytes") < 0.75 * both


# ---- label values from closed sets, request fields truncated in the log (issue 22, point 2) ----------

ODD_METHODS = [f"M{i}" + "X" * 10_000 for i in range(12)]  # a new series each, were methods labels as sent


def label_values(samples, name, label):
    return {dict(labels)[label] for sample, labels in samples if sample == name}


def longest_own_line(fn):
    """The longest line the function logged itself (the JSON ones: a watchdog in front logs each method too)."""
    return max(len(line) for line in json_text_lines(fn))


def json_text_lines(fn):
    fn.log.flush()
    return [line for line in (fn.dir / "function.log").read_text(errors="replace").splitlines() if line.startswith("{")]


def test_clip_counts_made_up_methods_as_other_and_logs_them_short(clip_json):
    before = scrape(clip_json.url)
    answers = [requests.request(method, clip_json.url, headers={"X-Request-Id": f"odd-{i}"}, timeout=30)
               for i, method in enumerate(ODD_METHODS)]
    after = scrape(clip_json.url)
    assert {a.status_code for a in answers} == {405}
    assert label_values(after, "clip_requests_total", "method") <= {"GET", "HEAD", "POST", "other"}
    assert moved(before, after, "clip_requests_total", method="other", status="405", code="method_not_allowed") == 12
    lines = json_lines(clip_json)
    for i in range(len(ODD_METHODS)):
        line = log_for(lines, f"odd-{i}")
        assert line["method"] == (f"M{i}" + "X" * 40)[:29] + "...", line["method"][:100]
    assert longest_own_line(clip_json) < 2000, "a log line carries a whole method"


def test_index_counts_made_up_methods_and_clips_codes_as_other(fake_clip, tmp_path):
    """clip's answer is not trusted either: a code that is not in the catalogue is counted as other."""
    with FunctionProcess("index", tmp_path, {"CLIP_URL": fake_clip, "LOG_FORMAT": "json"}) as index:
        before = scrape(index.url)
        odd = [requests.request(method, index.url, timeout=30) for method in ODD_METHODS]
        made_up = [requests.post(index.url, data=PNG, params={"fake": f"code_made_up_{i}"}, timeout=30)
                   for i in range(5)]
        known = requests.post(index.url, data=PNG, params={"fake": "code_invalid_image"}, timeout=30)
        after = scrape(index.url)
        assert {a.status_code for a in odd} == {405}
        assert {a.status_code for a in made_up} == {400} and known.status_code == 400
        assert label_values(after, "index_requests_total", "method") <= {"GET", "HEAD", "POST", "other"}
        assert "made_up_0" not in " ".join(label_values(after, "index_requests_total", "code"))
        assert moved(before, after, "index_requests_total", method="other", status="405",
                     code="method_not_allowed") == 12
        assert moved(before, after, "index_requests_total", method="POST", status="400", code="other") == 5
        assert moved(before, after, "index_requests_total", method="POST", status="400", code="invalid_image") == 1
        lines = json_lines(index)
        assert all(len(line["method"]) <= 32 for line in lines)
        assert longest_own_line(index) < 2000, "a log line carries a whole method"


# ---- deploy files and the dashboard ------------------------------------------------------------------

def load(relpath):
    return [doc for doc in yaml.safe_load_all((ROOT / relpath).read_text()) if doc]


@pytest.mark.parametrize("stack_file", ["clip.yml", "clip.pro.yml", "clip.gpu.yml", "index.yml"])
def test_openfaas_stacks_annotate_their_pods_for_scraping(stack_file):
    (doc,) = load(stack_file)
    for fn in doc["functions"].values():
        # faas-netes copies function annotations to the Pod and sets prometheus.io.scrape=false unless given
        annotations = fn["annotations"]
        assert annotations["prometheus.io.scrape"] == "true"
        assert annotations["prometheus.io.port"] == "8080" and annotations["prometheus.io.path"] == "/metrics"


@pytest.mark.parametrize("manifest", ["deploy/knative/clip.yaml", "deploy/knative/gpu/clip.yaml",
                                      "deploy/knative/index.yaml"])
def test_knative_revisions_annotate_their_pods_for_scraping(manifest):
    (service,) = [d for d in load(manifest) if d["kind"] == "Service"]
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080" and annotations["prometheus.io/path"] == "/metrics"
    assert service["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 8080


def test_pod_monitors_select_both_functions_on_both_engines():
    monitors = {d["metadata"]["name"]: d for d in load("deploy/prometheus/podmonitor.yaml")}
    assert all(d["apiVersion"] == "monitoring.coreos.com/v1" and d["kind"] == "PodMonitor" for d in monitors.values())
    openfaas, knative = monitors["clip-openfaas"], monitors["clip-knative"]
    assert openfaas["spec"]["namespaceSelector"]["matchNames"] == ["openfaas-fn"]
    (expr,) = openfaas["spec"]["selector"]["matchExpressions"]
    assert expr["key"] == "faas_function" and set(expr["values"]) == {"clip", "index"}
    (knative_ns,) = [d for d in load("deploy/knative/clip.yaml") if d["kind"] == "Namespace"]
    assert knative["spec"]["namespaceSelector"]["matchNames"] == [knative_ns["metadata"]["name"]]
    (expr,) = knative["spec"]["selector"]["matchExpressions"]
    assert expr["key"] == "serving.knative.dev/service" and set(expr["values"]) == {"clip", "index"}
    # the container port names faas-netes and Knative give the watchdog's port 8080
    assert [e["port"] for e in openfaas["spec"]["podMetricsEndpoints"]] == ["http"]
    assert [e["port"] for e in knative["spec"]["podMetricsEndpoints"]] == ["user-port"]
    for monitor in monitors.values():
        assert all(e["path"] == "/metrics" for e in monitor["spec"]["podMetricsEndpoints"])


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "le", "inf"}


def metric_names(expr):
    """The metric names a PromQL expression reads (label matchers, groupings, ranges and functions removed)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+|\$\{[^}]*\}", "", expr)
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_reads_only_metrics_the_functions_export(stack):
    # a labelled series exists once it has been counted: one classification through the page first, so the
    # test holds whichever test used the shared stack before it (or none)
    answer = requests.post(f"{stack.url}/function/index", data=PNG, timeout=60)
    assert answer.status_code == 200, answer.text
    exported = set()
    for function in ("clip", "index"):
        exported |= {name for name, _ in scrape(f"{stack.url}/function/{function}")}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    assert exprs, "a dashboard with no queries"
    read = set().union(*(metric_names(e) for e in exprs))
    assert read and read <= exported, f"not exported: {sorted(read - exported)}"
    for needed in ("clip_requests_total", "clip_request_duration_seconds_bucket", "clip_batch_size_bucket",
                   "clip_images_queued", "clip_label_set_ready", "process_resident_memory_bytes",
                   "index_requests_total", "clip_queue_wait_seconds_bucket"):
        assert needed in read, f"the dashboard never shows {needed}"
    assert any('status="429"' in e for e in exprs), "no 429 rate"


def test_dashboard_loads_in_grafana_as_is():
    """What Grafana's import needs of a file: panels with positions and queries against a data source
    chosen by a variable (no data source uid of somebody else's Grafana)."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["schemaVersion"], int) and dashboard.get("id") is None
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${%s}" % variable["name"]
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])


# ---- the template host's own observability (observe.py), seen through the probe function ------------

FUNCTION_DIRS.setdefault("probe", Path(__file__).parent / "support" / "probe_function")
HOST_CODES = {"body_too_large", "headers_too_large", "bad_request", "internal_error"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """The probe function (no model: NAME "probe", ERROR_CODES, sample(), a metric of its own) with JSON logs."""
    with FunctionProcess("probe", tmp_path_factory.mktemp("probe-observed"), {"LOG_FORMAT": "json"}) as fn:
        yield fn


def test_the_host_counts_requests_by_method_status_and_code_from_closed_sets(probe):
    before = scrape(probe.url)
    answers = [requests.get(probe.url, timeout=30),
               requests.post(probe.url, params={"code": "probe_refused"}, timeout=30),
               requests.post(probe.url, params={"html_code": "probe_html"}, timeout=30),  # code noted: HTML body
               requests.post(probe.url, params={"crash": "1"}, timeout=30)]
    made_up = [requests.post(probe.url, params={"code": f"made_up_{i}"}, timeout=30) for i in range(5)]
    odd = [requests.request(method, probe.url, timeout=30) for method in ODD_METHODS[:3] + ["FOO"]]
    after = scrape(probe.url)
    assert [a.status_code for a in answers] == [200, 400, 400, 500]
    assert {a.status_code for a in made_up} == {400} and {a.status_code for a in odd} == {200}
    for method, status, code, count in [("GET", "200", "", 1), ("POST", "400", "probe_refused", 1),
                                        ("POST", "400", "probe_html", 1), ("POST", "500", "internal_error", 1),
                                        ("POST", "400", "other", 5), ("other", "200", "", 4)]:
        assert moved(before, after, "probe_requests_total", method=method, status=status, code=code) == count, \
            (method, status, code)
    assert label_values(after, "probe_requests_total", "method") <= {"GET", "HEAD", "POST", "other"}
    assert label_values(after, "probe_requests_total", "code") <= {"", "probe_refused", "probe_html", "other"} | \
        HOST_CODES
    assert moved(before, after, "probe_request_duration_seconds_count") == 8, "POST only"
    assert moved(before, after, "probe_handled_total") == 13, "the function's own metric, exposed by the host"
    assert value(after, "probe_workers_sampled") == 1, "sample() ran before the scrape"
    assert requests.head(probe.url + "/metrics", timeout=30).status_code == 200
    assert moved(after, scrape(probe.url), "probe_handled_total") == 0, "/metrics never reaches the handler"
    assert sum(v for (name, _), v in scrape(probe.url).items() if name == "probe_requests_total") == \
        sum(v for (name, _), v in after.items() if name == "probe_requests_total"), "a scrape is not a request"


@pytest.mark.parametrize("given", ["trace-7f3a", "a.b_c-D", "x" * 64])
def test_a_callers_request_id_is_kept(probe, given):
    response = requests.get(probe.url, headers={"X-Request-Id": given}, timeout=30)
    assert response.headers["X-Request-Id"] == response.json()["request_id"] == given


@pytest.mark.parametrize("given", [None, "", "x" * 65, "two words", "caf\u00e9", "a/b", "id\u0661"])
def test_any_other_request_id_is_replaced_by_a_new_one(probe, given):
    headers = {} if given is None else {"X-Request-Id": given.encode("utf-8")}
    ids = [requests.get(probe.url, headers=headers, timeout=30).headers["X-Request-Id"] for _ in range(2)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]


def test_every_answer_carries_a_request_id(probe):
    crash = requests.post(probe.url, params={"crash": "1"}, headers={"X-Request-Id": "crash-1"}, timeout=30)
    assert crash.status_code == 500 and crash.headers["X-Request-Id"] == "crash-1"
    assert crash.json() == {"error": {"code": "internal_error", "message": "The function failed unexpectedly."},
                            "request_id": "crash-1"}, "no stack trace in a body"
    page = requests.post(probe.url, params={"html_code": "probe_html"}, headers={"X-Request-Id": "page-1"}, timeout=30)
    assert page.headers["X-Request-Id"] == "page-1"
    assert re.fullmatch(r"[0-9a-f]{32}", requests.get(probe.url + "/metrics", timeout=30).headers["X-Request-Id"])


def test_the_access_log_line_says_what_the_host_and_the_handler_know(probe):
    long_code = "c" * 100
    sent = [("POST", {"images": "3", "batch": ["1x2", "2x1"]}, b"12345", "log-a"),
            ("POST", {"code": long_code}, b"", "log-b"),
            ("POST", {"html_code": "probe_html"}, b"xy", "log-c"),
            (ODD_METHODS[0], {}, b"", "log-d")]
    for method, params, body, request_id in sent:
        requests.request(method, probe.url, params=params, data=body, headers={"X-Request-Id": request_id},
                         timeout=30)
    keys = {"time", "level", "msg", "request_id", "function", "method", "status", "code", "images", "bytes_in",
            "ms", "batches", "pid"}
    wait_until(lambda: all(any(line["request_id"] == i for line in json_lines(probe)) for *_, i in sent), 30, 0.05,
               "the access log lines")
    lines = {i: log_for(json_lines(probe), i) for *_, i in sent}
    assert all(set(line) == keys and line["function"] == "probe" and line["msg"] == "request" and line["ms"] >= 0
               for line in lines.values())
    assert {k: lines["log-a"][k] for k in ("method", "status", "code", "images", "bytes_in", "batches")} == \
           {"method": "POST", "status": 200, "code": None, "images": 3, "bytes_in": 5,
            "batches": [{"id": 1, "size": 2}, {"id": 2, "size": 1}]}
    assert lines["log-b"]["code"] == long_code[:29] + "..." and lines["log-b"]["images"] is None
    assert (lines["log-c"]["status"], lines["log-c"]["code"], lines["log-c"]["bytes_in"]) == (400, "probe_html", 2)
    assert lines["log-d"]["method"] == (ODD_METHODS[0][:29] + "...")


def test_the_access_log_line_as_text(tmp_path):
    with FunctionProcess("probe", tmp_path, {"LOG_FORMAT": "text"}) as fn:
        requests.post(fn.url, params={"images": "2", "batch": "4x2", "code": "probe_refused"}, data=b"abc",
                      headers={"X-Request-Id": "text-1"}, timeout=30)
        pattern = (r"\d{4}-\d\d-\d\d [\d:,]+ request request_id=text-1 function=probe method=POST status=400 "
                   r"code=probe_refused images=2 bytes_in=3 ms=\d+\.\d+ batches=4x2 pid=\d+")

        def line():
            fn.log.flush()
            text = (fn.dir / "function.log").read_text(errors="replace")
            return [each for each in text.splitlines() if re.fullmatch(pattern, each)]
        wait_until(line, 30, 0.05, "the access log line")


def test_the_hosts_figures_are_the_functions_across_its_workers(tmp_path):
    """Two workers behind one port: whichever answers a scrape, requests_total and the function's own
    metrics are the sum of both, sample() ran in each (a livesum gauge), and a worker that leaves (drained
    or killed) stops counting in the live gauges while the counters keep what it counted."""
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {"FUNCTION_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    fn = localrun.FunctionProcess("probe", tmp_path / "fn", env)  # no watchdog: a drained worker waits for none
    with fn:
        def ask(**params):
            with requests.Session() as session:  # a new connection each time: whichever worker takes it
                session.trust_env = False
                return session.get(fn.host_url, params=params, timeout=30).json()
        pids = set()
        asked = 0
        while len(pids) < 2:
            assert asked < 200, "one worker took every connection"
            pids.add(ask()["pid"])
            asked += 1
        for _ in range(5):
            scrape(fn.host_url)  # scrapes, whichever worker answers them, are not requests
        scrapes = [scrape(fn.host_url) for _ in range(6)]
        for samples in scrapes:
            assert value(samples, "probe_requests_total", method="GET", status="200", code="") == asked
            assert value(samples, "probe_handled_total") == asked
            assert value(samples, "probe_workers_sampled") == 2
            assert value(samples, "process_resident_memory_bytes") > 0
        workers = psutil.Process(fn.host_pid).children()
        drained, killed = workers
        drained.terminate()
        drained.wait(30)
        assert not list(prom.glob(f"gauge_live*_{drained.pid}.db")), "a drained worker leaves the live sums"
        killed.kill()
        killed.wait(30)
        replaced = {p.pid for p in workers}
        wait_until(lambda: not replaced & {p.pid for p in psutil.Process(fn.host_pid).children()}, 30, 0.05,
                   "both workers replaced")
        wait_until(lambda: value(scrape(fn.host_url), "probe_workers_sampled") == 2, 30, 0.2,
                   "the replaced workers alone in the live gauges")
        assert value(scrape(fn.host_url), "probe_requests_total", method="GET", status="200", code="") == asked


def test_the_templates_own_skeleton_is_observed_as_function(tmp_path):
    """A handler with nothing but handle() (what `faas-cli new --lang python3-debian` gives) is counted,
    logged and scraped all the same, under the default name."""
    FUNCTION_DIRS.setdefault("skeleton", ROOT / "template" / "python3-debian" / "function")
    with FunctionProcess("skeleton", tmp_path, {"LOG_FORMAT": "json"}) as fn:
        answer = requests.post(fn.url, data=b"hello", headers={"X-Request-Id": "skeleton-1"}, timeout=30)
        assert answer.status_code == 200 and answer.headers["X-Request-Id"] == "skeleton-1"
        assert value(scrape(fn.url), "function_requests_total", method="POST", status="200", code="") == 1
        wait_until(lambda: any(line["request_id"] == "skeleton-1" for line in json_lines(fn)), 30, 0.05, "its line")
        assert log_for(json_lines(fn), "skeleton-1")["function"] == "function"
