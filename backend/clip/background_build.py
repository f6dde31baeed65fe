"""A big label set (imagenet1k: 80,000 prompts, ~40 minutes on 2 cores) asked for at run time is embedded
by a child process at the lowest priority, never on the model thread.

Why a process: on the model thread, any chunk of text makes an image that arrives meanwhile wait for the
whole chunk (one prompt costs about one image's forward pass), and a second torch thread in the service
starts a second OpenMP pool, which slows every forward pass (see batcher.py). The child runs one torch
thread at nice 19 (SCHED_IDLE where allowed): it takes CPU only when the service leaves some. It loads a
second copy of the model for its duration (docs/performance.md).

The parent (Background.start) starts `python -m <package>.background_child NAME OUT` from a thread that
waits for it, then calls finished(exit status); the child writes its progress ("DONE TOTAL") to OUT.progress
and the embeddings to OUT atomically, which the parent reads back through the cache's own checks
(labels._load). The child dies with its parent (PR_SET_PDEATHSIG), so a host that drains and exits leaves
no build behind. Several workers asking for one set: the first child builds, the others wait for it."""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

LOG = logging.getLogger("labels")
# Sets with more prompts than this are built in a child when asked for at run time. Below it the build
# stays on the model thread, in chunks between image batches: cifar100 (1800 prompts) takes a minute or two
# there, less than a child's own start (a second model load) would be worth. Preloaded sets are built at
# start, on the model thread, whatever their size: no request is waiting yet.
BACKGROUND_PROMPTS = 2048
CHUNK = 256  # prompts per forward pass in the child: one thread at the lowest priority, no one waits on it
# Tests only: a folder where the child, after its first chunk, writes a file named by its pid and waits
# until "release" appears there (tests/test_background_build.py): "building at this moment" by construction.
HOLD_ENV = "BACKGROUND_BUILD_TEST_HOLD"
HOLD_LIMIT_S = 120
PR_SET_PDEATHSIG = 1


def progress_path(out: str) -> str:
    return f"{out}.progress"


def read_progress(out: str) -> float | None:
    """The child's share done (0..1) as it last wrote it, or None before it has."""
    try:
        with open(progress_path(out)) as file:
            done, total = (int(n) for n in file.read().split())
    except (OSError, ValueError):
        return None
    return min(1.0, done / total) if total > 0 else None


class Child:
    """One background build, as the parent sees it."""

    def __init__(self, name: str, out: str):
        self.name, self.out = name, out
        self.pid: int | None = None

    def progress(self) -> float:
        return read_progress(self.out) or 0.0


class Background:
    """Starts background builds for a service whose model computes in `dtype` (fp32|bf16|fp16): the child
    reads the same CLIP_* settings, with that dtype (auto decided once, here) and one torch thread."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def start(self, name: str, out: str, finished: Callable[[int | None], None]) -> Child:
        """Build the set into `out` in a child; finished(its exit status, None if it could not start)."""
        child = Child(name, out)
        threading.Thread(target=self._run, args=(child, finished), name=f"build-{name}", daemon=True).start()
        return child

    def _run(self, child: Child, finished: Callable[[int | None], None]) -> None:
        # Started from this thread, which lives as long as the child: PR_SET_PDEATHSIG fires when the
        # thread that started the child ends, not only the process.
        status = None
        try:
            package = __package__ or "clip"
            process = subprocess.Popen(
                [sys.executable, "-m", f"{package}.background_child", child.name, child.out, str(os.getpid())],
                env=self._env(),
                stdin=subprocess.DEVNULL,
            )
            child.pid = process.pid
            status = process.wait()
        except Exception:
            LOG.exception("label set %s: the background build could not start", child.name)
        finally:
            with contextlib.suppress(OSError):
                os.remove(progress_path(child.out))
            finished(status)

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CLIP_DTYPE": self.dtype,
            "CLIP_THREADS": "1",
            "OMP_NUM_THREADS": "1",  # no OpenMP pool beside the service's
            "MKL_NUM_THREADS": "1",
            # the host's modules and the function's package, found as the service found them
            "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path),
        }


def exit_status_text(status: int | None) -> str:
    if status is None:
        return "it could not start"
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"
