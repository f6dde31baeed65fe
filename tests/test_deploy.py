"""Deployment files hold together: every OpenFaaS stack, Knative manifest, Helm values file and the
template's Dockerfile parse and agree with each other and with the code (no Docker, no cluster).
The last tests run the build context exactly as faas-cli lays it out and the image runs it: the
template's fprocess from a directory shaped like the container's /home/app, after the build-ahead
hook the Dockerfile runs."""
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import settings
import yaml
from clip import config as clip_config
from clip.precision import baked_dtypes, cpu_features
from support.images import noise_image
from support.servers import free_port, wait_until

from frontend.index import config as index_config
from localrun.layout import layout
from localrun.of_watchdog import find_fwatchdog

ROOT = Path(__file__).resolve().parents[1]

TEMPLATE = ROOT / "template" / "python3-debian"
DOCKERFILE = TEMPLATE / "Dockerfile"
DEPLOY_GUIDE = ROOT / "docs" / "deploy.md"
CE_STACKS = ("clip.yml", "index.yml")
PRO_STACKS = ("clip.pro.yml", "clip.gpu.yml")
KNATIVE = {"clip": "deploy/knative/clip.yaml", "index": "deploy/knative/index.yaml",
           "clip-gpu": "deploy/knative/gpu/clip.yaml"}
# Which Knative manifest runs the image of which stack (the Pro stack shares clip.yml's image).
SAME_IMAGE = {"clip.yml": "clip", "clip.pro.yml": "clip", "index.yml": "index", "clip.gpu.yml": "clip-gpu"}
PRO_ONLY_SCALING = ("zero", "zero-duration", "type", "target", "target-proportion")
WATCHDOG_ENV = {"fprocess", "mode", "upstream_url", "read_timeout", "write_timeout", "exec_timeout",
                "max_inflight", "healthcheck_interval", "ready_path", "prefix_logs", "suppress_lock",
                "http_buffer_req_body", "log_buffer_size"}
BAKED_AT_BUILD = ("CLIP_MODEL", "CLIP_PRETRAINED", "CLIP_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE")


# ---------------------------------------------------------------------------------------- helpers

def load(relpath):
    with open(ROOT / relpath) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def stack(name):
    (doc,) = load(name)
    return doc


def only_function(name):
    (fn,) = stack(name)["functions"].values()
    return fn


def knative(key):
    (service,) = [d for d in load(KNATIVE[key]) if d.get("kind") == "Service"]
    return service


def container(service):
    (c,) = service["spec"]["template"]["spec"]["containers"]
    return c


def kenv(service):
    return {e["name"]: str(e["value"]) for e in container(service).get("env", [])}


def expand(text, env=None):
    """faas-cli's envsubst: ${VAR:-default} and ${VAR}, here with an empty environment by default."""
    env = env or {}
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


def seconds(value):
    """A Go duration ("60s", "1m5s", "15m", "1h") or plain seconds ("65", 90) -> seconds."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go duration: {value!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def mebibytes(quantity):
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|M|G)?", str(quantity)).groups()
    return float(number) * {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20, None: 1 / 2**20}[unit]


def cores(quantity):
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# every setting declared once (settings.Setting): the host's, clip's and index's
DECLARED = {s.name: s for s in (*settings.HOST_SETTINGS, *clip_config.DECLARATIONS, *index_config.DECLARATIONS)}


def env_default(name):
    """The default a declared setting has, as the environment would spell it."""
    assert name in DECLARED, f"{name} is not a declared setting"
    return str(DECLARED[name].default)


def names_read(*paths):
    """Environment variables a function reads: the declared settings, and what its files read directly
    (os.environ.get / os.environ[...], e.g. the host's cpus.py and lifecycle.py)."""
    names = set(DECLARED)
    for path in paths:
        names |= set(re.findall(r'environ(?:\.get\(|\[)\s*"([A-Z_][A-Z0-9_]*)"', Path(path).read_text()))
    return names


def label_sets(hook_args):
    args = shlex.split(hook_args)
    return set(args[args.index("--label-sets") + 1].split(","))


def build_env(fn):
    """The function's build-time settings, BUILD_ENV "KEY=VALUE ..." as the Dockerfile writes them."""
    return dict(pair.split("=", 1) for pair in fn.get("build_args", {}).get("BUILD_ENV", "").split())


def dockerfile():
    """Instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                keyword, _, rest = current.strip().partition(" ")
                lines.append((keyword.upper(), rest.strip()))
            current = ""
    return lines


def docker_env():
    env = {}
    for keyword, rest in dockerfile():
        if keyword == "ENV":
            env.update((k, v.strip('"')) for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', rest))
    return env


def docker_args():
    args = {}
    for keyword, rest in dockerfile():
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name, default.strip('"'))
    return args


def template_fprocess():
    return yaml.safe_load((TEMPLATE / "template.yml").read_text())["fprocess"]


HOST_SOURCE = (TEMPLATE / "index.py").read_text()
FUNCTION_THREADS_DEFAULT = int(env_default("FUNCTION_THREADS"))


def threads(env):
    """waitress threads per worker process."""
    return int(env.get("FUNCTION_THREADS", FUNCTION_THREADS_DEFAULT))


def workers(env):
    """Host processes (FUNCTION_WORKERS); each has FUNCTION_THREADS threads, CLIP_THREADS torch threads
    and ceil(CLIP_MAX_QUEUE / workers) of the admission limit."""
    return int(env.get("FUNCTION_WORKERS", 1))


# ------------------------------------------------------------------------------------- the files

@pytest.mark.parametrize("value, expected", [("60s", 60), ("1m5s", 65), ("15m", 900), ("1h", 3600), ("75", 75),
                                             (90, 90), ("1500ms", 1.5), ("5m2s", 302)])
def test_go_durations_are_read_as_the_watchdog_reads_them(value, expected):
    assert seconds(value) == expected


@pytest.mark.parametrize("value", ["60 s", "1 minute", "s", "1m5"])
def test_what_is_not_a_go_duration_is_refused(value):
    with pytest.raises(AssertionError):
        seconds(value)


def test_every_stack_and_manifest_parses():
    assert sorted(p.name for p in ROOT.glob("*.yml")) == sorted(CE_STACKS + PRO_STACKS), \
        "a new top-level stack file must be classified as CE or Pro here"
    for name in CE_STACKS + PRO_STACKS:
        doc = stack(name)
        assert doc["provider"]["name"] == "openfaas" and doc["functions"], name
    manifests = sorted((ROOT / "deploy").rglob("*.y*ml"))
    assert {str(p.relative_to(ROOT)) for p in manifests} >= set(KNATIVE.values())
    for path in manifests:
        docs = load(path.relative_to(ROOT))
        assert docs, path
        for doc in docs:
            assert isinstance(doc, dict), path
    for key in KNATIVE:
        service = knative(key)
        assert service["apiVersion"] == "serving.knative.dev/v1"
        assert service["metadata"]["namespace"] == "clip-classifier"


@pytest.mark.parametrize("name", CE_STACKS + PRO_STACKS)
def test_stack_builds_from_this_repository(name):
    for fn_name, fn in stack(name)["functions"].items():
        handler = ROOT / fn["handler"]
        assert (handler / "handler.py").is_file() and (handler / "__init__.py").is_file(), handler
        assert handler.resolve().parent.parent == ROOT, "handlers live in frontend/ or backend/"
        assert handler.name == fn_name, "the function is named after its folder (DESIGN.md)"
        template = ROOT / "template" / fn["lang"]
        assert (template / "Dockerfile").is_file()
        assert yaml.safe_load((template / "template.yml").read_text())["language"] == fn["lang"]
        assert re.fullmatch(r"[\w.-]+(:\d+)?(/[\w.-]+)+/%s:[\w.-]+" % fn_name, expand(fn["image"])), fn["image"]
        # build_args are only useful when the template's Dockerfile declares them
        assert set(fn.get("build_args", {})) <= set(docker_args()), name


def test_ce_stacks_hold_no_pro_only_settings():
    for name in CE_STACKS:
        for fn in stack(name)["functions"].values():
            labels = fn.get("labels", {})
            scaling = {k.removeprefix("com.openfaas.scale.") for k in labels if k.startswith("com.openfaas.scale.")}
            assert not scaling & set(PRO_ONLY_SCALING), f"{name}: CE rejects {scaling & set(PRO_ONLY_SCALING)}"
            assert scaling <= {"min", "max"}, name
            assert 1 <= int(labels["com.openfaas.scale.min"]) <= int(labels["com.openfaas.scale.max"]) <= 5, name
            annotations = fn.get("annotations") or {}
            assert not [k for k in annotations if k.startswith(("com.openfaas.profile", "com.openfaas.ready.",
                                                                "com.openfaas.health."))], name


@pytest.mark.parametrize("name", PRO_STACKS)
def test_pro_clip_scales_to_zero_on_a_capacity_target_suited_to_batching(name):
    fn = only_function(name)
    labels, env = fn["labels"], fn["environment"]
    assert labels["com.openfaas.scale.zero"] == "true"
    assert seconds(labels["com.openfaas.scale.zero-duration"]) >= 2 * seconds(env["exec_timeout"])
    assert labels["com.openfaas.scale.type"] == "capacity"
    target, batch = int(labels["com.openfaas.scale.target"]), int(env["CLIP_MAX_BATCH"])
    assert target == 2 * batch * workers(env), "two batches in flight per worker: one computing, one filling"
    assert target <= int(env["CLIP_MAX_QUEUE"]) and target <= threads(env) * workers(env)
    assert 0 < float(labels["com.openfaas.scale.target-proportion"]) <= 1
    assert 1 <= int(labels["com.openfaas.scale.min"]) <= int(labels["com.openfaas.scale.max"])
    annotations = fn["annotations"]
    assert annotations["com.openfaas.ready.http.path"] == "/_/health", "lock-gated, answered by the watchdog"
    assert int(annotations["com.openfaas.ready.http.periodSeconds"]) <= 5


def test_variants_share_clip_yml_image_build_and_settings():
    ce, pro, gpu = (only_function(n) for n in ("clip.yml", "clip.pro.yml", "clip.gpu.yml"))
    for key in ("lang", "handler", "image", "build_args", "environment", "requests", "limits"):
        assert pro[key] == ce[key], key
    assert gpu["image"] == ce["image"] + "-cuda"
    assert {k: v for k, v in gpu["build_args"].items() if k != "TORCH_INDEX_URL"} == ce["build_args"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", gpu["build_args"]["TORCH_INDEX_URL"])
    assert gpu["environment"]["CLIP_DEVICE"] == "cuda"
    same = ("read_timeout", "write_timeout", "exec_timeout", "CLIP_DEADLINE_S", "CLIP_PRELOAD_LABEL_SETS")
    assert {k: gpu["environment"][k] for k in same} == {k: ce["environment"][k] for k in same}


def test_gpu_variant_gets_its_gpu_from_a_profile():
    fn = only_function("clip.gpu.yml")
    profiles = [d for p in sorted((ROOT / "deploy" / "openfaas").glob("*.yaml")) for d in load(p.relative_to(ROOT))
                if d.get("kind") == "Profile"]
    (profile,) = [p for p in profiles if p["metadata"]["name"] == fn["annotations"]["com.openfaas.profile"]]
    assert profile["apiVersion"] == "openfaas.com/v1" and profile["metadata"]["namespace"] == "openfaas"
    resources = profile["spec"]["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert "requests" not in fn and "limits" not in fn, "the function spec's resources would override the Profile's"
    env = fn["environment"]
    # every core has a worker's thread, at most two (12 workers x 2 on 16 cores is what was measured)
    limit = cores(resources["limits"]["cpu"])
    assert limit <= int(env["CLIP_THREADS"]) * workers(env) <= 2 * limit
    service = knative("clip-gpu")
    assert int(container(service)["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container(service)["resources"] == resources, "the same sizing on both engines"


@pytest.mark.parametrize("name", CE_STACKS + PRO_STACKS)
def test_environment_names_are_ones_the_code_reads(name):
    for fn in stack(name)["functions"].values():
        code = names_read(*sorted(TEMPLATE.glob("*.py")), *sorted((ROOT / fn["handler"]).glob("*.py")))
        unknown = set(fn.get("environment", {})) - code - WATCHDOG_ENV
        assert not unknown, f"{name}: nothing reads {unknown}"
        knative_env = kenv(knative(SAME_IMAGE[name]))
        assert not set(knative_env) - code - WATCHDOG_ENV


@pytest.mark.parametrize("name", CE_STACKS + PRO_STACKS)
def test_model_and_caches_are_baked_at_build_never_set_at_run_time(name):
    fn = only_function(name)
    runtime = set(fn.get("environment", {})) | set(kenv(knative(SAME_IMAGE[name])))
    assert not runtime & set(BAKED_AT_BUILD), "a different value at run time would miss the baked caches"
    if fn["handler"].endswith("clip"):
        assert (ROOT / fn["handler"] / "build.sh").is_file() and (ROOT / fn["handler"] / "build_ahead.py").is_file()
        assert {"CLIP_MODEL", "CLIP_PRETRAINED"} <= set(build_env(fn)) and "BUILD_HOOK_ARGS" in fn["build_args"]
        preload = set(fn["environment"]["CLIP_PRELOAD_LABEL_SETS"].split(","))
        assert preload <= label_sets(fn["build_args"]["BUILD_HOOK_ARGS"]), "a cold start would embed label sets"


@pytest.mark.parametrize("name", CE_STACKS + PRO_STACKS)
def test_openfaas_and_knative_run_the_same_image_the_same_way(name):
    fn, service = only_function(name), knative(SAME_IMAGE[name])
    c, env = container(service), kenv(service)
    assert c["image"] == expand(fn["image"])
    platform_specific = {"CLIP_URL"}  # the gateway's path on OpenFaaS, the service's address on Knative
    assert {k: str(v) for k, v in fn["environment"].items() if k not in platform_specific} == \
           {k: v for k, v in env.items() if k not in platform_specific}
    if "requests" in fn:
        for kind in ("requests", "limits"):
            assert mebibytes(c["resources"][kind]["memory"]) == mebibytes(fn[kind]["memory"])
            assert cores(c["resources"][kind]["cpu"]) == cores(fn[kind]["cpu"])
        assert mebibytes(fn["requests"]["memory"]) <= mebibytes(fn["limits"]["memory"])
    if "CLIP_THREADS" in env and env.get("CLIP_DEVICE") != "cuda":  # the model computes on these threads
        assert int(env["CLIP_THREADS"]) * workers(env) == cores(c["resources"]["limits"]["cpu"]), \
            "one torch thread per core"
    # the watchdog's port, probed where it is served
    (port,) = c["ports"]
    assert port["containerPort"] == 8080 == c["readinessProbe"]["httpGet"]["port"]
    assert "8080" in [rest for keyword, rest in dockerfile() if keyword == "EXPOSE"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/_/health"
    assert "livenessProbe" not in c, "a liveness probe on /_/health would kill a replica still loading"
    spec = service["spec"]["template"]["spec"]
    assert 0 < spec["containerConcurrency"] <= threads(env) * workers(env)
    assert c["securityContext"]["runAsNonRoot"] is True
    annotations = service["spec"]["template"]["metadata"]["annotations"]
    if fn["handler"].endswith("clip"):
        assert annotations["autoscaling.knative.dev/min-scale"] == "0"
        assert spec["containerConcurrency"] == 2 * int(env["CLIP_MAX_BATCH"]) * workers(env)
        if "com.openfaas.scale.target" in fn["labels"]:
            assert spec["containerConcurrency"] == int(fn["labels"]["com.openfaas.scale.target"])
            utilisation = float(annotations["autoscaling.knative.dev/target-utilization-percentage"]) / 100
            assert utilisation == float(fn["labels"]["com.openfaas.scale.target-proportion"])
    scale = {k: int(annotations[f"autoscaling.knative.dev/{k}"]) for k in ("min-scale", "max-scale")}
    assert scale["max-scale"] >= scale["min-scale"]


@pytest.mark.parametrize("name", ("clip.yml",) + PRO_STACKS)
def test_clip_answers_429_at_once_when_full_rather_than_queueing_in_the_host(name):
    """Admission (CLIP_MAX_QUEUE images) can refuse a request only if a host thread is free to take it:
    with fewer threads, requests wait unbounded in waitress's own queue, never counted, never refused."""
    env = {k: str(v) for k, v in only_function(name)["environment"].items()}
    share = math.ceil(int(env["CLIP_MAX_QUEUE"]) / workers(env))  # each worker's admission limit
    assert share >= int(env["CLIP_MAX_BATCH"]) * 2
    assert threads(env) >= share + int(env["CLIP_MAX_BATCH"])


def test_index_finds_clip_on_each_engine():
    (clip_name,) = stack("clip.yml")["functions"]
    url = only_function("index.yml")["environment"]["CLIP_URL"]
    assert url == f"http://gateway.openfaas:8080/function/{clip_name}" == env_default("CLIP_URL")
    clip = knative("clip")
    assert kenv(knative("index"))["CLIP_URL"] == \
        f"http://{clip['metadata']['name']}.{clip['metadata']['namespace']}.svc.cluster.local"
    assert knative("clip-gpu")["metadata"] == clip["metadata"], "the GPU clip replaces the CPU one for index"


def timeouts():
    """Every hop's timeout in seconds, outermost first, from the files that set it."""
    (ingress,) = load("deploy/openfaas/ingress.yaml")
    (values,) = load("deploy/openfaas/values.yaml")
    nginx = ingress["metadata"]["annotations"]
    index, clip = only_function("index.yml")["environment"], only_function("clip.yml")["environment"]
    return {
        "ingress": min(seconds(nginx["nginx.ingress.kubernetes.io/proxy-read-timeout"]),
                       seconds(nginx["nginx.ingress.kubernetes.io/proxy-send-timeout"])),
        "gateway": min(seconds(values["gateway"]["readTimeout"]), seconds(values["gateway"]["writeTimeout"])),
        "provider": min(seconds(values["faasnetes"]["readTimeout"]), seconds(values["faasnetes"]["writeTimeout"])),
        "upstream": seconds(values["gateway"]["upstreamTimeout"]),
        "index": min(seconds(index[k]) for k in ("read_timeout", "write_timeout", "exec_timeout")),
        "index client": float(index["CLIP_TIMEOUT_S"]),
        "index connect": float(index["CLIP_CONNECT_TIMEOUT_S"]),
        "clip": max(seconds(clip[k]) for k in ("read_timeout", "write_timeout", "exec_timeout")),
        "clip deadline": float(clip["CLIP_DEADLINE_S"]),
        "knative index": float(knative("index")["spec"]["template"]["spec"]["timeoutSeconds"]),
        "knative clip": float(knative("clip")["spec"]["template"]["spec"]["timeoutSeconds"]),
        "ack wait": seconds(values["queueWorker"]["ackWait"]),
    }


def test_probes_never_restart_a_replica_that_is_loading_its_model():
    """faas-netes probes liveness with the same lock-gated /_/health as readiness: the chart's default
    (2 s + 3 x 2 s) would restart clip again and again while it loads its model (5-20 s)."""
    (values,) = load("deploy/openfaas/values.yaml")
    liveness, readiness = values["faasnetes"]["livenessProbe"], values["faasnetes"]["readinessProbe"]
    assert liveness["initialDelaySeconds"] + 3 * liveness["periodSeconds"] >= 60
    assert readiness["periodSeconds"] <= 5, "a loaded replica joins within seconds"
    for key in KNATIVE:
        assert "livenessProbe" not in container(knative(key))


def test_timeouts_line_up_on_every_hop():
    t = timeouts()
    assert t["ingress"] >= t["gateway"] > t["upstream"], "the gateway's upstream timeout sits below read/write"
    assert t["provider"] >= t["upstream"] and t["ack wait"] >= t["upstream"]
    assert t["upstream"] >= t["index"] >= t["index client"] + t["index connect"]
    assert t["index client"] >= t["clip"] >= t["clip deadline"]
    assert t["knative index"] >= t["index"] and t["index client"] >= t["knative clip"] >= t["clip"]
    index = only_function("index.yml")["environment"]
    assert len({index[k] for k in ("read_timeout", "write_timeout", "exec_timeout")}) == 1
    # every clip variant, on every engine, fits inside index's client timeout and holds its deadline
    for name in ("clip.yml",) + PRO_STACKS:
        env = only_function(name)["environment"]
        for key in ("read_timeout", "write_timeout", "exec_timeout"):
            assert float(env["CLIP_DEADLINE_S"]) <= seconds(env[key]) <= t["index client"], (name, key)
    for key in ("clip", "clip-gpu", "index"):
        spec, env = knative(key)["spec"]["template"]["spec"], kenv(knative(key))
        assert all(spec["timeoutSeconds"] >= seconds(env[k]) for k in ("read_timeout", "write_timeout",
                                                                        "exec_timeout")), key
    assert seconds(docker_env()["exec_timeout"]) > 0


def test_deploy_guide_timeout_table_matches_the_files():
    section = DEPLOY_GUIDE.read_text()
    table = section[section.index("## Timeouts"):]
    table = table[:table.index("\n## ", 1)]
    t = timeouts()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("|")}

    def row(key):
        (line,) = [line for name, line in rows.items() if key in name]
        return line
    expected = {"ingress": t["ingress"], "gateway `read_timeout`": t["gateway"], "`upstream_timeout`": t["upstream"],
                "index `read_timeout`": t["index"], "`CLIP_TIMEOUT_S`": t["index client"],
                "clip `read_timeout`": t["clip"], "`CLIP_DEADLINE_S`": t["clip deadline"],
                "Knative index": t["knative index"], "Knative clip": t["knative clip"]}
    for key, value in expected.items():
        assert re.search(r"\b%g ?s\b" % value, row(key)), (key, value, row(key))
    for path in ["clip.yml", "index.yml", "clip.pro.yml", "clip.gpu.yml", *KNATIVE.values(),
                 "deploy/openfaas/values.yaml", "deploy/openfaas/values-pro.yaml", "deploy/openfaas/ingress.yaml",
                 "deploy/openfaas/gpu-profile.yaml"]:
        assert path in section, f"the deploy guide never mentions {path}"


# -------------------------------------------------------------------------------- the Dockerfile

def test_dockerfile_pins_the_watchdog_and_runs_as_a_non_root_user():
    instructions, args = dockerfile(), docker_args()
    assert re.fullmatch(r"ghcr\.io/openfaas/of-watchdog:\d+\.\d+\.\d+", args["WATCHDOG_IMAGE"])
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 3 and froms[0].endswith("${WATCHDOG_IMAGE} AS watchdog"), "multi-stage"
    assert all("${PYTHON_IMAGE}" in f for f in froms[1:]) and re.fullmatch(r"python:[\d.]+-slim-\w+",
                                                                          args["PYTHON_IMAGE"])
    assert ("COPY", "--from=watchdog /fwatchdog /usr/bin/fwatchdog") in instructions
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
    users = [rest for keyword, rest in final if keyword == "USER"]
    user = users[-1].split(":")[0] if users else "root"
    assert user.isdigit() and int(user) >= 1000, "non-root and numeric, so Kubernetes can verify runAsNonRoot"
    assert f"--uid {user}" in DOCKERFILE.read_text(), "the user exists in the image, with a home"
    keywords = [k for k, _ in final]
    assert keywords.index("USER") < keywords.index("CMD") and final[-1] == ("CMD", '["fwatchdog"]')
    (healthcheck,) = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert "/tmp/.lock" in healthcheck


def test_the_watchdog_the_tests_run_is_the_one_the_image_pins():
    """tests/test_watchdog.py and scripts/images use a local fwatchdog: it must be the pinned version."""
    version = docker_args()["WATCHDOG_IMAGE"].rsplit(":", 1)[1]
    assert f"of-watchdog {version}" in (ROOT / "docs" / "images.md").read_text()
    binary = find_fwatchdog()
    if binary is None:
        pytest.skip("no fwatchdog here (FWATCHDOG, PATH or ../shared/bin): only the documented pin is checked")
    said = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    assert f"Version: {version}" in said, said


def test_dockerfile_configures_the_watchdog_for_this_template():
    env = docker_env()
    assert env["fprocess"] == template_fprocess()
    assert env["mode"] == "http" and env["suppress_lock"] == "true" and env["http_buffer_req_body"] == "true"
    assert env["upstream_url"] == "http://127.0.0.1:%s" % env_default("FUNCTION_PORT")
    # the lock file gates /_/ready; with ready_path set and a buffered body, of-watchdog 0.11.6 drops
    # /_/ready connections (tests/test_watchdog.py shows the real watchdog answering it)
    assert "ready_path" not in env
    for key in ("read_timeout", "write_timeout", "exec_timeout", "healthcheck_interval"):
        assert seconds(env[key]) > 0
    lifecycle = (TEMPLATE / "lifecycle.py").read_text()
    assert 'tempfile.gettempdir(), ".lock"' in lifecycle, "the lock file the HEALTHCHECK looks for"


def test_dockerfile_installs_torch_from_pytorchs_index_before_the_requirements():
    args = docker_args()
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.search(r"\btorch==[\d.]+", args["TORCH_PACKAGES"]) and "torchvision" in args["TORCH_PACKAGES"]
    (install,) = [rest for keyword, rest in dockerfile() if keyword == "RUN" and "TORCH_INDEX_URL" in rest]
    torch_at = install.index('--index-url "${TORCH_INDEX_URL}" ${TORCH_PACKAGES}')
    assert install.index("sh needs-torch.sh function/requirements.txt") < torch_at
    assert torch_at < install.index("pip install -r function/requirements.txt")
    assert "--user" not in install and args["PIP_INDEX_URL"]


@pytest.mark.parametrize("requirements, needs", [
    (ROOT / "backend" / "clip" / "requirements.txt", True),
    (ROOT / "frontend" / "index" / "requirements.txt", False),
    (TEMPLATE / "function" / "requirements.txt", False),
    ("torch>=2.3\n", True), ("  torchvision\n", True), ("Torchaudio==2.5\n", True),
    ("open-clip-torch==3.3\n", False),  # a function built on a torch library names torch itself
    ("# torch comes with open-clip-torch\nrequests\n", False), ("torchmetrics-lite\n", False), ("", False),
])
def test_only_functions_built_on_torch_get_torch(requirements, needs, tmp_path):
    if isinstance(requirements, str):
        path = tmp_path / "requirements.txt"
        path.write_text(requirements)
    else:
        path = requirements
    result = subprocess.run(["sh", str(TEMPLATE / "needs-torch.sh"), str(path)])
    assert (result.returncode == 0) == needs


def build_hook_run():
    (run,) = [rest for keyword, rest in dockerfile() if keyword == "RUN" and "function/build.sh" in rest]
    return run


def test_dockerfile_runs_the_functions_own_build_hook_as_the_app_user():
    instructions = dockerfile()
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM"):]
    (hook_at,) = [i for i, (k, rest) in enumerate(final) if k == "RUN" and "function/build.sh" in rest]
    hook = final[hook_at][1]
    assert "[ -f function/build.sh ]" in hook and "${BUILD_HOOK_ARGS}" in hook, "an optional hook"
    assert "${BUILD_ENV}" in hook and "> function.env" in hook, "the settings the function then runs with"
    before = final[:hook_at]
    assert [r for k, r in before if k == "USER"][-1] != "root"
    assert 'load_env_file("function.env")' in HOST_SOURCE
    assert HOST_SOURCE.index('load_env_file("function.env")') < HOST_SOURCE.index("from function import handler")


def test_the_template_names_no_function_and_no_function_setting():
    """The template is generic: each function declares its own build settings and build hook."""
    words = re.compile(r"\b(clip|CLIP_\w+|HF_\w+|index\.yml|open_?clip|huggingface)\b", re.IGNORECASE)
    for path in sorted(p for p in TEMPLATE.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        found = words.findall(path.read_text())
        assert not found, f"{path.relative_to(ROOT)} names {sorted(set(found))}"


def test_dockerfile_copies_only_what_the_faas_cli_build_context_holds(tmp_path):
    sources = []
    for keyword, rest in dockerfile():
        if keyword == "COPY" and "--from=" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += parts[:-1]
    assert "function/" in sources and ("index.py" in sources or "*.py" in sources)
    for function in ("clip", "index"):
        context = layout(ROOT / ("backend" if function == "clip" else "frontend") / function, tmp_path / function)
        for source in sources:
            assert list(context.glob(source)), f"{function}: the build context has no {source}"
        if "*.py" in sources:  # every host module (index.py imports them) is in the image
            assert {"index.py", "settings.py", "observe.py"} <= {p.name for p in context.glob("*.py")}


# ----------------------------------------------------- the build context, run as the image runs it

def start_fprocess(cwd, env):
    """The template's fprocess, from a directory laid out like the container's /home/app."""
    command = shlex.split(template_fprocess())
    assert command[0] == "python"
    port = free_port()
    tmp = Path(cwd).parent / f"tmp-{Path(cwd).name}"
    tmp.mkdir()
    log = tmp / "function.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, *command[1:]], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env, "FUNCTION_PORT": str(port), "TMPDIR": str(tmp)})
    process.log = log
    lock = tmp / ".lock"
    wait_until(lambda: lock.exists() or process.poll() is not None, 120, what=f"{cwd} ready")
    assert process.poll() is None, log.read_text(errors="replace")
    return process, f"http://127.0.0.1:{port}"


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.returncode, process.log.read_text(errors="replace")


def run_env(fn, overrides):
    """The stack's runtime environment minus the watchdog's own variables, plus overrides."""
    return {**{k: str(v) for k, v in fn["environment"].items() if k not in WATCHDOG_ENV}, **overrides}


def test_build_context_starts_with_fprocess_and_classifies_without_building_anything(tmp_path, tiny_model):
    clip_fn, index_fn = only_function("clip.yml"), only_function("index.yml")
    home = tmp_path / "home"
    clip_dir = layout(ROOT / clip_fn["handler"], home / "clip")
    index_dir = layout(ROOT / index_fn["handler"], home / "index")
    # The Dockerfile's build-hook step, run by sh in the build context as the image build runs it: the
    # stack's build arguments, with the tiny test model in place of the real one (no downloads here)
    # and a fresh cache, as a fresh image build has.
    settings = {**build_env(clip_fn), "CLIP_MODEL": f"local-dir:{tiny_model}",
                "CLIP_CACHE_DIR": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    build_args = {"BUILD_ENV": " ".join(f"{k}={v}" for k, v in settings.items()),
                  "BUILD_HOOK_ARGS": clip_fn["build_args"]["BUILD_HOOK_ARGS"]}
    bin_dir = tmp_path / "bin"  # the image's `python` is the venv's here
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    hook = subprocess.run(["sh", "-c", build_hook_run()], cwd=clip_dir, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **build_args, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert hook.returncode == 0, hook.stdout + hook.stderr
    baked = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    dtypes = len(baked_dtypes(cpu_features()).split(","))  # auto bakes bf16 too where it is native
    assert len([p for p in baked if "embeddings" in p.parts]) == \
        dtypes * len(label_sets(build_args["BUILD_HOOK_ARGS"]))
    assert "HF_HUB_OFFLINE=1" in (clip_dir / "function.env").read_text(), "nothing fetched at run time"

    # the host reads the baked settings from function.env: the run-time environment is the stack's only
    clip, clip_url = start_fprocess(clip_dir, run_env(clip_fn, {}))
    try:
        png = noise_image("PNG", seed=5)
        answer = requests.post(clip_url, data=png, headers={"Content-Type": "image/png"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 5 and answer.json()["label_set"] == "cifar100"
        assert requests.get(clip_url + "/ready", timeout=10).status_code == 200  # the watchdog's ready_path
        # a cold start found everything the build made and made nothing itself
        assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == baked

        index, index_url = start_fprocess(index_dir, run_env(index_fn, {"CLIP_URL": clip_url}))
        try:
            via_index = requests.post(index_url, files={"image": ("a.png", png, "image/png")},
                                      headers={"Accept": "application/json"}, timeout=60)
            assert via_index.status_code == 200, via_index.text
            assert via_index.json()["predictions"] == answer.json()["predictions"]
            assert requests.get(index_url + "/ready", timeout=10).status_code == 200
            page = requests.get(index_url, timeout=10)
            assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        finally:
            code, out = stop(index)
            assert code == 0, out
    finally:
        code, out = stop(clip)
    assert code == 0, out
    assert "encoding" not in out, "the function embedded label sets at start-up instead of using the build's"
