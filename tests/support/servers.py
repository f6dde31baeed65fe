"""Real servers on loopback for the tests: single functions (FunctionProcess) or the whole local
stack (scripts/gateway.py) as `scripts/serve` runs it."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from local_functions import FunctionProcess, free_port, wait_until  # noqa: E402,F401


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
