"""Several host processes behind the one upstream port: FUNCTION_WORKERS=N (default 1: no supervisor).

The first process becomes a supervisor. It binds the port once and starts N workers, each this same
index.py with the listening socket inherited (FUNCTION_LISTEN_FD), its own handler.init() and its own
lock file (TMPDIR=$TMPDIR/worker-<i>); the kernel gives each new connection to whichever worker
accepts it first, and connections wait in the shared backlog while a worker is replaced.

- Readiness: the watchdog's lock file is written only while every worker has written its own.
- SIGTERM/SIGINT: the lock file goes first, then every worker gets SIGTERM and drains its requests;
  the supervisor exits once all of them have.
- A worker that dies after it was ready is replaced (readiness is red until the new one is ready).
  A worker that dies before it was ever ready (its init() failed), or five deaths within a minute,
  end the function with status 1, so the platform restarts it; a worker that stopped on a bad setting
  (status 78, its one line logged) ends it with 78.
- PROMETHEUS_MULTIPROC_DIR, when unset, is set to a fresh empty directory shared by the workers.
Each worker sees FUNCTION_WORKERS (to share out function-wide limits) and FUNCTION_WORKER (its index).
"""

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import lifecycle
import settings

LOG = logging.getLogger("host.workers")
LISTEN_FD = "FUNCTION_LISTEN_FD"
MAX_DEATHS, DEATH_WINDOW_S = 5, 60.0
POLL_S = 0.05


def count() -> int:
    return int(settings.host()["FUNCTION_WORKERS"])


def is_supervisor() -> bool:
    return count() > 1 and LISTEN_FD not in os.environ


def listen_socket(host: str, port: int) -> socket.socket:
    """The socket to serve on: the one inherited from the supervisor in a worker, else a new one."""
    if LISTEN_FD in os.environ:
        return socket.socket(fileno=int(os.environ[LISTEN_FD]))
    return bind(host, port)


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on host:port (a name, an IPv4 or an IPv6 address)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=backlog)


def _die_with_parent() -> None:  # runs in the child before exec: a SIGKILLed supervisor leaves no orphans
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, index: int, root: str, fd: int) -> None:
        self.index, self.fd = index, fd
        self.dir = os.path.join(root, f"worker-{index}")
        os.makedirs(self.dir, exist_ok=True)
        self.lock = os.path.join(self.dir, ".lock")
        self.process: subprocess.Popen  # set by start()
        self.was_ready = False

    def start(self) -> None:
        if os.path.exists(self.lock):
            os.remove(self.lock)
        env = {**os.environ, LISTEN_FD: str(self.fd), "FUNCTION_WORKER": str(self.index), "TMPDIR": self.dir}
        watchdog = lifecycle.watchdog_pid()
        if watchdog:  # a worker drains until the watchdog has gone, as a lone host does
            env[lifecycle.WATCHDOG_PID] = str(watchdog)
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(sys.argv[0])], env=env, pass_fds=(self.fd,), preexec_fn=_die_with_parent
        )
        self.was_ready = False

    def ready(self) -> bool:
        if self.process.poll() is None and os.path.exists(self.lock):
            self.was_ready = True
            return True
        return False


def supervise(host: str, port: int, lock_file: str, drain_timeout_s: float) -> int:
    """Run the workers until SIGTERM (returns 0) or until they cannot be kept running (returns 1)."""
    n = count()
    listener = bind(host, port, backlog=2048)
    listener.set_inheritable(True)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-multiproc-")
    workers = [Worker(i, tempfile.gettempdir(), listener.fileno()) for i in range(n)]
    stop: list[int | str] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.append(signum))
    for worker in workers:
        worker.start()
    LOG.info("%d workers serving on http://%s:%d", n, host, port)
    deaths: list[float] = []
    status = 0
    while not stop:
        for worker in workers:
            code = worker.process.poll()
            if code is None:
                continue
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < DEATH_WINDOW_S] + [now]
            if code == settings.EX_CONFIG and not worker.was_ready:  # a bad setting: its line is logged
                stop.append("failed")
                status = settings.EX_CONFIG
                break
            if not worker.was_ready or len(deaths) >= MAX_DEATHS:
                LOG.error(
                    "worker %d exited with %s %s; exiting so the platform restarts the function",
                    worker.index,
                    code,
                    "before it was ready"
                    if not worker.was_ready
                    else f"({len(deaths)} deaths within {DEATH_WINDOW_S:g} s)",
                )
                stop.append("failed")
                status = 1
                break
            LOG.warning("worker %d exited with %s; starting a new one", worker.index, code)
            worker.start()
        all_ready = [w.ready() for w in workers]  # every worker's state, so was_ready is current
        _set(lock_file, all(all_ready) and not stop)
        time.sleep(POLL_S)
    _set(lock_file, False)  # readiness red first, before anything else
    _drain(workers, drain_timeout_s)
    listener.close()
    return status


def _set(lock_file: str, ready: bool) -> None:
    if ready and not os.path.exists(lock_file):
        with open(lock_file, "w"):
            pass
        LOG.info("ready: every worker is ready, lock file %s written", lock_file)
    elif not ready and os.path.exists(lock_file):
        os.remove(lock_file)


def _drain(workers: list, drain_timeout_s: float) -> None:
    alive = [w.process for w in workers if w.process.poll() is None]
    for process in alive:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout_s + 5  # each worker waits up to DRAIN_TIMEOUT_S itself
    for process in alive:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
