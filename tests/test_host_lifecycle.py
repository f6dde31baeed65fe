"""The template host's warm-up: init() runs on a thread of its own that ends once the function is ready.

Why a user notices: torch's OpenMP runtime keeps a pool of worker threads for every thread that ran parallel
work, for that thread's life. A warm-up thread that stayed to poll alive() kept the pool init() made (loading
and warming the model) beside the model thread's own; with more pooled threads than CPUs, libgomp stops
spinning between parallel regions, and each forward pass was up to 1.5x slower (700 context switches per
request instead of 140, ViT-B-32 on 2 cores: docs/performance.md)."""

import os
import threading

import lifecycle


def test_init_runs_on_a_thread_that_has_ended_when_alive_is_polled(tmp_path, monkeypatch):
    monkeypatch.setattr(lifecycle, "LOCK_FILE", str(tmp_path / ".lock"))
    monkeypatch.setenv("FUNCTION_ALIVE_INTERVAL_S", "0.01")
    threads: dict[str, threading.Thread] = {}
    polled = threading.Event()

    def init() -> None:
        threads["init"] = threading.current_thread()

    def alive() -> bool:
        threads["alive"] = threading.current_thread()
        polled.set()
        threading.Event().wait()  # parked for the rest of the session: it never answers False (that exits)
        return True

    lifecycle.start_warm_up(init, alive)
    assert polled.wait(30), "alive() was never polled"
    assert os.path.exists(lifecycle.LOCK_FILE), "polled before the function was ready"
    threads["init"].join(30)
    assert not threads["init"].is_alive(), "init()'s thread is still there once the function is ready"
    assert threads["alive"] is not threads["init"]
