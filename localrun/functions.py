"""A function as a local process, run from a build context laid out like faas-cli's (template host
index.py + handler in function/): exactly what a container runs. Used by the local gateway
(scripts/serve), the tests, the benchmark and the load test. Given the path of fwatchdog (localrun.of_watchdog
finds it), the function runs behind the real of-watchdog as in its image: `url` and `port` are then
the watchdog's, `host_url` the template host's own. Where network namespaces can be made (localrun.netns),
each watchdog gets a network of its own, as in its container, so any number run side by side.
The host behind a watchdog gets SIGTERM when its watchdog dies (setpriv's parent-death signal), as a
container's processes end with its first; with die_with_parent the function's own process does when
whoever started it dies, SIGKILL included (scripts/serve)."""

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from localrun import netns
from localrun.layout import ROOT, layout
from localrun.of_watchdog import watchdog_env
from localrun.processes import free_port, stop_group, terminate, wait_until

FUNCTION_DIRS = {"clip": ROOT / "backend" / "clip", "index": ROOT / "frontend" / "index"}
PR_SET_PDEATHSIG = 1


def die_with_this_process() -> Callable[[], None]:
    """A preexec_fn that has the child sent SIGTERM when its parent dies (PR_SET_PDEATHSIG survives
    exec, so nsenter and the watchdog keep it). Linux sends it when the *thread* that started the child
    ends: start children this way only from a thread that lives as long as the process."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: no signal would ever come
            os._exit(1)

    return preexec


def die_with_watchdog() -> list[str]:
    """The command prefix that has the host sent SIGTERM when the watchdog that started it dies."""
    return ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []


class FunctionProcess:
    """One function, started with the template's fprocess from its own build context, alone or behind
    the of-watchdog binary `watchdog`. env's FUNCTION_PORT, if given, is the port clients use; `replaces`,
    a stopped FunctionProcess whose address and port this one takes over; `die_with_parent`, the
    function gets SIGTERM when this process dies, SIGKILL included (start() it from the main thread).
    (of-watchdog 0.11.6 serves its metrics on :8081, always: one watchdog per network namespace, where
    localrun.netns can make one.)"""

    def __init__(
        self,
        name: str,
        workdir: str | Path,
        env: Mapping[str, str] | None = None,
        log_to_file: bool = True,
        watchdog: str | None = None,
        replaces: "FunctionProcess | None" = None,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.dir = layout(FUNCTION_DIRS[name], Path(workdir) / name)
        self.tmp = self.dir / "tmp"
        self.tmp.mkdir(exist_ok=True)
        env = dict(env or {})
        self.port: int = int(env.pop("FUNCTION_PORT", 0)) or (replaces.port if replaces else free_port())
        # absolute: the watchdog is started from the build context, in a namespace of its own
        self.watchdog = os.path.abspath(watchdog) if watchdog else None
        self.die_with_parent = die_with_parent
        slot = replaces.network.slot if replaces and replaces.network else None
        self.network: netns.Network | None = netns.Network(slot) if watchdog and netns.problem() is None else None
        address, host_address = (self.network.inside, self.network.outside) if self.network else ("127.0.0.1",) * 2
        self.host_port = free_port() if self.watchdog else self.port
        self.address = (address, self.port)  # where clients connect
        self.host_address = (host_address, self.host_port)  # where the template host listens
        self.url = f"http://{address}:{self.port}"
        self.host_url = f"http://{host_address}:{self.host_port}"
        self.lock = self.tmp / ".lock"
        self.env = {
            "MALLOC_ARENA_MAX": "2",  # as the template's image sets it (memory goes back after big decodes)
            **os.environ,
            "FUNCTION_PORT": str(self.host_port),
            "TMPDIR": str(self.tmp),
            **env,
        }
        if self.network:
            self.env["FUNCTION_HOST"] = host_address  # the host stays in our network, on our end of the pair
        if self.watchdog:
            back = netns.Network.back() if self.network else []
            self.env.update(
                watchdog_env(
                    die_with_watchdog() + back + [sys.executable], self.host_url, self.port, free_port(), self.env
                )
            )
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = open(self.dir / "function.log", "wb") if log_to_file else None  # None: our stdout

    def start(self, wait_ready: bool = True) -> Self:
        command = [self.watchdog] if self.watchdog else [sys.executable, "index.py"]
        if self.network:
            command = self.network.enter() + command
        # its own process group: the host the watchdog starts is stopped with it, never left behind
        self.process = subprocess.Popen(
            command,
            cwd=self.dir,
            env=self.env,
            start_new_session=True,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log else None,
            preexec_fn=die_with_this_process() if self.die_with_parent else None,
        )
        if wait_ready:
            self.wait_ready()
        return self

    @property
    def started(self) -> subprocess.Popen[bytes]:
        """The process start() started."""
        if self.process is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.process

    def wait_ready(self, timeout: float = 180) -> None:
        process = self.started
        wait_until(lambda: self.lock.exists() or process.poll() is not None, timeout, what=f"{self.name} ready")
        if process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {process.returncode}:\n{self.output()}")

    @property
    def host_pid(self) -> int:
        """The template host's process id (the watchdog's child when behind one)."""
        if not self.watchdog:
            return self.started.pid
        # any of the watchdog's threads may have forked it (Go), so each thread's children are read
        threads = Path(f"/proc/{self.started.pid}/task").iterdir()
        children = [pid for thread in threads for pid in (thread / "children").read_text().split()]
        return int(children[0])

    def healthy(self) -> bool:
        """What of-watchdog's /_/health answers: the process runs and wrote its lock file."""
        return self.process is not None and self.process.poll() is None and self.lock.exists()

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        return (self.dir / "function.log").read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 60) -> int | None:
        terminate(self.process, timeout)
        if self.process and self.watchdog:
            stop_group(self.process.pid, timeout)  # the host exits once its watchdog has
        if self.log:
            self.log.close()
        if self.network:
            self.network.close()
        return self.process.returncode if self.process else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
