"""Dynamic batching: concurrent requests share forward passes; a lone request goes alone, at once."""
import threading
import time

import pytest
import torch
from clip.batcher import Batcher, DeadlineExceeded, QueueFull


class RecordingEncoder:
    def __init__(self, delay=0.0):
        self.sizes = []
        self.delay = delay

    def __call__(self, batch):
        self.sizes.append(len(batch))
        time.sleep(self.delay)
        return torch.stack(batch).flatten(1) * 2


def test_a_lone_request_is_encoded_alone_and_correctly():
    encoder = RecordingEncoder()
    batcher = Batcher(encoder, max_batch=8, max_wait_s=5.0)  # a long wait that must not be taken
    with batcher.admit(1) as ticket:
        future = batcher.submit([torch.ones(3)], time.monotonic() + 60, ticket)[0]
    assert torch.equal(future.result(timeout=2), torch.full((3,), 2.0))  # far less than max_wait
    assert encoder.sizes == [1]


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    encoder = RecordingEncoder(delay=0.05)
    batcher = Batcher(encoder, max_batch=8, max_wait_s=0.05)
    results = {}
    start = threading.Barrier(8)

    def request(i):
        start.wait()
        with batcher.admit(1) as ticket:
            results[i] = batcher.submit([torch.full((2,), float(i))], time.monotonic() + 60, ticket)[0].result(10)
    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(torch.equal(results[i], torch.full((2,), 2.0 * i)) for i in range(8))
    assert sum(encoder.sizes) == 8 and len(encoder.sizes) < 8 and max(encoder.sizes) <= 8


def test_requests_over_the_queue_limit_are_refused_before_any_work_and_expired_ones_not_encoded():
    gate = threading.Event()
    batcher = Batcher(lambda b: (gate.wait(10), torch.stack(b).flatten(1))[1], max_batch=1, max_queue=3)
    with batcher.admit(1) as ticket:
        first = batcher.submit([torch.zeros(1)], time.monotonic() + 60, ticket)[0]  # occupies the worker
        time.sleep(0.05)
        with batcher.admit(1) as ticket:
            late = batcher.submit([torch.zeros(1)], time.monotonic() - 1, ticket)[0]  # past its deadline
            with batcher.admit(1):  # still decoding: it counts as much as a queued image
                for images in (1, 4):
                    with pytest.raises(QueueFull):
                        with batcher.admit(images):
                            pass
            with batcher.admit(1):  # one left: admitted again
                pass
            gate.set()
            assert first.result(5) is not None
            with pytest.raises(DeadlineExceeded):
                late.result(5)
    assert batcher.admitted == 0
    with batcher.admit(3):  # everything released: the whole limit is free again
        pass


def test_a_request_that_gave_up_cannot_kill_the_model_thread():
    """The request behind a slow one times out and cancels; the worker must skip it, not die."""
    batcher = Batcher(RecordingEncoder(delay=0.6), max_batch=8, max_wait_s=0.01, max_queue=64)
    slow = batcher.submit([torch.ones(1)], time.monotonic() + 10)[0]  # occupies the model
    time.sleep(0.05)
    behind = batcher.submit([torch.ones(1)], time.monotonic() + 0.2)[0]
    with pytest.raises(DeadlineExceeded):
        from clip.batcher import wait
        wait(behind, time.monotonic() + 0.2)
    assert behind.cancelled()
    assert slow.result(timeout=5) is not None
    after = batcher.submit([torch.full((1,), 3.0)], time.monotonic() + 10)[0]
    assert torch.equal(after.result(timeout=5), torch.full((1,), 6.0))
    assert batcher.healthy() and batcher.problem() is None


def test_an_encoding_error_fails_only_its_batch():
    calls = []

    def encode(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return torch.stack(batch).flatten(1)
    batcher = Batcher(encode, max_batch=1)
    with pytest.raises(RuntimeError):
        batcher.submit([torch.ones(1)], time.monotonic() + 10)[0].result(5)
    assert batcher.submit([torch.ones(1)], time.monotonic() + 10)[0].result(5) is not None


def test_jobs_are_bounded_by_their_deadline_and_skipped_once_given_up():
    gate = threading.Event()
    batcher = Batcher(lambda b: (gate.wait(10), torch.stack(b).flatten(1))[1], max_batch=1)
    batcher.submit([torch.zeros(1)], time.monotonic() + 60)  # holds the model thread
    time.sleep(0.05)
    ran = []
    with pytest.raises(DeadlineExceeded):
        batcher.call(lambda: ran.append(1), deadline=time.monotonic() + 0.1)
    gate.set()
    assert batcher.call(lambda: "next", deadline=time.monotonic() + 5) == "next"
    assert ran == []  # the job its caller gave up on never ran


def test_a_stalled_or_dead_model_thread_is_reported_unhealthy():
    gate = threading.Event()
    batcher = Batcher(lambda b: (gate.wait(10), torch.stack(b).flatten(1))[1], max_batch=1, stall_s=0.2)
    assert batcher.healthy()
    batcher.submit([torch.zeros(1)], time.monotonic() + 60)
    time.sleep(0.4)
    assert not batcher.healthy() and "over 0.2 s" in batcher.problem()
    gate.set()
    time.sleep(0.1)
    assert batcher.healthy()
    batcher._next = None  # a bug in the loop itself: the thread dies on its next turn
    batcher.submit([torch.zeros(1)], time.monotonic() + 60)
    deadline = time.monotonic() + 5
    while batcher.healthy() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not batcher.healthy() and "died" in batcher.problem()
