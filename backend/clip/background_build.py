"""A big label set (imagenet1k: 80,000 prompts, ~40 minutes on 2 cores) asked for at run time is embedded
by a child process at the lowest priority, never on the model thread.

Why a process: on the model thread, any chunk of text makes an image that arrives meanwhile wait for the
whole chunk (one prompt costs about one image's forward pass), and a second torch thread in the service
starts a second OpenMP pool, which slows every forward pass (see batcher.py). The child runs one torch
thread at nice 19 (SCHED_IDLE where allowed): it takes CPU only when the service leaves some. It loads a
second copy of the model for its duration (docs/performance.md).

The parent (Background.start) starts `python -m <package>.background_build NAME OUT` from a thread that
waits for it, then calls finished(exit status); the child writes its progress ("DONE TOTAL") to OUT.progress
and the embeddings to OUT atomically, which the parent reads back through the cache's own checks
(labels._load). The child dies with its parent (PR_SET_PDEATHSIG), so a host that drains and exits leaves
no build behind. Several workers asking for one set: the first child builds, the others wait for it."""

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

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
                [sys.executable, "-m", f"{package}.background_build", child.name, child.out, str(os.getpid())],
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


# ---- the child ------------------------------------------------------------------------------------------


def _lowest_priority() -> None:
    os.nice(19)
    with contextlib.suppress(AttributeError, OSError):  # SCHED_IDLE: CPU only when no one else wants it
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _die_with(parent: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl: no signal will come
        os._exit(1)


@contextlib.contextmanager
def _only_builder(out: str) -> Iterator[bool]:
    """True: this child builds; False: another worker's child built (or tried) while this one waited."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(f"{out}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            first = True
        except BlockingIOError:
            fcntl.flock(lock, fcntl.LOCK_EX)
            first = False
        yield first


def _report(out: str, done: int, total: int) -> None:
    tmp = f"{progress_path(out)}.{os.getpid()}.tmp"
    with open(tmp, "w") as file:
        file.write(f"{done} {total}")
    os.replace(tmp, progress_path(out))
    hold = os.environ.get(HOLD_ENV)
    if hold and 0 < done < total:
        os.environ.pop(HOLD_ENV)  # once
        (open(os.path.join(hold, str(os.getpid())), "w")).close()
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not os.path.exists(os.path.join(hold, "release")) and time.monotonic() < deadline:
            time.sleep(0.01)


def main(argv: Sequence[str] | None = None) -> None:
    name, out, parent = argv if argv is not None else sys.argv[1:]
    _lowest_priority()
    _die_with(int(parent))
    # the host's format, into the function's log; open_clip's own INFO lines were said by the service already
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    LOG.setLevel(logging.INFO)
    from . import config
    from . import model as model_module
    from .labels import _save, class_embeddings, label_sets

    settings = config.from_env()
    label_set = label_sets(settings)[name]
    with _only_builder(out) as first:
        if not first:
            return  # the parent reads what the other child left (or finds nothing and may ask again)
        clip = model_module.create(
            settings.model, settings.pretrained, settings.device, settings.cache_dir, 1, settings.dtype
        )
        total = len(label_set.classes) * len(label_set.templates)
        LOG.info("building label set %s in a background process: %d prompts", name, total)
        _report(out, 0, total)
        embeddings = class_embeddings(
            clip.encode_texts,
            label_set.labels,
            label_set.templates,
            CHUNK,
            progress=lambda done: _report(out, done, total),
        )
        _save(out, embeddings)


if __name__ == "__main__":
    main()
