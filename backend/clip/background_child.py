"""The child of a background label-set build (background_build.py says why and how): embeds one set at the
lowest priority with one torch thread, reporting its progress, and dies with the service that started it.

A module of its own, not part of background_build.py: the child needs labels.py (the set, its prompts, the
cache's format), which itself starts builds through background_build.py; kept apart, the imports go one way."""

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence

from .background_build import CHUNK, HOLD_ENV, HOLD_LIMIT_S, LOG, PR_SET_PDEATHSIG, progress_path


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
        total = label_set.prompt_count
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
