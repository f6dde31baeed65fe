"""Dynamic batching: concurrent requests share forward passes; a lone request goes alone, at once."""
import threading
import time

import pytest
import torch
from clip.batcher import Batcher, Encoded
from clip.errors import DeadlineExceeded, QueueFull
from support.servers import wait_until


class RecordingEncoder:
    """Doubles its batch and records its size; `started` is set once a batch is on the model thread.
    With a gate, the first batch waits there until the test opens it: the model is held busy for as
    long as the test needs, whatever the machine's speed."""

    def __init__(self, gate=None):
        self.sizes = []
        self.started = threading.Event()
        self.gate = gate

    def __call__(self, batch):
        self.sizes.append(len(batch))
        self.started.set()
        if self.gate is not None and len(self.sizes) == 1:
            assert self.gate.wait(30), "the test never opened the gate"
        return torch.stack(batch).flatten(1) * 2


def held_model():
    gate = threading.Event()
    return RecordingEncoder(gate), gate


def test_a_lone_request_is_encoded_alone_and_correctly():
    encoder = RecordingEncoder()
    batcher = Batcher(encoder, max_batch=8, max_wait_s=5.0)  # a long wait that must not be taken
    with batcher.admit(1) as ticket:
        future = batcher.submit([torch.ones(3)], time.monotonic() + 60, ticket)[0]
    assert torch.equal(future.result(timeout=2).row, torch.full((3,), 2.0))  # far less than max_wait
    assert encoder.sizes == [1] and future.result().batch == (1, 1)  # the first batch, of one


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    """While the model is busy, the requests that arrive wait together and go in one batch."""
    encoder, gate = held_model()
    batcher = Batcher(encoder, max_batch=8, max_wait_s=0.05)
    results = {}

    def request(i):
        with batcher.admit(1) as ticket:
            results[i] = batcher.submit([torch.full((2,), float(i))], time.monotonic() + 60, ticket)[0].result(30).row
    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    wait_until(lambda: encoder.started.is_set() and encoder.sizes[0] + batcher.depth == 8, 30, 0.005,
               "all 8 queued behind the first batch")
    gate.set()
    [t.join() for t in threads]
    assert all(torch.equal(results[i], torch.full((2,), 2.0 * i)) for i in range(8))
    assert sum(encoder.sizes) == 8 and len(encoder.sizes) <= 2, encoder.sizes  # the rest in one batch


def test_requests_over_the_queue_limit_are_refused_before_any_work_and_expired_ones_not_encoded():
    encoder, gate = held_model()
    batcher = Batcher(encoder, max_batch=1, max_queue=3)
    with batcher.admit(1) as ticket:
        first = batcher.submit([torch.zeros(1)], time.monotonic() + 60, ticket)[0]  # occupies the worker
        assert encoder.started.wait(30)
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
    encoder, gate = held_model()
    batcher = Batcher(encoder, max_batch=8, max_wait_s=0.01, max_queue=64)
    slow = batcher.submit([torch.ones(1)], time.monotonic() + 60)[0]  # occupies the model
    assert encoder.started.wait(30)
    behind = batcher.submit([torch.ones(1)], time.monotonic() + 0.2)[0]
    with pytest.raises(DeadlineExceeded):
        from clip.batcher import wait
        wait(behind, time.monotonic() + 0.2)
    assert behind.cancelled()
    gate.set()
    assert slow.result(timeout=5) is not None
    after = batcher.submit([torch.full((1,), 3.0)], time.monotonic() + 10)[0]
    assert torch.equal(after.result(timeout=5).row, torch.full((1,), 6.0))
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
    encoder, gate = held_model()
    batcher = Batcher(encoder, max_batch=1)
    batcher.submit([torch.zeros(1)], time.monotonic() + 60)  # holds the model thread
    assert encoder.started.wait(30)
    ran = []
    with pytest.raises(DeadlineExceeded):
        batcher.call(lambda: ran.append(1), deadline=time.monotonic() + 0.1)
    gate.set()
    assert batcher.call(lambda: "next", deadline=time.monotonic() + 5) == "next"
    assert ran == []  # the job its caller gave up on never ran


def test_a_stalled_or_dead_model_thread_is_reported_unhealthy():
    encoder, gate = held_model()
    batcher = Batcher(encoder, max_batch=1, stall_s=0.2)
    assert batcher.healthy()
    batcher.submit([torch.zeros(1)], time.monotonic() + 60)
    assert encoder.started.wait(30)
    wait_until(lambda: not batcher.healthy(), 30, 0.02, "reported stalled")
    assert "over 0.2 s" in batcher.problem()
    gate.set()
    wait_until(batcher.healthy, 30, 0.02, "healthy again once the batch is done")
    batcher._next = None  # a bug in the loop itself: the thread dies on its next turn
    batcher.submit([torch.zeros(1)], time.monotonic() + 60)
    deadline = time.monotonic() + 5
    while batcher.healthy() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not batcher.healthy() and "died" in batcher.problem()


def test_each_row_says_its_batch_and_the_batch_is_reported_to_the_callback():
    """What a forward pass measured goes out two ways, with nothing pinned on the futures: each image's
    Encoded row names its batch (seq, size), and on_batch gets the size, each image's queue wait and the
    encode time (the edge records them as metrics)."""
    encoder, gate = held_model()
    batcher = Batcher(encoder, max_batch=8, max_wait_s=0.05)
    reported = []
    batcher.on_batch = lambda size, waits, encode_s: reported.append((size, list(waits), encode_s))
    first = batcher.submit([torch.ones(1)], time.monotonic() + 60)[0]  # held on the model thread
    assert encoder.started.wait(30)
    rest = batcher.submit([torch.ones(1), torch.ones(1), torch.ones(1)], time.monotonic() + 60)
    gate.set()
    assert isinstance(first.result(5), Encoded) and first.result().batch == (1, 1)
    assert {future.result(5).batch for future in rest} == {(2, 3)}
    assert [size for size, _, _ in reported] == [1, 3]
    assert all(len(waits) == size and min(waits) >= 0 and encode_s >= 0 for size, waits, encode_s in reported)


def test_a_failing_callback_never_stops_the_model_thread():
    batcher = Batcher(RecordingEncoder(), max_batch=1)
    batcher.on_batch = lambda *args: 1 / 0
    assert batcher.submit([torch.ones(1)], time.monotonic() + 10)[0].result(5).row is not None
    assert batcher.submit([torch.ones(1)], time.monotonic() + 10)[0].result(5).batch == (2, 1)
    assert batcher.healthy()
