"""Small process helpers shared by the local runtime, the tests and the benchmarks: a free loopback
port, waiting for a condition, and stopping a process (SIGTERM, a wait, then SIGKILL)."""

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], object], timeout: float = 120.0, interval: float = 0.1, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


def stop_group(pgid: int, timeout: float) -> None:
    """Wait for what is left of a process group to exit; kill it past the timeout."""

    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
            return False
        except ProcessLookupError:
            return True

    try:
        wait_until(gone, timeout, 0.05, "process group exited")
    except TimeoutError:
        os.killpg(pgid, signal.SIGKILL)


def terminate(process: subprocess.Popen[Any] | None, timeout: float, kill_tree: bool = False) -> int | None:
    """SIGTERM to a running subprocess.Popen, then up to `timeout` s for it to exit; past that SIGKILL,
    to its descendants too when kill_tree (as they were when SIGTERM went). Returns its exit status."""
    if process is None:
        return None
    if process.poll() is None:
        descendants = []
        if kill_tree:
            import psutil  # only the tests and benchmarks need it (requirements-dev.txt)

            try:
                descendants = psutil.Process(process.pid).children(recursive=True)
            except psutil.Error:
                pass
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            for child in descendants:
                try:
                    child.kill()
                except Exception:  # psutil.Error: gone already
                    pass
            process.kill()
            process.wait()
    return process.returncode
