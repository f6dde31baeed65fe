"""The real faas-cli (0.18.12: $FAAS_CLI, PATH or ../shared/bin) against this repository: the CRDs it
generates from each stack carry the stack's settings, and `faas-cli invoke` works against the local
stack (scripts/serve) as the README says."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from support.images import noise_image

from localrun.of_watchdog import find_tool

ROOT = Path(__file__).resolve().parents[1]
FAAS_CLI = find_tool("faas-cli", "FAAS_CLI")
STACKS = ("clip.yml", "index.yml", "clip.pro.yml", "clip.gpu.yml")

pytestmark = pytest.mark.skipif(not FAAS_CLI, reason="no faas-cli: set FAAS_CLI, put it on PATH or in ../shared/bin")


def faas_cli(*args, stdin=None, env=None):
    return subprocess.run([FAAS_CLI, *args], cwd=ROOT, input=stdin, capture_output=True, timeout=120,
                          env={**os.environ, **(env or {})})


def expand(image):
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), image)


def answer_of(stdout):
    """The function's JSON answer: faas-cli prints a line about its auth config first when it has none."""
    return json.loads(stdout[stdout.index(b"{"):])


@pytest.mark.parametrize("name", STACKS)
def test_generated_crds_carry_the_stacks_timeouts_limits_and_labels(name):
    result = faas_cli("generate", "-f", name)
    assert result.returncode == 0, result.stderr.decode()
    crds = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    functions = yaml.safe_load((ROOT / name).read_text())["functions"]
    assert sorted(crd["metadata"]["name"] for crd in crds) == sorted(functions)
    for crd in crds:
        fn, spec = functions[crd["metadata"]["name"]], crd["spec"]
        assert crd["apiVersion"] == "openfaas.com/v1" and crd["kind"] == "Function"
        assert spec["image"] == expand(fn["image"])
        assert spec["environment"] == {k: str(v) for k, v in fn["environment"].items()}
        for key in ("read_timeout", "write_timeout", "exec_timeout"):
            assert spec["environment"][key] == fn["environment"][key]
        assert spec.get("labels") == {k: str(v) for k, v in fn.get("labels", {}).items()}
        assert (spec.get("annotations") or {}) == {k: str(v) for k, v in (fn.get("annotations") or {}).items()}
        for kind in ("limits", "requests"):
            assert spec.get(kind) == fn.get(kind), kind


def test_faas_cli_invoke_classifies_through_the_local_gateway(stack):
    """faas-cli calls /function/clip.openfaas-fn, as on OpenFaaS; the local gateway answers it."""
    jpeg = noise_image("JPEG", seed=4)
    result = faas_cli("invoke", "clip", "--gateway", stack.url, stdin=jpeg)
    assert result.returncode == 0, result.stderr.decode()
    answer = answer_of(result.stdout)
    assert len(answer["predictions"]) == 5 and answer["label_set"] == "cifar100"
    described = faas_cli("invoke", "clip", "--gateway", stack.url, "--method", "GET", stdin=b"")
    assert described.returncode == 0 and answer_of(described.stdout)["ready"] is True
