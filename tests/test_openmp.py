"""Idle OpenMP workers stop spinning soon after a forward pass (clip/openmp.py).

Why a user notices: libgomp's default keeps an idle pool worker busy-waiting for 7–10 ms after every
parallel region. On a 2-core function that is a core taken from the request threads after every batch,
just when its answers go out and the next pictures come in: fewer images per second under load
(docs/performance.md, "Idle OpenMP workers stop spinning")."""

import os
import subprocess
import sys
import textwrap

import pytest
import requests
from clip import openmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process: optionally clip's setting, then torch, then parallel work with pauses longer than any
# spin; prints the CPU time (ms) the threads other than the main one used: the pool's worker spinning.
SPIN_PROBE = textwrap.dedent(
    """
    import os, sys, threading, time
    if sys.argv[1] == "clip":
        from clip import openmp
        print(openmp.configure(), file=sys.stderr)
    import torch
    torch.set_num_threads(2)
    x = torch.ones(1_000_000)
    x.add_(1)  # the pool starts
    def others_ms():
        me, total = threading.get_native_id(), 0
        for tid in os.listdir("/proc/self/task"):
            if int(tid) != me:
                fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        return total * 1000 / os.sysconf("SC_CLK_TCK")
    before = others_ms()
    for _ in range(30):
        x.add_(1)  # one parallel region over both threads
        time.sleep(0.03)  # longer than any spin: whatever a worker spins, it spins in full
    print(others_ms() - before)
    """
)


def spin_ms(mode: str) -> float:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
        "PYTHONPATH": os.path.join(ROOT, "backend"),
    }
    done = subprocess.run(
        [sys.executable, "-c", SPIN_PROBE, mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1])


def test_clip_sets_a_short_spin_unless_the_deployment_chose_a_wait_policy():
    environ: dict[str, str] = {}
    assert openmp.configure(environ, loaded=()) == "GOMP_SPINCOUNT=10000 (clip's default)"
    assert environ == {"GOMP_SPINCOUNT": "10000"}

    for name, value in (("GOMP_SPINCOUNT", "500000"), ("OMP_WAIT_POLICY", "active")):
        theirs = {name: value}
        assert openmp.configure(theirs, loaded=()) == f"{name}={value} (set by the deployment)"
        assert theirs == {name: value}

    late: dict[str, str] = {}
    assert "torch was loaded before" in openmp.configure(late, loaded=("torch",))
    assert late == {}, "set after libgomp read its settings, it would only mislead"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: torch runs no OpenMP pool to spin")
def test_idle_pool_workers_spin_a_fraction_of_what_libgomp_alone_spins():
    alone, with_clip = spin_ms("libgomp default"), spin_ms("clip")
    # libgomp's default, 300,000 spins, is milliseconds per region on any x86 (PAUSE costs 10–140 cycles)
    assert alone >= 30, f"libgomp's default spun only {alone:.0f} ms over 30 regions: this probe sees nothing"
    assert with_clip <= alone / 4, f"idle workers still spin: {with_clip:.0f} ms against {alone:.0f} ms by default"


def test_the_function_says_what_it_set_before_torch_loaded(clip_server):
    described = requests.get(clip_server.url, timeout=30).json()
    # what clip sets in a process that has not loaded torch yet, given this environment (the function's)
    assert described["openmp_wait"] == openmp.configure(dict(os.environ), loaded=())
