"""One deadline for a whole exchange with clip (connect, send, the whole answer), kept by one thread for
the process. At its deadline an exchange's socket is shut down: that ends a read blocked on an answer
that drips (a per-read timeout does not: every byte that arrives starts it again, and one buffered read
waits for many bytes)."""

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

THREAD_NAME = "clip-deadlines"


class Exchange:
    """One call to clip, ended at its deadline: `with Exchange(seconds) as exchange: ...`."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.done = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "Exchange":
        self._token = _current.set(self)
        _WATCH.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.done = True  # the watch drops it at its deadline without touching the socket
            self._sock = None  # the pool's again: not held here until then
        _current.reset(self._token)

    def attach(self, connection: HTTPConnection) -> None:
        """The socket the exchange uses (http.client drops its own reference once the answer says it will
        close the connection, so it is kept here)."""
        with self._lock:
            self._sock = connection.sock or self._sock
            if self.expired:
                self._shut()

    def expire(self) -> None:
        with self._lock:
            if not self.done:
                self.expired = True
                self._shut()

    def _shut(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a recv or send blocked on it in another thread
            except OSError:
                pass


class _Watch:
    """The one thread that ends exchanges at their deadlines: it sleeps until the earliest one. An
    exchange that ended in time stays queued until its deadline (a few per request in flight)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._queue: list[tuple[float, int, Exchange]] = []
        self._order = itertools.count()  # ties on the deadline never compare exchanges
        self._pid: int | None = None  # the process whose thread runs (threads do not survive a fork)

    def add(self, exchange: Exchange) -> None:
        with self._changed:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name=THREAD_NAME, daemon=True).start()
            heapq.heappush(self._queue, (exchange.deadline, next(self._order), exchange))
            if self._queue[0][2] is exchange:  # earlier than what the thread sleeps until
                self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue or self._queue[0][0] > time.monotonic():
                    self._changed.wait(self._queue[0][0] - time.monotonic() if self._queue else None)
                _, _, exchange = heapq.heappop(self._queue)
            exchange.expire()


_WATCH = _Watch()
_current: ContextVar[Exchange | None] = ContextVar("clip_exchange", default=None)


def _attached(request: Callable[..., None]) -> Callable[..., None]:
    """A connection's request(), telling the current exchange which connection it uses (connected or
    reused), and shutting it at once if the deadline passed while it connected or sent."""

    def wrapper(connection: HTTPConnection, *args: Any, **kwargs: Any) -> None:
        exchange = _current.get()
        if exchange is not None:
            exchange.attach(connection)
        request(connection, *args, **kwargs)
        if exchange is not None:
            exchange.attach(connection)

    return wrapper


class _HTTPConnection(HTTPConnection):
    request = _attached(HTTPConnection.request)  # type: ignore[assignment]


class _HTTPSConnection(HTTPSConnection):
    request = _attached(HTTPSConnection.request)  # type: ignore[assignment]


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def session() -> requests.Session:
    """A session whose connections tell the current Exchange which socket to shut at its deadline."""
    made = requests.Session()
    made.trust_env = False  # a proxy from the environment must not reroute in-cluster traffic
    made.mount("http://", _Adapter(pool_maxsize=32))
    made.mount("https://", _Adapter(pool_maxsize=32))
    return made
