"""A function as a local process, run from a build context laid out like faas-cli's (template host
index.py + handler in function/): exactly what a container runs. Used by the local gateway
(scripts/serve), the tests, the benchmark and the load test."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from layout import ROOT, layout

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

    def __init__(self, name, workdir, env=None, log_to_file=True):
        self.name = name
        self.dir = layout(FUNCTION_DIRS[name], Path(workdir) / name)
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = self.tmp / ".lock"
        self.env = {**os.environ, "FUNCTION_PORT": str(self.port), "TMPDIR": str(self.tmp), **(env or {})}
        self.process = None
        self.log = open(self.dir / "function.log", "wb") if log_to_file else None  # None: our stdout

    def start(self, wait_ready=True):
        self.process = subprocess.Popen([sys.executable, "index.py"], cwd=self.dir, env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT if self.log else None)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=180):
        wait_until(lambda: self.lock.exists() or self.process.poll() is not None, timeout, what=f"{self.name} ready")
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")

    def healthy(self):
        """What of-watchdog's /_/health answers: the process runs and wrote its lock file."""
        return self.process is not None and self.process.poll() is None and self.lock.exists()

    def output(self):
        if self.log is None:
            return ""
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
        if self.log:
            self.log.close()
        return self.process.returncode if self.process else None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
