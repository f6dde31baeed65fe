"""The local gateway in its own process (`python -m localrun.gateway`, what `scripts/serve` runs), started
and waited for until healthy: the one gateway runner of the tests, scripts/bench and scripts/loadtest."""

import os
import subprocess
import sys
from pathlib import Path

import requests

from localrun.layout import ROOT
from localrun.processes import free_port, terminate, wait_until


class Stack:
    """The gateway and the functions it runs (both, or index alone when env has CLIP_URL), as
    `scripts/serve` runs them; with `upstreams` ({name: port}) the gateway only proxies to functions
    already running; with `watchdog` (the path of fwatchdog) each function runs behind it. Its output goes
    to workdir/gateway.log, its build contexts to workdir/build."""

    def __init__(self, workdir, env=None, upstreams=None, watchdog=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.build_dir = self.workdir / "build"
        self.env = {**os.environ, **(env or {})}
        self.upstreams = dict(upstreams or {})
        self.watchdog = watchdog
        self.process = None
        self.log = open(self.workdir / "gateway.log", "wb")

    @property
    def names(self):
        """The functions behind the gateway."""
        if self.upstreams:
            return list(self.upstreams)
        return ["index"] if self.env.get("CLIP_URL") else ["clip", "index"]

    def start(self, timeout=180, interval=0.2):
        command = [
            sys.executable,
            "-m",
            "localrun.gateway",
            "--port",
            str(self.port),
            "--build-dir",
            str(self.build_dir),
        ]
        command += [f"--upstream={name}={port}" for name, port in self.upstreams.items()]
        command += [f"--watchdog={self.watchdog}"] if self.watchdog else []
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

        def ready():
            if self.process.poll() is not None:
                return True
            try:
                return all(
                    requests.get(f"{self.url}/function/{name}/_/health", timeout=2).status_code == 200
                    for name in self.names
                )
            except requests.RequestException:
                return False

        wait_until(ready, timeout, interval, "local stack ready")
        if self.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.output()[-4000:]}")
        return self

    def function_process(self, name):
        """The psutil.Process of function `name`, a child of the gateway running in build_dir/name."""
        import psutil  # requirements-dev.txt: only the tests and benchmarks ask

        directory = (self.build_dir / name).resolve()
        for child in psutil.Process(self.process.pid).children():
            try:
                if Path(child.cwd()).resolve() == directory:
                    return child
            except psutil.Error:
                pass
        raise RuntimeError(f"{name} process not found under the gateway")

    def output(self):
        self.log.flush()
        return (self.workdir / "gateway.log").read_text(errors="replace")

    def stop(self, timeout=90):
        terminate(self.process, timeout, kill_tree=True)
        self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
