"""The local gateway in its own process (`python -m localrun.gateway`, what `scripts/serve` runs), started
and waited for until healthy: the one gateway runner of the tests, scripts/bench and scripts/loadtest."""

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import requests

from localrun.layout import ROOT
from localrun.processes import free_port, terminate, wait_until

if TYPE_CHECKING:
    import psutil


class Stack:
    """The gateway and the functions it runs (both, or index alone when env has CLIP_URL), as
    `scripts/serve` runs them; with `upstreams` ({name: port}) the gateway only proxies to functions
    already running; with `watchdog` (the path of fwatchdog) each function runs behind it. Its output goes
    to workdir/gateway.log, its build contexts to workdir/build."""

    def __init__(
        self,
        workdir: str | Path,
        env: Mapping[str, str] | None = None,
        upstreams: Mapping[str, int] | None = None,
        watchdog: str | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.build_dir = self.workdir / "build"
        self.env = {**os.environ, **(env or {})}
        self.upstreams = dict(upstreams or {})
        self.watchdog = watchdog
        self.process: subprocess.Popen[bytes] | None = None
        self.log = open(self.workdir / "gateway.log", "wb")

    @property
    def names(self) -> list[str]:
        """The functions behind the gateway."""
        if self.upstreams:
            return list(self.upstreams)
        return ["index"] if self.env.get("CLIP_URL") else ["clip", "index"]

    def start(self, timeout: float = 180, interval: float = 0.2) -> Self:
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
        self.process = process = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )

        def ready() -> bool:
            if process.poll() is not None:
                return True
            try:
                return all(
                    requests.get(f"{self.url}/function/{name}/_/health", timeout=2).status_code == 200
                    for name in self.names
                )
            except requests.RequestException:
                return False

        wait_until(ready, timeout, interval, "local stack ready")
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{self.output()[-4000:]}")
        return self

    def function_process(self, name: str) -> "psutil.Process":
        """The psutil.Process of function `name`, a child of the gateway running in build_dir/name."""
        import psutil  # requirements-dev.txt: only the tests and benchmarks ask

        if self.process is None:
            raise RuntimeError("the gateway is not started")
        directory = (self.build_dir / name).resolve()
        for child in psutil.Process(self.process.pid).children():
            try:
                if Path(child.cwd()).resolve() == directory:
                    return child
            except psutil.Error:
                pass
        raise RuntimeError(f"{name} process not found under the gateway")

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "gateway.log").read_text(errors="replace")

    def stop(self, timeout: float = 90) -> None:
        terminate(self.process, timeout, kill_tree=True)
        self.log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
