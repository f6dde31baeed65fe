"""The function images, built once per test session by scripts/images (faas-cli + podman), and run with
podman as the stacks say: containers checked from outside through the watchdog's port 8080 only."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from support.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
# The images the tests build: the stacks' names under a test registry, so a user's images stay apart.
TEST_ENV = {"REGISTRY": "localhost/serverless-clip-test", "TAG": "test"}
# PyTorch's index may be unreachable (it is where these tests run): PyPI's torch, a bigger image.
TORCH_INDEX_URL = os.environ.get("TEST_TORCH_INDEX_URL", "https://pypi.org/simple")
MEASURED = ROOT / "build" / "images-test" / "measured.json"


def podman_env() -> dict[str, str]:
    from localrun.images import podman_env as env  # the same containers.conf scripts/images builds with
    return env()


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout,
                          check=check)


def missing_tools() -> list[str]:
    from localrun.of_watchdog import find_fwatchdog, find_tool
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if not shutil.which(tool)]
    missing += [] if find_tool("faas-cli", "FAAS_CLI") else ["faas-cli"]
    missing += [] if find_fwatchdog() else ["fwatchdog"]
    return missing


def stack_function(name: str) -> dict:
    (fn,) = yaml.safe_load((ROOT / f"{name}.yml").read_text())["functions"].values()
    return fn


def record(key: str, value) -> None:
    """Keep a measurement for docs/images.md (build/images-test/measured.json)."""
    data = json.loads(MEASURED.read_text()) if MEASURED.exists() else {}
    data[key] = value
    MEASURED.parent.mkdir(parents=True, exist_ok=True)
    MEASURED.write_text(json.dumps(data, indent=2, sort_keys=True))


def build_images(tiny_model: Path, label_sets: Path) -> dict[str, str]:
    """clip (the tiny model baked in, as a user bakes a local model, and a label-set folder copied over the
    function's own label_sets/, as docs/images.md says) and index, via scripts/images."""
    settings = "CLIP_MODEL=local-dir:/home/app/function/tiny CLIP_PRETRAINED=none"
    command = [sys.executable, "-m", "localrun.images", "clip", "index",
               "--build-arg", f"TORCH_INDEX_URL={TORCH_INDEX_URL}", "--build-arg", f"BUILD_ENV={settings}",
               "--add", f"clip:{tiny_model}", "--add", f"clip:{label_sets}"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **TEST_ENV}, timeout=1800,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    record("build_s", round(time.monotonic() - started, 1))
    clip, index = result.stdout.split()
    return {"clip": clip, "index": index}


class Container:
    """One function container, run as its stack says (uid 12000, memory limit, read-only root, the
    stack's environment), reached on the watchdog's port only."""

    def __init__(self, image: str, name: str, fn: dict, env: dict[str, str] | None = None,
                 network: str | None = None):
        self.name, self.port = f"{name}-{os.getpid()}-{free_port()}", free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**{k: str(v) for k, v in fn["environment"].items()}, **(env or {})}
        self.args = ["run", "-d", "--name", self.name, "--user", "12000:12000", "--read-only",
                     "-p", f"127.0.0.1:{self.port}:8080"]
        if "limits" in fn:
            self.args += ["--memory", fn["limits"]["memory"].replace("Mi", "m")]
        if network:
            self.args += ["--network", network, "--network-alias", name]
        for key, value in environment.items():
            self.args += ["-e", f"{key}={value}"]
        self.args.append(image)

    def start(self) -> "Container":
        self.started = time.monotonic()
        podman(*self.args)
        return self

    def status(self, path: str = "/_/health") -> int | None:
        try:
            return requests.get(self.url + path, timeout=3).status_code
        except requests.RequestException:
            return None

    def wait_ready(self, timeout: float = 180) -> float:
        wait_until(lambda: self.status() == 200 or not self.running(), timeout, 0.1, f"{self.name} ready")
        assert self.running(), self.logs()
        return time.monotonic() - self.started

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name, check=False).stdout.strip()

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-6000:]

    def remove(self) -> None:
        for _ in range(3):  # rm can fail on a stopping container (no systemd for its healthcheck timer)
            podman("rm", "-f", "-t", "5", self.name, check=False)
            if podman("container", "exists", self.name, check=False).returncode != 0:
                return
            time.sleep(1)

    def __enter__(self) -> "Container":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
