"""The clip function inside the test process: a warm Service on the tiny model, and fake events, for
calling handler.handle (and the intake/option parsers) directly, without HTTP."""
import dataclasses
import functools

from clip import config
from werkzeug.datastructures import Headers, MultiDict


@functools.cache
def service(tiny_model, cache_dir, **overrides):
    """One warm Service per configuration and test session (loading takes a few seconds)."""
    from clip.service import Service
    settings = dataclasses.replace(config.Settings(), model=f"local-dir:{tiny_model}", cache_dir=str(cache_dir),
                                   preload_label_sets=("cifar100", "cifar10"), **overrides)
    return Service(settings)


class Event:
    """What the template host hands to handle(event, context)."""

    def __init__(self, body=b"", content_type=None, method="POST", query=(), path="/", headers=()):
        self.body = body
        self.headers = Headers(list(headers))
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.method = method
        self.query = MultiDict(list(query))
        self.path = path
