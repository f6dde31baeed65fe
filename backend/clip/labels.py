"""Label sets, prompts and their text embeddings: built once, cached on disk, never per request.

Embeddings are numpy arrays from the model's output on: ranking runs on request threads, which never
run torch (see batcher.py), and the disk cache is a plain .npy file, read without unpickling."""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from open_clip import zero_shot_metadata as imagenet

from .background_build import BACKGROUND_PROMPTS, Background, Child, exit_status_text
from .errors import DeadlineExceeded

if TYPE_CHECKING:
    import torch

    from .config import Settings
    from .model import ClipModel

Template = str | Callable[[str], str]  # a prompt: "a photo of a {}." or a function of the label
Encoder = Callable[[list[str]], "torch.Tensor | np.ndarray"]  # prompts -> [len(prompts), D] on the CPU

LOG = logging.getLogger("labels")
with open(os.path.join(os.path.dirname(__file__), "zero_shot.json")) as _f:
    _REFERENCE = json.load(_f)

CIFAR_TEMPLATES = tuple(_REFERENCE["cifar_templates"])
SIMPLE_TEMPLATES = ("a photo of a {}.",)
WIDTH_PROBE = "a photo."  # encoded once to learn the model's embedding width


def cache_key(*parts: object) -> str:
    """A short, stable name for what an embedding file was built from (JSON of the parts, hashed)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def _format(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name)


BUILT_IN = "built-in"


@dataclass(frozen=True)
class LabelSet:
    name: str
    classes: tuple  # dataset names, e.g. "aquarium_fish"; a file's labels as written
    templates: tuple
    source: str = BUILT_IN  # or the file it was read from, as GET / shows it (label_files.FileSet.shown)

    @property
    def labels(self) -> tuple[str, ...]:  # shown to users: a dataset's underscores as spaces
        if self.source != BUILT_IN:
            return tuple(self.classes)
        return tuple(c.replace("_", " ") for c in self.classes)

    @property
    def prompt_count(self) -> int:  # what embedding the set costs: one text per class and template
        return len(self.classes) * len(self.templates)

    def describe(self) -> dict[str, Any]:
        return {"labels": len(self.classes), "templates": len(self.templates), "source": self.source}


@dataclass(frozen=True)
class Lookup:
    """Custom labels looked up in the embedding cache (LabelStore.look_up): found (hits), being encoded
    for another request (shared), or this request's to encode (misses)."""

    labels: tuple[str, ...]
    rows: dict[str, np.ndarray]
    others: dict[str, Future[dict[str, np.ndarray]]]
    mine: list[str]
    future: Future[dict[str, np.ndarray]]

    def counts(self) -> dict[str, int]:
        return {"hit": len(self.rows), "miss": len(self.mine), "shared": len(self.others)}


LABEL_SETS = {
    "cifar100": LabelSet("cifar100", tuple(_REFERENCE["cifar100"]), CIFAR_TEMPLATES),
    "cifar10": LabelSet("cifar10", tuple(_REFERENCE["cifar10"]), CIFAR_TEMPLATES),
    "imagenet1k": LabelSet(
        "imagenet1k", tuple(imagenet.IMAGENET_CLASSNAMES), tuple(imagenet.OPENAI_IMAGENET_TEMPLATES)
    ),
}


def custom_prompts(setting: str) -> tuple[str, ...]:
    """The prompts of labels sent with a request (CLIP_CUSTOM_TEMPLATES), and of a file set without templates."""
    return CIFAR_TEMPLATES if setting == "cifar" else SIMPLE_TEMPLATES


def label_sets(settings: "Settings") -> dict[str, LabelSet]:
    """The built-in sets and those read from files (config.from_env checked them): a file set without its
    own templates is prompted as custom labels are, so label_set=NAME ranks as labels=<its labels> does."""
    from_files = {
        f.name: LabelSet(f.name, f.labels, f.templates or custom_prompts(settings.custom_templates), f.shown)
        for f in settings.file_sets
    }
    return {**LABEL_SETS, **from_files}


def class_embeddings(
    encode_texts: Encoder,
    labels: Sequence[str],
    templates: Sequence[Template],
    chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Each class: mean of its L2-normalised prompt embeddings, L2-normalised again -> float32 [N, D].
    encode_texts(prompts) -> a [len(prompts), D] CPU tensor (or array); progress(prompts done) after each chunk."""
    prompts = [_format(t, label) for label in labels for t in templates]
    parts = []
    for i in range(0, len(prompts), chunk):
        parts.append(np.asarray(encode_texts(prompts[i : i + chunk])))
        if progress is not None:
            progress(min(i + chunk, len(prompts)))
    # numpy, not torch, for the arithmetic: it may run on request threads (see batcher.py)
    features = np.concatenate(parts)
    features = features.reshape(len(labels), len(templates), -1).mean(axis=1)
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


def _templates_id(templates: Iterable[Template]) -> list[str]:
    return [_format(t, "{}") for t in templates]


def _load(path: str, rows: int, width: Callable[[], int]) -> np.ndarray | None:
    """The cached embeddings at path, when they are what this model builds: float32 [rows, width()],
    finite, each row of unit length. None when absent; anything else (torn, foreign, another model's,
    another shape or dtype, NaN) is logged and rebuilt."""
    if not os.path.exists(path):
        return None
    try:
        embeddings = np.load(path, allow_pickle=False)
    except Exception:  # a torn or foreign file: rebuild it
        LOG.warning("ignoring unreadable embedding cache %s", path)
        return None
    problem = _unfit(embeddings, rows, width)
    if problem:
        LOG.warning("ignoring embedding cache %s: %s; rebuilding it", path, problem)
        return None
    return embeddings


def _unfit(embeddings: np.ndarray, rows: int, width: Callable[[], int]) -> str | None:
    """Why cached embeddings cannot serve this model, or None when they can."""
    if embeddings.dtype != np.float32:
        return f"dtype {embeddings.dtype}, not float32"
    if embeddings.ndim != 2 or embeddings.shape[0] != rows:
        return f"shape {embeddings.shape}, not {rows} rows"
    if embeddings.shape[1] != width():
        return f"{embeddings.shape[1]} values per row where this model gives {width()}"
    if not np.isfinite(embeddings).all():
        return "values that are not finite"
    if not np.allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-3):
        return "rows that are not of unit length"
    return None


def _save(path: str, embeddings: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as file:  # a file object: np.save adds no second suffix
            np.save(file, embeddings, allow_pickle=False)
        os.replace(tmp, path)  # atomic: concurrent builders never see half a file
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a full disk keeps no half-written file
        raise


class LabelStore:
    """Embeddings (numpy [N, D]) of the named sets (disk-cached) and of custom labels (bounded LRU per label)."""

    def __init__(
        self,
        model: "ClipModel",
        cache_dir: str,
        custom_templates: str = "simple",
        lru_size: int = 4096,
        run: Callable[[Callable[[], Any], float | None], Any] | None = None,
        chunk: int = 256,
        sets: dict[str, LabelSet] | None = None,
        background: Background | None = None,
    ):
        """run(fn, deadline): executes a callable where torch may run (the service's model thread), by
        the deadline; chunk: prompts encoded per call, small in a live service so image batches
        interleave with a long build; sets: the named sets (label_sets(); default the built-in ones);
        background: where a set of more than BACKGROUND_PROMPTS prompts asked for by get_set() is built
        (a child process, background_build.py); None: on the model thread, as the small ones."""
        self.sets = LABEL_SETS if sets is None else sets
        self.model = model
        self.run = run or (lambda fn, deadline: fn())
        self.chunk = chunk
        self.cache_dir = os.path.join(cache_dir, "embeddings")
        self.custom_templates = custom_prompts(custom_templates)
        self.lru_size = lru_size
        self._sets: dict[str, np.ndarray] = {}
        self._building: set[str] = set()
        self.background = background
        self._children: dict[str, Child] = {}  # sets being built by a child process
        self._progress: dict[str, float] = {}  # share done of the sets being built here
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        # label -> Future of {label: row}: a label being encoded, by one request
        self._encoding: dict[str, Future[dict[str, np.ndarray]]] = {}
        self._lock = threading.Lock()
        self._width: int | None = None
        self._unwritable = False  # warned once that the cache directory takes no files

    def cache_path(self, label_set: LabelSet) -> str:
        # keyed by dtype too: bf16 embeddings differ from fp32 ones (and fp16 from both)
        key = cache_key(
            self.model.weights_id, str(self.model.dtype), label_set.labels, _templates_id(label_set.templates)
        )
        return os.path.join(self.cache_dir, f"{label_set.name}-{key}.npy")

    def build(self, name: str) -> np.ndarray:
        """Load the set's embeddings from disk, or encode and save them (slow: minutes for big sets)."""
        label_set = self.sets[name]
        path = self.cache_path(label_set)
        embeddings = _load(path, len(label_set.classes), self.width)
        if embeddings is None:
            total = label_set.prompt_count
            LOG.info("encoding %d prompts for %s", total, name)

            def done(prompts: int) -> None:
                self._progress[name] = prompts / total

            self._progress[name] = 0.0
            try:
                embeddings = class_embeddings(
                    self._encoder(None), label_set.labels, label_set.templates, self.chunk, done
                )
            finally:
                self._progress.pop(name, None)
            self._keep(path, embeddings)
        with self._lock:
            self._sets[name] = embeddings
            self._building.discard(name)
        return embeddings

    def width(self) -> int:
        """Values per embedding for this model (one prompt encoded, the first time it is asked)."""
        if self._width is None:
            self._width = int(np.asarray(self._encoder(None)([WIDTH_PROBE])).shape[-1])
        return self._width

    def _keep(self, path: str, embeddings: np.ndarray) -> None:
        """Save built embeddings for the next start. A cache that cannot be written (read-only, full) costs
        that only: the set is served from memory, and one warning says so, once."""
        try:
            _save(path, embeddings)
        except OSError as exc:
            self._warn_unwritable(exc)

    def _warn_unwritable(self, exc: OSError) -> None:
        with self._lock:
            first, self._unwritable = not self._unwritable, True
        if first:
            LOG.warning(
                "cannot write the label-set cache %s (%s): label sets are served from memory, built again "
                "at each start",
                self.cache_dir,
                exc.strerror or type(exc).__name__,
            )

    def ready(self, name: str) -> bool:
        return name in self._sets

    def progress(self, name: str) -> float | None:
        """The share (0..1) of the set's prompts encoded so far while it is being built; else None."""
        child = self._children.get(name)
        if child is not None:
            return round(child.progress(), 4)
        done = self._progress.get(name)
        return None if done is None else round(done, 4)

    def get_set(self, name: str) -> np.ndarray | None:
        """Embeddings if built or cached on disk (baked into the image: read at once); else None, and a
        build starts in the background (once)."""
        with self._lock:
            if name in self._sets:
                return self._sets[name]
            if name in self._building:
                return None
            self._building.add(name)
        if self._width is not None:  # known from a preloaded set: reading the file encodes nothing
            cached = _load(self.cache_path(self.sets[name]), len(self.sets[name].classes), self.width)
            if cached is not None:
                with self._lock:
                    self._sets[name] = cached
                    self._building.discard(name)
                return cached
        label_set = self.sets[name]
        if self.background is not None and label_set.prompt_count > BACKGROUND_PROMPTS:
            out, scratch = self._output(self.cache_path(label_set))
            LOG.info("label set %s: built in a background process (the model thread serves meanwhile)", name)
            child = self.background.start(name, out, lambda status: self._adopt(name, out, scratch, status))
            with self._lock:
                if name in self._building:  # not finished already (a child that could not start)
                    self._children[name] = child
            return None
        threading.Thread(target=self._build_quietly, args=(name,), name=f"build-{name}", daemon=True).start()
        return None

    def _output(self, path: str) -> tuple[str, bool]:
        """Where a child writes the set: its cache file, or, when the cache takes no files, a scratch
        folder of its own (True: removed once read; the set is then served from memory)."""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=os.path.dirname(path), prefix=".probe-")
            probe.close()
            return path, False
        except OSError as exc:
            self._warn_unwritable(exc)
            return os.path.join(tempfile.mkdtemp(prefix="clip-label-set-"), os.path.basename(path)), True

    def _adopt(self, name: str, out: str, scratch: bool, status: int | None) -> None:
        """A child ended: serve what it built, or say once why not (a later request starts it again)."""
        embeddings = None
        if status == 0:
            embeddings = _load(out, len(self.sets[name].classes), self.width)
            if embeddings is None:
                LOG.error(
                    "label set %s: the background build left no usable embeddings; a later request starts it again",
                    name,
                )
        else:
            LOG.error(
                "label set %s: the background build failed (%s); a later request starts it again",
                name,
                exit_status_text(status),
            )
        if scratch:
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
        with self._lock:
            if embeddings is not None:
                self._sets[name] = embeddings
            self._building.discard(name)
            self._children.pop(name, None)

    def _build_quietly(self, name: str) -> None:
        try:
            self.build(name)
        except Exception:
            LOG.exception("building label set %s failed", name)
            with self._lock:
                self._building.discard(name)

    def _encoder(self, deadline: float | None) -> Encoder:
        return lambda texts: self.run(lambda: self.model.encode_texts(texts), deadline)

    def uncached(self, labels: Iterable[str]) -> int:
        """How many of these labels have no embedding yet (what encoding them will cost)."""
        with self._lock:
            return sum(label not in self._lru for label in dict.fromkeys(labels))

    def custom(self, labels: Sequence[str], deadline: float | None = None) -> np.ndarray:
        """Embeddings for user labels: look_up() then embed()."""
        return self.embed(self.look_up(labels), deadline)

    def look_up(self, labels: Sequence[str]) -> "Lookup":
        """Which of the labels are cached, being encoded for another request, or this one's to encode
        (claimed now: a request arriving later waits for this one's encoding instead of encoding them
        a second time). The Lookup says how many of each; embed() finishes it."""
        unique = list(dict.fromkeys(labels))
        with self._lock:
            rows = {label: self._lru[label] for label in unique if label in self._lru}
            others = {label: self._encoding[label] for label in unique if label not in rows and label in self._encoding}
            mine = [label for label in unique if label not in rows and label not in others]
            future: Future[dict[str, np.ndarray]] = Future()
            for label in mine:
                self._encoding[label] = future
        return Lookup(tuple(labels), rows, others, mine, future)

    def embed(self, lookup: "Lookup", deadline: float | None = None) -> np.ndarray:
        """The looked-up labels' embeddings, in their order: each label is encoded once and kept in a
        bounded LRU; one another request is encoding right now is waited for. Past the deadline
        (time.monotonic()), raises DeadlineExceeded."""
        rows, mine, future = dict(lookup.rows), lookup.mine, lookup.future
        if mine:
            try:
                fresh = dict(
                    zip(mine, class_embeddings(self._encoder(deadline), mine, self.custom_templates, self.chunk))
                )
            except BaseException as exc:
                self._forget_encoding(mine)
                future.set_exception(exc)  # those waiting fail as this request does
                raise
            self._forget_encoding(mine, fresh)
            future.set_result(fresh)
            rows.update(fresh)
        for label, pending in lookup.others.items():
            try:
                rows[label] = pending.result(None if deadline is None else max(0.0, deadline - time.monotonic()))[label]
            except FutureTimeout:
                raise DeadlineExceeded() from None
        with self._lock:
            self._remember(rows)
        return np.stack([rows[label] for label in lookup.labels])

    def _forget_encoding(self, labels: Iterable[str], rows: dict[str, np.ndarray] | None = None) -> None:
        with self._lock:
            if rows:
                self._remember(rows)  # before the hand-over: a new request finds them here
            for label in labels:
                del self._encoding[label]

    def _remember(self, rows: dict[str, np.ndarray]) -> None:  # call with the lock held
        for label, row in rows.items():
            self._lru[label] = row
            self._lru.move_to_end(label)
        while len(self._lru) > self.lru_size:
            self._lru.popitem(last=False)
