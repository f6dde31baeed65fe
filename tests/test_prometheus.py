"""A real Prometheus (Debian's `prometheus` package; scripts/setup --dev installs it) scrapes the local stack
as a cluster's would: both functions' targets are up, and the recorded query over clip_requests_total
(deploy/prometheus/rules.yml) returns the requests the test sent. `promtool check rules` passes on every
rules file in deploy/."""
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.images import noise_image
from support.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
FUNCTIONS = ("clip", "index")
PNG = noise_image("PNG", seed=77)
SENT = 5


def need(tool):
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not found: Debian's prometheus package is not installed (scripts/setup --dev installs it)")
    return path


def rule_files():
    """Every YAML file under deploy/ that holds Prometheus rule groups."""
    found = []
    for path in sorted((ROOT / "deploy").rglob("*.y*ml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        if any("groups" in d for d in docs):
            found.append(path)
    return found


def test_promtool_checks_every_rules_file_in_deploy():
    promtool = need("promtool")
    files = rule_files()
    assert RULES in files
    for path in files:
        checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture
def prometheus(stack, tmp_path):
    """Prometheus scraping both functions through the local gateway every second, with the deploy rules."""
    binary = need("prometheus")
    gateway = urlsplit(stack.url).netloc
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": name, "metrics_path": f"/function/{name}/metrics",
                            "static_configs": [{"targets": [gateway], "labels": {"function": name}}]}
                           for name in FUNCTIONS],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
        try:
            return requests.get(url + "/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False
    try:
        wait_until(ready, 30, 0.1, "prometheus ready")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def api(url, path, **params):
    answer = requests.get(f"{url}/api/v1/{path}", params=params, timeout=5).json()
    assert answer["status"] == "success", answer
    return answer["data"]


def scalar(url, query):
    """The one value of an instant query, None while it has none."""
    result = api(url, "query", query=query)["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_both_functions_and_the_recorded_query_counts_the_requests_sent(stack, prometheus):
    def targets_up():
        active = api(prometheus, "targets")["activeTargets"]
        return {t["labels"]["function"]: t["health"] for t in active} == {name: "up" for name in FUNCTIONS}
    wait_until(targets_up, 30, 0.2, "both functions' targets up")
    recorded = 'sum(clip:requests:sum{method="POST"})'
    # what other tests sent already (the stack is shared), read from the function itself: a scrape may not
    # have seen the last of them yet
    before = posts_counted(stack.url + "/function/clip/metrics")
    answers = [requests.post(stack.url + "/function/clip", data=PNG, timeout=60) for _ in range(SENT)]
    assert [a.status_code for a in answers] == [200] * SENT
    assert requests.get(stack.url + "/function/index", timeout=60).status_code == 200
    index_pages = 'sum(index:requests:sum{method="GET",status="200"})'
    deadline = time.monotonic() + 30
    # each function is scraped on its own schedule: wait for both to have counted what was sent
    while scalar(prometheus, recorded) != before + SENT or (scalar(prometheus, index_pages) or 0) < 1:
        assert time.monotonic() < deadline, (
            f"{recorded} is {scalar(prometheus, recorded)}, not {before} + {SENT}; "
            f"{index_pages} is {scalar(prometheus, index_pages)}"
        )
        time.sleep(0.2)


def posts_counted(metrics_url):
    """clip_requests_total's POSTs as the function counts them now."""
    text = requests.get(metrics_url, timeout=10).text
    families = text_string_to_metric_families(text)
    return sum(
        sample.value
        for family in families
        if family.name == "clip_requests"
        for sample in family.samples
        if sample.name == "clip_requests_total" and sample.labels.get("method") == "POST"
    )
