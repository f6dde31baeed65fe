"""The warm classifier: model, label embeddings and batcher, created once; classify() per request."""

import functools
import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import numpy as np
from PIL import Image

from . import config, device_decode, precision, url_input
from . import model as model_module
from .background_build import Background
from .batcher import Batcher, Encoded, Ticket, wait
from .config import Settings
from .decode_gate import DecodeGate
from .embeddings import TextRequest, as_floats, text_answer
from .errors import BadImage, ClientError, DeadlineExceeded, QueueFull
from .images import decode, open_image
from .labels import LabelStore, label_sets
from .measured import Measured
from .options import OptionRules, Options
from .request import Item, Limits, Request

LOG = logging.getLogger("clip")


class Service:
    def __init__(self, settings: Settings, openmp_wait: str = "not set by clip (made outside its init())"):
        started = time.perf_counter()
        self.settings = settings
        self.openmp_wait = openmp_wait  # what openmp.configure() set before torch loaded, shown in GET
        self.threads, self.threads_source = config.threads(settings)  # the CPUs it may use, not the node's
        self.model = model_module.create(
            settings.model, settings.pretrained, settings.device, settings.cache_dir, self.threads, settings.dtype
        )
        # unset: chosen for the device and dtype the model was loaded with
        self.max_batch = settings.max_batch or precision.default_max_batch(self.model.device.type, self.model.dtype)
        self.device_decoder = _device_decoder(self.model, settings.device_decode)
        encode = self.device_decoder.encode if self.device_decoder else self.model.encode_prepared
        self.batcher = Batcher(
            encode, self.max_batch, settings.max_wait_ms / 1000, settings.max_queue, settings.stall_s
        )
        # A request is admitted whole or not at all: one with more pictures than this worker's share of
        # CLIP_MAX_QUEUE could never be, so that share caps the pictures per request (shown in GET /).
        self.max_images = min(settings.max_images, settings.max_queue)
        if self.max_images < settings.max_images:
            LOG.warning(
                "at most %d images per request: CLIP_MAX_IMAGES=%d is over this worker's share of CLIP_MAX_QUEUE",
                self.max_images,
                settings.max_images,
            )
        # what the door (request.parse_request) checks each request against
        self.label_sets = label_sets(settings)  # the built-in ones and those read from files
        self.limits = Limits(self.max_images, OptionRules.of(settings, self.label_sets))
        # Decoding beyond the cores only slows the forward pass and holds more pixels in memory.
        self.decoder_count = settings.decoders or self.threads
        self.gate = DecodeGate(self.decoder_count, settings.decode_memory_mb << 20, settings.heavy_pixels)
        self.structure_limits = settings.structure_limits()
        # A batch request's pictures wait for the gate side by side; the gate decides who decodes.
        self.pool = ThreadPoolExecutor(max_workers=max(1, settings.max_queue), thread_name_prefix="decode")
        self.labels = LabelStore(
            self.model,
            settings.cache_dir,
            settings.custom_templates,
            settings.label_cache_size,
            run=self.batcher.call,
            chunk=32,
            sets=self.label_sets,
            # On a CPU, a big set asked for later is built by a child process at the lowest priority
            # (background_build.py); on a GPU a chunk of prompts takes milliseconds: the model thread builds it.
            background=Background(precision.NAMES[self.model.dtype]) if self.model.device.type == "cpu" else None,
        )
        self.width = self.labels.width()  # values per embedding, learnt now: no request waits for it
        for name in settings.preload_label_sets:
            self.labels.build(name)
        # One forward pass now, so the first user does not pay for lazy allocations.
        self.batcher.submit(
            [self.model.prepare(Image.new("RGB", (self.model.image_size,) * 2))], time.monotonic() + 600
        )[0].result()
        if self.device_decoder:  # and one through the device decoder (nvJPEG's first call is slow)
            self.batcher.submit(
                [self.device_decoder.accept(_blank_jpeg(), settings.max_pixels)], time.monotonic() + 600
            )[0].result()
        LOG.info("ready in %.1f s: %s", time.perf_counter() - started, self.model.describe())

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            **self.model.describe(),
            "threads": self.threads,
            "threads_source": self.threads_source,
            "openmp_wait": self.openmp_wait,
            "label_sets": {name: self._describe_set(name, ls) for name, ls in self.label_sets.items()},
            "default_label_set": s.default_label_set,
            "default_top_k": s.top_k,  # CLIP_TOP_K: the page offers it as "Results to show"
            "embedding_dimensions": self.width,  # of embedding=true's and POST /embeddings' embeddings
            "limits": {
                "max_body_bytes": s.max_body_bytes,
                "max_pixels": s.max_pixels,
                "max_images": self.max_images,
                "max_labels": s.max_labels,
                "max_label_chars": s.max_label_chars,
                "max_batch": self.max_batch,
                "max_wait_ms": s.max_wait_ms,
                "max_queue": s.max_queue,
                "decoders": self.decoder_count,
                "decode_memory_mb": s.decode_memory_mb,
                "heavy_pixels": s.heavy_pixels,
                "max_scan_pixels": s.max_scan_pixels,
                "max_jpeg_segments": s.max_jpeg_segments,
                "max_jpeg_fill_bytes": s.max_jpeg_fill_bytes,
                "max_rle_pixels": s.max_rle_pixels,
                "deadline_s": s.deadline_s,
            },
            "url_input": bool(s.url_allow_hosts),
            "device_decode": bool(self.device_decoder),
            "stats": {
                "batches": self.batcher.batches,
                "images": self.batcher.images,
                "queued": self.batcher.depth,
                "admitted": self.batcher.admitted,
                "jobs": self.batcher.jobs,
            },
        }

    def _describe_set(self, name: str, label_set: Any) -> dict[str, Any]:
        """A set's size and source, whether it is ready and, while it is being built, its share done."""
        about = {**label_set.describe(), "ready": self.labels.ready(name)}
        progress = None if about["ready"] else self.labels.progress(name)
        if progress is not None:
            about["progress"] = progress
        return about

    def identity(self) -> dict[str, Any]:
        """What every answer carries, so random weights can never pass for a real model."""
        m = self.model
        answer = {"model": m.name, "pretrained": m.pretrained, "untrained": m.untrained}
        if m.untrained:
            answer["warning"] = "Random, untrained weights (CLIP_PRETRAINED=none): predictions are meaningless."
        return answer

    def label_sets_ready(self) -> dict[str, bool]:
        return {name: self.labels.ready(name) for name in self.label_sets}

    def label_matrix(self, options: Options, deadline: float, measured: Measured) -> tuple[tuple[str, ...], np.ndarray]:
        if options.labels:
            lookup = self.labels.look_up(options.labels)
            measured.label_lookups = lookup.counts()
            return options.labels, self.labels.embed(lookup, deadline)
        embeddings = self.labels.get_set(options.label_set)
        if embeddings is None:
            raise ClientError(
                503,
                "label_set_warming",
                f"The label set '{options.label_set}' is being prepared; try again shortly.",
                headers={"Retry-After": "30"},
            )
        return self.label_sets[options.label_set].labels, embeddings

    def admission(self, items: list[Item], options: Options) -> int:
        """What a request takes of the queue: its images, plus its new labels (a slot per text chunk)."""
        text = -(-self.labels.uncached(options.labels) // self.labels.chunk) if options.labels else 0
        return len(items) + min(text, max(0, self.batcher.max_queue - len(items)))  # labels alone always fit

    def refuse_if_full(self) -> None:
        """429 queue_full before the body is parsed when not even one image could be admitted: every
        request holds at least one, so parsing it would only be refused after the work (a 16-image
        body is milliseconds of host CPU, the resource a full function lacks)."""
        if self.batcher.full():
            raise _queue_full()

    def classify(self, request: Request, measured: Measured | None = None) -> dict:
        """The answer to a request the door has checked. Raises ClientError for request-wide problems;
        per-image problems land in their result. `measured` is filled with what the work measured."""
        measured = measured if measured is not None else Measured()
        s = self.settings
        items, options = request.items, request.options
        measured.images = len(items)
        deadline = time.monotonic() + s.deadline_s
        try:
            with self.batcher.admit(self.admission(items, options)) as ticket:  # refused before any work
                labels, embeddings = self.label_matrix(options, deadline, measured)
                self._prepare_all(items, deadline, measured)
                self._encode(items, deadline, ticket, measured)
        except QueueFull:
            raise _queue_full() from None
        except DeadlineExceeded:
            raise _deadline_exceeded(s.deadline_s) from None
        if len(items) == 1 and items[0].error:
            raise items[0].error
        top_k = min(options.top_k, len(labels))
        results = [self._result(item, labels, embeddings, top_k, options.embedding) for item in items]
        answer = {"label_set": options.label_set, **self.identity()}
        if options.embedding:
            answer["embedding_dtype"] = self.embedding_dtype
        return {**results[0], **answer} if len(items) == 1 else {"results": results, **answer}

    @property
    def embedding_dtype(self) -> str:
        """The dtype the model computes embeddings in (each is normalised and answered as float32)."""
        return str(self.model.dtype).replace("torch.", "")

    def _result(
        self, item: Item, labels: Sequence[str], embeddings: np.ndarray, top_k: int, embedding: bool = False
    ) -> dict:
        """The item's entry in the answer: its predictions (and its embedding), or the error that stopped it."""
        if item.error:
            return {"error": item.error.body()}
        features = cast(np.ndarray, item.features)
        result: dict[str, Any] = {"predictions": self.rank(features, labels, embeddings, top_k)}
        if embedding:
            result["embedding"] = as_floats(features)
        return result

    def embed_texts(self, request: TextRequest, measured: Measured | None = None) -> dict:
        """POST /embeddings: each text's normalised embedding, encoded on the model thread in chunks that
        take turns with image batches, admitted (a queue slot per chunk) and bounded by the deadline as
        pictures are."""
        measured = measured if measured is not None else Measured()
        texts, chunk = request.texts, self.labels.chunk
        measured.texts = len(texts)
        deadline = time.monotonic() + self.settings.deadline_s
        slots = min(-(-len(texts) // chunk), self.batcher.max_queue)  # at most the queue: idle, it always fits
        try:
            with self.batcher.admit(slots) as ticket:
                self.batcher.prepared(ticket)  # it submits no images: batches need not wait for it
                parts = [
                    self.batcher.call(functools.partial(self.model.embed_texts, texts[i : i + chunk]), deadline)
                    for i in range(0, len(texts), chunk)
                ]
        except QueueFull:
            raise _queue_full() from None
        except DeadlineExceeded:
            raise _deadline_exceeded(self.settings.deadline_s) from None
        rows = np.concatenate([part[0] for part in parts])
        about = {**self.identity(), "embedding_dtype": self.embedding_dtype}
        return text_answer(rows, request, sum(part[1] for part in parts), about)

    def _prepare_all(self, items: list[Item], deadline: float, measured: Measured) -> None:
        """Fetch, decode and preprocess every picture, a batch's pictures in parallel."""
        if len(items) == 1:
            self._prepare(items[0], deadline, measured)
        else:
            for done in [self.pool.submit(self._prepare, item, deadline, measured) for item in items]:
                done.result()  # each is bounded by the deadline itself

    def _prepare(self, item: Item, deadline: float, measured: Measured) -> None:
        if item.error:
            return
        try:
            data = cast(bytes, item.data) if item.url is None else self._fetch(item.url, measured)  # no URL: bytes
            item.prepared = self._for_device(data) or self._with_pillow(data, deadline)
        except ClientError as error:
            item.error = error
        except BadImage as refused:
            item.error = refused.as_client_error()

    def _fetch(self, url: str, measured: Measured) -> bytes:
        s = self.settings
        try:
            data = url_input.fetch(
                url, s.url_allow_hosts, s.url_timeout_s, s.url_max_bytes, allow_networks=s.url_allow_networks
            )
        except ClientError as error:
            measured.fetched(error.code)
            raise
        measured.fetched("ok")
        return data

    def _for_device(self, data: bytes) -> device_decode.DeviceJpeg | None:
        """The bytes themselves, header-checked, when the model's device decodes them; else None."""
        if not self.device_decoder:
            return None
        return device_decode.admit(data, self.structure_limits, self.settings.max_pixels)

    def _with_pillow(self, data: bytes, deadline: float) -> np.ndarray:
        opened = open_image(data, self.settings.max_pixels, self.model.image_size, self.structure_limits)
        with self.gate.enter(opened.pixels, opened.cost, deadline):
            return self.model.prepare(decode(opened))

    def _encode(self, items: list[Item], deadline: float, ticket: Ticket, measured: Measured) -> None:
        ready = [item for item in items if not item.error]
        if not ready:
            return
        futures = self.batcher.submit([item.prepared for item in ready], deadline, ticket)
        for item, future in zip(ready, futures):
            item.prepared = None  # the batcher holds it now; the request need not
            self._features(item, future, deadline, measured)

    def _features(self, item: Item, future: Future[Encoded], deadline: float, measured: Measured) -> None:
        """The item's feature row; a JPEG the device could not decode goes through Pillow instead."""
        encoded = wait(future, deadline)
        if isinstance(encoded.row, device_decode.Refused):
            try:
                future = self.batcher.submit([self._with_pillow(encoded.row.data, deadline)], deadline)[0]
            except BadImage as refused:
                item.error = refused.as_client_error()
                return
            encoded = wait(future, deadline)
        item.features = encoded.row.numpy()
        measured.rode(encoded.batch)

    def rank(self, features: np.ndarray, labels: Sequence[str], embeddings: np.ndarray, top_k: int) -> list[dict]:
        """softmax(logit_scale × cosine) over all labels, in numpy: request threads never run torch."""
        logits = self.model.logit_scale * np.einsum("nd,d->n", embeddings, np.asarray(features))
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:top_k]
        return [{"label": labels[i], "score": round(float(probs[i]), 6)} for i in order]


def _deadline_exceeded(deadline_s: float) -> ClientError:
    return ClientError(
        504, "deadline_exceeded", f"No answer within the {deadline_s:g} s deadline; the classifier is busy."
    )


def _queue_full() -> ClientError:
    return ClientError(429, "queue_full", "The classifier is at capacity; retry shortly.", headers={"Retry-After": "1"})


def _device_decoder(model: model_module.ClipModel, mode: str) -> device_decode.DeviceDecoder | None:
    if not device_decode.enabled(mode, model.device):
        return None
    try:
        return device_decode.DeviceDecoder(model)
    except device_decode.Unsupported as why:
        LOG.warning("JPEGs decode with Pillow: the device decoder does not reproduce this model's %s", why)
        return None


def _blank_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, "JPEG")
    return buffer.getvalue()
