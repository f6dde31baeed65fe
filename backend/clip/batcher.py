"""The model thread: dynamic batching of images, plus any other model work (text encoding).

Concurrent requests share one forward pass; a lone request never waits. Every torch computation
of the service runs on this one thread: a second thread using torch starts a second OpenMP pool,
and with more pool threads than cores the pools stop spinning and every forward pass slows down.

A request is admitted first (`admit()`): at most `max_queue` images may be admitted at once,
decoding, queued or being encoded, so latency stays bounded and a request over the limit is refused
before any work is spent on it. Admitted requests decode and preprocess in parallel, then `submit()`
a tensor. One worker thread takes whatever is queued, up to `max_batch`; it waits up to `max_wait`
for more only while admitted requests are still preparing or the last batch was bigger, so a lone
request goes at once.

No request can stop the model thread: a future its request gave up on (cancelled after a deadline)
is skipped, an exception fails only its own batch, and `healthy()` turns False if the loop ever dies
or stays on one piece of work longer than `stall_s`, so the host can take the replica out of service.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

from .config import Settings
from .errors import DeadlineExceeded, QueueFull

LOG = logging.getLogger("batcher")
T = TypeVar("T")
Ticket = dict[str, bool]  # admit()'s: {"counted": still counted as preparing}
# on_batch(size, queue waits in s (one per image), encode s): after each forward pass (the edge's metrics)
BatchHook = Callable[[int, list[float], float], None]


class Encoded(NamedTuple):
    """What a submitted image's Future gives: its feature row and the batch it rode in (seq, size)."""

    row: Any
    batch: tuple[int, int]


class Batcher:
    """max_batch has no default (0 in the settings means "the device's default", which the model
    knows); the other limits default to the settings' own defaults (config.Settings)."""

    def __init__(
        self,
        encode: Callable[[list[Any]], Iterable[Any]],
        max_batch: int,
        max_wait_s: float = Settings.max_wait_ms / 1000,
        max_queue: int = Settings.max_queue,
        stall_s: float = Settings.stall_s,
    ):
        self.encode = encode
        self.stall_s = stall_s
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: deque = deque()
        self._jobs: deque = deque()
        self._job_next = True
        self._preparing = 0
        self._admitted = 0
        self._last_size = 1
        self._cond = threading.Condition()
        self.batches = 0  # forward passes so far: the last one's sequence number
        self.images = 0
        self.jobs = 0  # other work run here (text encodings), between batches
        self.on_batch: BatchHook | None = None  # what the batcher measured, for the edge to record
        self._busy_since: float | None = None  # when the piece of work in hand started (None: idle)
        self.failure: BaseException | None = None  # why the loop died, if it did
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def admit(self, images: int) -> Iterator[Ticket]:
        """Admit a request of `images` images for its whole life (raises QueueFull when that would
        pass max_queue); it counts as preparing until submit(), which hands over in one step."""
        ticket: Ticket = {"counted": True}
        with self._cond:
            if self._admitted + images > self.max_queue:
                raise QueueFull()
            self._admitted += images
            self._preparing += 1
        try:
            yield ticket
        finally:
            with self._cond:
                self._admitted -= images
                self._release(ticket)
                self._cond.notify_all()

    def prepared(self, ticket: Ticket) -> None:
        """The admitted request will submit no images (text embeddings): image batches stop waiting for it."""
        with self._cond:
            self._release(ticket)
            self._cond.notify_all()

    def full(self) -> bool:
        """Whether not even one more image could be admitted now: a hint read without the lock (admit()
        decides), so that a request can be refused before its body is parsed."""
        return self._admitted >= self.max_queue

    def _release(self, ticket: Ticket | None) -> None:  # call with the lock held
        if ticket and ticket["counted"]:
            ticket["counted"] = False
            self._preparing -= 1

    def call(self, fn: Callable[[], T], deadline: float | None = None) -> T:
        """Run fn() on the model thread, between batches; returns its result (or raises its error).
        With a deadline (time.monotonic()), raises DeadlineExceeded when it has not run by then."""
        future: Future[T] = Future()
        with self._cond:
            self._jobs.append((fn, future, deadline))
            self._cond.notify_all()
        return wait(future, deadline)

    def healthy(self) -> bool:
        """False once the loop has died or has been on one piece of work for longer than stall_s."""
        busy_since = self._busy_since
        stalled = busy_since is not None and time.monotonic() - busy_since > self.stall_s
        return self._thread.is_alive() and not stalled

    def problem(self) -> str | None:
        if self.failure is not None:
            return f"the model thread died: {self.failure!r}"
        if not self._thread.is_alive():
            return "the model thread is gone"
        if not self.healthy():
            return f"the model thread has been on one batch for over {self.stall_s:g} s"
        return None

    def submit(self, items: Sequence[Any], deadline: float, ticket: Ticket | None = None) -> list[Future[Encoded]]:
        """Queue prepared images; returns one Future per image (its Encoded row)."""
        with self._cond:
            futures: list[Future[Encoded]] = [Future() for _ in items]
            queued_at = time.monotonic()
            self._queue.extend((t, f, deadline, queued_at) for t, f in zip(items, futures))
            self._release(ticket)  # queued and no longer preparing: the worker sees both at once
            self._cond.notify_all()
        return futures

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def admitted(self) -> int:
        return self._admitted

    def _next(self) -> tuple[Any, list[tuple[Any, Future[Encoded], float, float]] | None]:
        """The next piece of work: a job, or a batch of images; jobs and batches take turns."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._jobs)
            if self._jobs and (self._job_next or not self._queue):
                self._job_next = False
                return self._jobs.popleft(), None
            self._job_next = True
            batch = [self._queue.popleft()]
            until = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = until - time.monotonic()
                # Wait only for company that is on its way: requests still decoding, or as many as the
                # last batch held (clients answered together come back together). Alone: go now.
                if remaining <= 0 or (self._preparing == 0 and len(batch) >= self._last_size):
                    break
                self._cond.wait(remaining)
            self._last_size = len(batch)
            return None, batch

    def _run(self) -> None:
        try:
            while True:
                job, batch = self._next()
                self._busy_since = time.monotonic()
                if job:
                    self._run_job(*job)
                elif batch:
                    self._run_batch(batch)
                self._busy_since = None
        except BaseException as exc:  # a bug in the loop itself: say so; healthy() turns False
            self.failure = exc
            LOG.critical("model thread died: %r", exc, exc_info=True)

    def _run_job(self, fn: Callable[[], Any], future: Future[Any], deadline: float | None) -> None:
        if not future.set_running_or_notify_cancel():
            return  # its caller gave up
        if deadline is not None and deadline < time.monotonic():
            future.set_exception(DeadlineExceeded())
            return
        self.jobs += 1
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)

    def _run_batch(self, batch: list[tuple[Any, Future[Encoded], float, float]]) -> None:
        now = time.monotonic()
        live = []
        for item, future, deadline, queued_at in batch:
            if not future.set_running_or_notify_cancel():
                continue  # its request gave up (deadline): nobody is waiting
            if deadline < now:
                future.set_exception(DeadlineExceeded())
            else:
                live.append((item, future, now - queued_at))
        if not live:
            return
        try:
            features = self.encode([item for item, _, _ in live])
        except Exception as exc:  # e.g. out of memory: fail these requests, keep serving
            for _, future, _ in live:
                future.set_exception(exc)
            return
        self.batches += 1
        self.images += len(live)
        batch_id = (self.batches, len(live))
        if self.on_batch:
            try:
                self.on_batch(len(live), [waited for _, _, waited in live], time.monotonic() - now)
            except Exception:  # a recording that fails never takes the model thread down
                LOG.exception("on_batch failed")
        for row, (_, future, _) in zip(features, live):
            future.set_result(Encoded(row, batch_id))


def wait(future: Future[T], deadline: float | None) -> T:
    """The future's result, waiting no later than deadline (None: no limit); past it, the future is
    cancelled (skipped if not started) and DeadlineExceeded raised."""
    try:
        return future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        future.cancel()
        raise DeadlineExceeded() from None
