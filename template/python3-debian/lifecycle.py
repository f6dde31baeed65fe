"""The host's lifecycle, as of-watchdog (suppress_lock=true) expects it: readiness and drain.

Readiness: the function's optional init() runs once in the background; the lock file ($TMPDIR/.lock)
is written only after it returns, so the watchdog's /_/health and /_/ready answer 503 until then.
Drain (SIGTERM): the lock goes first, then the host keeps answering until nothing is in flight and,
when a watchdog started it, until that watchdog has exited: the watchdog forwards SIGTERM at once
but holds the connections (bodies still uploading included) and keeps proxying them to this host
until it has drained them itself.

What is in flight is seen through public means only: the app counts the requests it handles
(InFlight, from the call to the response iterable's close()), and the listening socket handed to
waitress (its documented `sockets` argument) is a Listener, whose connections note whether they hold
bytes received but not yet answered (an upload still arriving, a request waiting for a thread) or
an answer the kernel has not yet taken.
"""

import logging
import os
import socket
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

import settings

LOG = logging.getLogger("host")
LOCK_FILE = os.path.join(tempfile.gettempdir(), ".lock")
# Drain ends once nothing has been busy for this long: what the app handed over reaches the socket.
QUIET_S = 0.2
# of-watchdog passes its own environment to the process it starts: fprocess names this host.
STARTED_BY_WATCHDOG = bool(os.environ.get("fprocess"))
# A worker (FUNCTION_WORKERS) is the host's child, not the watchdog's: the host names the watchdog here.
WATCHDOG_PID = "FUNCTION_WATCHDOG_PID"


# Read at start: once the watchdog is gone (SIGKILLed), the parent is init, which never exits.
PARENT_AT_START = os.getppid()


def watchdog_pid() -> int | None:
    """The of-watchdog that started this host (the parent, or the parent's parent for a worker)."""
    if not STARTED_BY_WATCHDOG:
        return None
    return int(os.environ.get(WATCHDOG_PID) or PARENT_AT_START)


def _running(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: existence only
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def load_env_file(path: str) -> None:
    """Settings the image build baked in (function.env, KEY=VALUE lines); the environment wins."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            os.environ.setdefault(key.strip(), value.strip())


class InFlight:
    """Counts requests being handled, so SIGTERM can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.count += 1

    def leave(self) -> None:
        with self.lock:
            self.count -= 1


class Connection(socket.socket):
    """An accepted connection that notes, as the server reads and writes it, whether it is busy:
    bytes came in after the last answer went out, or the last write was not taken whole. (waitress
    reads with recv() and writes with send(); sendall() would not be seen.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unanswered = False
        self.unsent = False

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if data:
            self.unanswered = True
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            sent = super().send(data, flags)
        except BlockingIOError:
            self.unsent = True
            raise
        self.unanswered = False
        self.unsent = sent < len(data)
        return sent

    def busy(self) -> bool:
        return self.unanswered or self.unsent


class Listener(socket.socket):
    """A listening socket whose accepted connections are Connections, all of them known."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: weakref.WeakSet[Connection] = weakref.WeakSet()

    @classmethod
    def wrap(cls, sock: socket.socket) -> "Listener":
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def accept(self) -> tuple:
        conn, addr = super().accept()
        tracked = Connection(conn.family, conn.type, conn.proto, fileno=conn.detach())
        self.connections.add(tracked)
        return tracked, addr

    def busy(self) -> bool:
        """Whether an open connection holds a request not yet answered or an answer not yet sent."""
        return any(conn.fileno() != -1 and conn.busy() for conn in list(self.connections))


def write_lock() -> None:
    with open(LOCK_FILE, "w"):
        pass


def remove_lock() -> None:
    try:
        os.remove(LOCK_FILE)
    except FileNotFoundError:
        pass


def start_warm_up(init: Callable[[], None] | None, alive: Callable[[], bool] | None = None) -> None:
    """Run init() in the background, then write the lock; a failed init exits so the platform restarts.
    Once ready, alive() is polled: False (the function can no longer serve) removes the lock and exits 1,
    so the platform replaces the replica instead of keeping one that looks healthy.

    init() runs on a thread that ends when it returns, and alive() is polled from another: what a thread
    keeps for its life goes with it. An OpenMP runtime (libgomp, as torch uses) keeps a pool of worker
    threads per thread that ran parallel work; with more pooled threads than CPUs, every pool stops
    spinning between parallel regions and sleeps instead, which made each forward pass on the function's
    own model thread up to 1.5x slower (docs/performance.md)."""

    def warm_up() -> None:
        try:
            if init is not None:
                init()
        except settings.SettingError as error:  # a setting read late, in init(): the same one line
            exit_for_setting(error)
        except Exception:
            LOG.exception("function init failed; exiting so the platform restarts it")
            os._exit(1)
        write_lock()
        LOG.info("ready: lock file %s written", LOCK_FILE)
        if alive is not None:
            threading.Thread(target=watch, name="alive", daemon=True, args=(alive,)).start()

    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()


def watch(alive: Callable[[], bool]) -> None:
    """Poll alive() once ready; False removes the lock and exits 1."""
    while True:
        time.sleep(settings.host()["FUNCTION_ALIVE_INTERVAL_S"])
        if not _still_alive(alive):
            remove_lock()
            LOG.critical("the function can no longer serve; exiting so the platform replaces it")
            logging.shutdown()
            os._exit(1)


def exit_for_setting(error: settings.SettingError) -> NoReturn:
    """A bad setting: its one line (no traceback: the line says it all), then exit 78 (EX_CONFIG)."""
    LOG.error("%s", error)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(settings.EX_CONFIG)


def _still_alive(alive: Callable[[], bool]) -> bool:
    try:
        return bool(alive())
    except Exception:
        LOG.exception("the function's alive() failed")
        return False


def drain_then_exit(busy: Callable[[], bool], shutdown: Callable[[], None] | None = None) -> None:
    """SIGTERM: lock first (readiness red), then wait for busy() and the watchdog, then the function's
    optional shutdown() (e.g. a worker leaving shared metrics), then exit 0."""
    remove_lock()
    watchdog = watchdog_pid()
    LOG.info("SIGTERM: lock removed, draining%s", " until the watchdog exits" if watchdog else "")
    time.sleep(0.05)  # let requests already accepted reach the app
    deadline = time.monotonic() + settings.host()["DRAIN_TIMEOUT_S"]
    quiet_since = None
    while time.monotonic() < deadline:
        if busy() or (watchdog is not None and _running(watchdog)):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            break
        time.sleep(0.02)
    if shutdown is not None:
        try:
            shutdown()
        except Exception:
            LOG.exception("the function's shutdown() failed")
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)
