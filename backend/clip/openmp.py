"""How long the model thread's idle OpenMP workers spin: set before torch loads libgomp.

libgomp (the OpenMP of PyTorch's Linux wheels) reads GOMP_SPINCOUNT once, when it loads. Its default,
300,000 spins, keeps a worker busy-waiting for 7–10 ms after every forward pass (a 2-core AMD EPYC,
tests/test_openmp.py); with a core per pool thread, that is a core taken from the request threads just
when a batch's answers go out and the next requests come in (and CPU quota spent on nothing). 10,000
spins (well under a millisecond) still cover the gaps between one forward pass's parallel regions:
batch-1 latency did not move (docs/performance.md, "Idle OpenMP workers stop spinning").

A GOMP_SPINCOUNT or OMP_WAIT_POLICY of the deployment's own is kept.
"""

import os
import sys
from collections.abc import Container, MutableMapping

SPINCOUNT = "10000"
ENV = "GOMP_SPINCOUNT"


def configure(environ: MutableMapping[str, str] = os.environ, loaded: Container[str] = sys.modules) -> str:
    """Set GOMP_SPINCOUNT unless the deployment chose a wait policy; returns what is in effect, as GET
    shows it. `loaded`: the modules already imported (torch there: libgomp has read its settings)."""
    for name in (ENV, "OMP_WAIT_POLICY"):
        if environ.get(name):
            return f"{name}={environ[name]} (set by the deployment)"
    if "torch" in loaded:
        return "libgomp's default (torch was loaded before clip could set GOMP_SPINCOUNT)"
    environ[ENV] = SPINCOUNT
    return f"{ENV}={SPINCOUNT} (clip's default)"
