"""FUNCTION_WORKERS: several template-host processes behind the one port, as real processes.

Most tests use a probe function (tests/support/probe_function: no model, says which process answered);
the last ones run clip itself with two workers."""
import math
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from support.held import Held
from support.servers import FunctionProcess, wait_until

from localrun.functions import FUNCTION_DIRS

FUNCTION_DIRS.setdefault("probe", Path(__file__).parent / "support" / "probe_function")


def probe(tmp_path, workers=3, **env):
    return FunctionProcess("probe", tmp_path, {"FUNCTION_WORKERS": str(workers), **env})


def worker_processes(fn):
    return psutil.Process(fn.host_pid).children()


def ask(fn, through_watchdog=False, **params):
    """One request on a new connection, to the template host's own port: a watchdog in front keeps one
    connection to the host for requests that come one after another, so they would all meet one worker."""
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(fn.url if through_watchdog else fn.host_url, params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_worker_answers_on_the_one_port(tmp_path):
    with probe(tmp_path, workers=3) as fn:
        assert len(worker_processes(fn)) == 3
        answers = [ask(fn) for _ in range(150)]
        assert {a["worker"] for a in answers} == {"0", "1", "2"}
        assert {a["workers"] for a in answers} == {"3"}
        assert {a["pid"] for a in answers} == {p.pid for p in worker_processes(fn)}


def test_concurrent_requests_through_the_watchdog_reach_every_worker(tmp_path):
    """The watchdog opens a connection to the host for each request it holds at once; the kernel spreads
    those among the workers (SO_REUSEPORT)."""
    with probe(tmp_path, workers=2) as fn, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: ask(fn, through_watchdog=True, sleep="0.5"), range(32)))
    assert {a["worker"] for a in answers} == {"0", "1"}


def test_the_lock_file_waits_for_the_slowest_worker(tmp_path):
    fn = probe(tmp_path, workers=2, PROBE_INIT_S_1="6").start(wait_ready=False)
    try:
        first = fn.tmp / "worker-0" / ".lock"
        wait_until(first.exists, 120, 0.02, "worker 0 ready")
        assert not (fn.tmp / "worker-1" / ".lock").exists()
        assert not fn.lock.exists(), "ready while worker 1 is still in init()"
        fn.wait_ready()
        assert (fn.tmp / "worker-1" / ".lock").exists()
    finally:
        fn.stop()


def test_without_a_prometheus_dir_the_workers_share_a_fresh_one(tmp_path):
    fn = probe(tmp_path, workers=2)
    fn.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with fn:
        dirs = {ask(fn)["prometheus_dir"] for _ in range(40)}
        assert len(dirs) == 1 and Path(dirs.pop()).is_dir()


def test_sigterm_drains_every_worker(tmp_path):
    """Requests held in both workers' handlers when SIGTERM comes: the lock file goes at once, every one
    is answered once let go, and every process exits."""
    # The workers share one listening socket, and whichever accepts first gets the connection: a worker
    # starved of CPU (a busy neighbour on its core) could lose every race. A worker stops accepting at
    # FUNCTION_CONNECTIONS, counted by waitress with its own listening socket and wake-up pipe: 6 is
    # 4 requests each, so the next ones go to the other worker and both hold by the 8th.
    fn = probe(tmp_path, workers=2, FUNCTION_CONNECTIONS="6").start()
    held = Held(tmp_path / "held")
    with ThreadPoolExecutor(32) as pool:
        asked = []
        while len(asked) < 8 or len(set(held.holding())) < 2:
            assert len(asked) < 32, f"32 connections and one worker holds them all: {held.holding()}"
            asked.append(pool.submit(ask, fn, **held.params))
            wait_until(lambda: len(held.holding()) == len(asked), 30, 0.005, "the request in a handler")
        children, host = worker_processes(fn), psutil.Process(fn.host_pid)
        fn.process.send_signal(signal.SIGTERM)
        wait_until(lambda: not fn.lock.exists(), 30, 0.01, "lock removed")
        assert not any(f.done() for f in asked) and fn.process.poll() is None
        held.release()
        answers = [f.result() for f in asked]  # every request in flight is answered
    assert {a["worker"] for a in answers} == {"0", "1"}
    assert fn.process.wait(30) == 0
    # behind a watchdog the host ends its own drain just after the watchdog has gone (in a container,
    # PID 1's exit would end it there and then)
    wait_until(lambda: not host.is_running() or host.status() == psutil.STATUS_ZOMBIE, 30, 0.05, "host exited")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)
    fn.stop()


def test_a_worker_that_dies_is_replaced(tmp_path):
    with probe(tmp_path, workers=2) as fn:
        victim = worker_processes(fn)[0]
        victim.kill()
        wait_until(lambda: victim.pid not in {p.pid for p in worker_processes(fn)} and
                   len(worker_processes(fn)) == 2, 30, 0.05, "worker replaced")
        fn.wait_ready()
        assert fn.process.poll() is None
        answers = {ask(fn)["pid"] for _ in range(60)}
        assert victim.pid not in answers and answers == {p.pid for p in worker_processes(fn)}


def test_a_worker_whose_init_fails_ends_the_function(tmp_path):
    fn = probe(tmp_path, workers=2, PROBE_FAIL_INIT="1").start(wait_ready=False)
    try:
        assert fn.process.wait(120) == 1, "exits, so the platform restarts it"
        assert not fn.lock.exists()
        assert "init failed on purpose" in fn.output()
    finally:
        fn.stop()


# ---- clip with two workers ------------------------------------------------------------------------

def test_clip_shares_its_queue_limit_among_workers(clip_env, tmp_path):
    """Each worker admits its share of CLIP_MAX_QUEUE; a request with more pictures than that could never
    be admitted, so the pictures per request follow the share: shown in GET, refused with a 400 that
    names it (not a 429 'retry shortly' that no retry can pass), even on an idle function."""
    from support.images import image_bytes
    env = {**clip_env, "FUNCTION_WORKERS": "2", "CLIP_MAX_QUEUE": "7"}
    with FunctionProcess("clip", tmp_path, env) as fn:
        described = [ask(fn)["limits"] for _ in range(20)]
        assert {limits["max_queue"] for limits in described} == {math.ceil(7 / 2)}
        assert {limits["max_images"] for limits in described} == {4}
        response = requests.post(fn.url, data=image_bytes("PNG"), timeout=60)
        assert response.status_code == 200 and response.json()["predictions"]
        for _ in range(4):  # on new connections: whichever worker takes it
            five = requests.post(fn.host_url, files=[("image", ("a.png", image_bytes("PNG")))] * 5, timeout=60)
            assert five.status_code == 400 and five.json()["error"]["code"] == "too_many_images", five.text
            assert "At most 4 images" in five.json()["error"]["message"]
        four = requests.post(fn.url, files=[("image", ("a.png", image_bytes("PNG")))] * 4, timeout=60)
        assert four.status_code == 200 and len(four.json()["results"]) == 4
