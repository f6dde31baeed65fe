"""Real servers on loopback for the tests: the functions run from faas-cli-style build contexts,
or the whole local stack (scripts/gateway.py) as `scripts/serve` runs it."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from layout import layout  # noqa: E402

FUNCTION_DIRS = {"clip": ROOT / "backend" / "clip", "index": ROOT / "frontend" / "index"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout=120.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


class FunctionProcess:
    """One function, started with the template's fprocess from its own build context."""

    def __init__(self, name, workdir, env=None):
        self.name = name
        self.dir = layout(FUNCTION_DIRS[name], Path(workdir) / name)
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = self.tmp / ".lock"
        self.env = {**os.environ, "FUNCTION_PORT": str(self.port), "TMPDIR": str(self.tmp), **(env or {})}
        self.process = None
        self.log = open(self.dir / "function.log", "wb")

    def start(self, wait_ready=True):
        self.process = subprocess.Popen([sys.executable, "index.py"], cwd=self.dir, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=180):
        wait_until(lambda: self.lock.exists() or self.process.poll() is not None, timeout, what=f"{self.name} ready")
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")

    def output(self):
        self.log.flush()
        return (self.dir / "function.log").read_text(errors="replace")[-4000:]

    def stop(self, timeout=60):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode if self.process else None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Stack:
    """The whole local stack (gateway + both functions), as `scripts/serve` runs it."""

    def __init__(self, workdir, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.process = None
        self.log = open(self.workdir / "gateway.log", "wb")

    def start(self):
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "gateway.py"), "--port", str(self.port),
             "--build-dir", str(self.workdir / "build")],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

        def ready():
            if self.process.poll() is not None:
                return True
            names = ["index"] if self.env.get("CLIP_URL") else ["clip", "index"]
            try:
                return all(requests.get(f"{self.url}/function/{name}/_/health", timeout=2).status_code == 200
                           for name in names)
            except requests.RequestException:
                return False
        wait_until(ready, 180, 0.2, "local stack ready")
        if self.process.poll() is not None:
            raise RuntimeError(f"gateway exited:\n{(self.workdir / 'gateway.log').read_text()[-4000:]}")
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
