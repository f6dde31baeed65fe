"""The warm classifier: model, label embeddings and batcher, created once; classify() per request."""
import io
import logging
import os
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from PIL import Image

from . import device_decode
from . import model as model_module
from . import remote
from .batcher import Batcher, DeadlineExceeded, QueueFull
from .intake import ClientError, load_image
from .labels import LABEL_SETS, LabelStore
from .options import parse_options

LOG = logging.getLogger("clip")


class Service:
    def __init__(self, settings):
        started = time.perf_counter()
        self.settings = settings
        self.model = model_module.create(settings.model, settings.pretrained, settings.device,
                                         settings.cache_dir, settings.threads)
        self.device_decoder = _device_decoder(self.model, settings.device_decode)
        encode = self.device_decoder.encode if self.device_decoder else self.model.encode_prepared
        self.batcher = Batcher(encode, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue)
        # Decoding beyond the cores only slows the forward pass and holds more pixels in memory.
        self.decoder_count = settings.decoders or settings.threads or os.cpu_count() or 1
        self.decoders = threading.BoundedSemaphore(self.decoder_count)
        self.labels = LabelStore(self.model, settings.cache_dir, settings.custom_templates,
                                 settings.label_cache_size, run=self.batcher.call, chunk=32)
        for name in settings.preload_label_sets:
            self.labels.build(name)
        # One forward pass now, so the first user does not pay for lazy allocations.
        self.batcher.submit([self.model.prepare(Image.new("RGB", (self.model.image_size,) * 2))],
                            time.monotonic() + 600)[0].result()
        if self.device_decoder:  # and one through the device decoder (nvJPEG's first call is slow)
            self.batcher.submit([self.device_decoder.accept(_blank_jpeg(), settings.max_pixels)],
                                time.monotonic() + 600)[0].result()
        LOG.info("ready in %.1f s: %s", time.perf_counter() - started, self.model.describe())

    def describe(self):
        s = self.settings
        return {**self.model.describe(),
                "label_sets": {name: {"labels": len(ls.classes), "templates": len(ls.templates),
                                      "ready": self.labels.ready(name)}
                               for name, ls in LABEL_SETS.items()},
                "default_label_set": s.default_label_set,
                "limits": {"max_body_bytes": int(os.environ.get("MAX_BODY_BYTES", 32 * 1024 * 1024)),
                           "max_pixels": s.max_pixels, "max_images": s.max_images, "max_labels": s.max_labels,
                           "max_label_chars": s.max_label_chars,
                           "max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms, "max_queue": s.max_queue,
                           "decoders": self.decoder_count,
                           "deadline_s": s.deadline_s},
                "url_input": bool(s.url_allow_hosts),
                "device_decode": bool(self.device_decoder),
                "stats": {"batches": self.batcher.batches, "images": self.batcher.images,
                          "queued": self.batcher.depth, "admitted": self.batcher.admitted}}

    def identity(self):
        """What every answer carries, so random weights can never pass for a real model."""
        m = self.model
        answer = {"model": m.name, "pretrained": m.pretrained, "untrained": m.untrained}
        if m.untrained:
            answer["warning"] = "Random, untrained weights (CLIP_PRETRAINED=none): predictions are meaningless."
        return answer

    def label_matrix(self, options):
        if options.labels:
            return options.labels, self.labels.custom(options.labels)
        embeddings = self.labels.get_set(options.label_set)
        if embeddings is None:
            raise ClientError(503, "label_set_warming",
                              f"The label set '{options.label_set}' is being prepared; try again shortly.",
                              headers={"Retry-After": "30"})
        return LABEL_SETS[options.label_set].labels, embeddings

    def classify(self, intake):
        """Raises ClientError for request-wide problems; per-image problems land in their result."""
        s = self.settings
        deadline = time.monotonic() + s.deadline_s
        options = parse_options(intake.options, s)
        labels, embeddings = self.label_matrix(options)
        top_k = min(options.top_k, len(labels))
        items = list(intake.images) + list(intake.urls)
        try:
            with self.batcher.admit(len(items)) as ticket:  # refused before any decoding when full
                results = self._classify_admitted(items, deadline, ticket, labels, embeddings, top_k)
        except QueueFull:
            raise ClientError(429, "queue_full", "The classifier is at capacity; retry shortly.",
                              headers={"Retry-After": "1"}) from None
        answer = {"label_set": options.label_set, **self.identity()}
        if len(items) == 1:
            answer = {**results[0], **answer}
        else:
            answer = {"results": results, **answer}
        return answer

    def _classify_admitted(self, items, deadline, ticket, labels, embeddings, top_k):
        s = self.settings
        futures, prepared, slots = [], [], []
        for item in items:
            try:
                if isinstance(item, ClientError):
                    raise item
                if isinstance(item, str):  # a URL: downloaded outside the decoders' limit
                    item = remote.fetch(item, s.url_allow_hosts, s.url_timeout_s, s.url_max_bytes)
                prepared.append(self.prepare(item))
                slots.append(len(futures))
                futures.append(None)
            except ClientError as error:
                if len(items) == 1:
                    raise
                futures.append(error)
        if prepared:
            for slot, future in zip(slots, self.batcher.submit(prepared, deadline, ticket)):
                futures[slot] = future
        results = []
        for future in futures:
            if isinstance(future, ClientError):
                results.append({"error": {"code": future.code, "message": future.message}})
                continue
            try:
                features = future.result(timeout=max(0.0, deadline - time.monotonic()))
                if isinstance(features, device_decode.Refused):  # the device could not decode it: Pillow's answer
                    features = self.batcher.submit([self.prepare_with_pillow(features.data)], deadline)[0].result(
                        timeout=max(0.0, deadline - time.monotonic()))
            except ClientError as error:
                if len(items) == 1:
                    raise
                results.append({"error": {"code": error.code, "message": error.message}})
                continue
            except (FutureTimeout, DeadlineExceeded):
                future.cancel()
                raise ClientError(504, "deadline_exceeded",
                                  f"No answer within the {s.deadline_s:g} s deadline; the classifier is busy.") \
                    from None
            results.append({"predictions": self.rank(features, labels, embeddings, top_k)})
        return results

    def prepare(self, data):
        """Image bytes -> what the batcher encodes: the bytes themselves when the device decodes them
        (header checked here), else an array prepared with Pillow."""
        if self.device_decoder:
            job = self.device_decoder.accept(data, self.settings.max_pixels)
            if job is not None:
                return job
        return self.prepare_with_pillow(data)

    def prepare_with_pillow(self, data):
        with self.decoders:
            return self.model.prepare(load_image(data, self.settings.max_pixels, self.model.image_size))

    def rank(self, features, labels, embeddings, top_k):
        """softmax(logit_scale × cosine) over all labels, in numpy: request threads never run torch."""
        logits = self.model.logit_scale * np.einsum("nd,d->n", embeddings, features.numpy())
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:top_k]
        return [{"label": labels[i], "score": round(float(probs[i]), 6)} for i in order]


def _device_decoder(model, mode):
    if not device_decode.enabled(mode, model.device):
        return None
    try:
        return device_decode.DeviceDecoder(model)
    except device_decode.Unsupported as why:
        LOG.warning("JPEGs decode with Pillow: the device decoder does not reproduce this model's %s", why)
        return None


def _blank_jpeg():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, "JPEG")
    return buffer.getvalue()
