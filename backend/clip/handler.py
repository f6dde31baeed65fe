"""clip function: CLIP zero-shot classification. Pure handle(event, context); the model loads in init().

The template host observes every request (observe.py: the request id, the request counter and durations,
the access log, GET /metrics): this module names the function (NAME), its error catalogue (ERROR_CODES)
and sample(), which sets clip's gauges, and notes on each request's context what it measured (images,
batches). clip's own metrics are in metrics.py, recorded here, at the edge."""

import logging
import pathlib
import threading
import time
from typing import TYPE_CHECKING, Any

import observe

from . import config, errors, metrics, openmp
from .decode_gate import trim_memory
from .embeddings import parse_text_request
from .errors import ClientError
from .measured import Measured
from .request import parse_request

if TYPE_CHECKING:
    from .service import Service  # torch and open_clip: never at import (see init())

NAME = "clip"  # the host's metrics (clip_requests_total, …), its access log's function= and logger
ERROR_CODES = errors.ERROR_CODES  # the closed set of codes the host's request counter may carry
LOG = logging.getLogger("clip")
SETTINGS = config.from_env()  # every setting, checked at start: a bad one stops the function here
READY_PATHS = ("/ready", "/_/ready")
EMBEDDINGS_PATHS = ("/embeddings", "/embeddings/")  # POST: text embeddings (embeddings.py); any other path classifies
BIG_BODY = 4 << 20
SERVICE: "Service | None" = None  # set once by init(); requests before that answer 503
LOAD_ERROR: str | None = None  # why init() failed, said in every answer instead of "still loading"
# the function's OpenAPI 3.1 document (docs/api.md), served as it ships, loaded or not
OPENAPI = pathlib.Path(__file__).with_name("openapi.json").read_bytes()
SHOWN: dict[str, str] = {}  # the model and weights as answers show them, known once init() imports model.py


def init() -> None:
    """Called once by the template host before the lock file is written: load everything."""
    global SERVICE, LOAD_ERROR
    openmp_wait = openmp.configure()  # before torch loads libgomp, which reads it once
    from .model import WeightsUnavailable, shown
    from .service import Service  # torch and open_clip load here, not at import

    SHOWN.update(shown(SETTINGS.model, SETTINGS.pretrained))
    try:
        service = Service(SETTINGS, openmp_wait)
    except WeightsUnavailable as exc:  # a setup problem a restart cannot fix: stay up, never ready, say why
        LOAD_ERROR = str(exc)  # answers and the page show it: it names the setting, never a path
        LOG.error("%s (the weights cache here: %s)", LOAD_ERROR, exc.weights_dir)
        threading.Event().wait()  # init never returns: the lock file is never written
    service.batcher.on_batch = metrics.batch_done  # what each forward pass measured, recorded here
    metrics.model_info(service.model.describe())
    SERVICE = service


def sample() -> None:
    """Called by the host before each scrape (and every 2 s per worker with several): clip's gauges from
    the live service: queue, admission, label sets."""
    if SERVICE is not None:
        batcher = SERVICE.batcher
        metrics.live(batcher.admitted, batcher.depth, SERVICE.label_sets_ready())


def alive() -> bool:
    """Polled by the template host: False takes the replica out of service (lock removed, exit 1)."""
    problem = SERVICE.batcher.problem() if SERVICE is not None else None
    if problem:
        LOG.critical("clip cannot serve any more: %s", problem)
    return problem is None


def handle(event: Any, context: Any) -> dict:
    """context (the host's): the request's id (context.request_id) and context.note(images=…, batches=…)
    for its log line. None outside a host (a test calling in): the host's own record stands in."""
    if context is None:
        context = observe.Record(event.method, observe.request_id(event.headers.get("X-Request-Id")), 0)
    if event.path == "/openapi.json" and event.method in ("GET", "HEAD"):
        return {"statusCode": 200, "body": OPENAPI, "headers": {"Content-Type": "application/json"}}
    started = time.perf_counter()
    measured = Measured()
    try:
        status, body, headers = 200, route(event, measured), {}
    except ClientError as error:
        status, headers = error.status, error.headers
        body = {"error": error.body()}
    context.note(images=measured.images, batches=measured.batches)
    if len(event.body) >= BIG_BODY:  # its parsing (JSON lists, form parts) left freed memory in glibc's arenas
        trim_memory()
    body["request_id"] = context.request_id
    if event.method == "POST":
        body["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return {
        "statusCode": status,
        "body": body,
        "headers": {
            "Content-Type": "application/json",
            "X-Request-Id": context.request_id,
            "Cache-Control": "no-store",
            **headers,
        },
    }


def not_loaded() -> ClientError:
    if LOAD_ERROR:
        return ClientError(503, "model_unavailable", LOAD_ERROR)
    return ClientError(503, "loading", "The model is still loading; try again in a few seconds.", {"Retry-After": "5"})


def embed_texts(service: "Service", event: Any, measured: Measured) -> dict:
    request = parse_text_request(event.body, service.limits.options, service.width)
    answer = service.embed_texts(request, measured)
    metrics.texts_embedded(measured.texts)
    return answer


def route(event: Any, measured: Measured) -> dict:
    if event.method in ("GET", "HEAD"):
        if event.path in READY_PATHS:
            if SERVICE is None:
                raise not_loaded()
            return {"ready": True}
        if SERVICE is None:
            return {"ready": False, **SHOWN, **({"error": LOAD_ERROR} if LOAD_ERROR else {})}
        return {"ready": True, **SERVICE.describe()}
    if event.method != "POST":
        raise ClientError(
            405,
            "method_not_allowed",
            f"{event.method[:10]} is not supported; POST an image, or GET for a description.",
            {"Allow": "GET, HEAD, POST"},
        )
    if SERVICE is None:
        raise not_loaded()
    SERVICE.refuse_if_full()  # before parsing: a full function answers 429 whatever the body holds
    if event.path in EMBEDDINGS_PATHS:
        return embed_texts(SERVICE, event, measured)
    request = parse_request(event, SERVICE.limits)  # validated at the door: the service sees no raw input
    status, answer = 200, None
    try:
        answer = SERVICE.classify(request, measured)
        return answer
    except ClientError as error:
        status = error.status
        raise
    finally:  # what the work measured, whether it answered or not
        metrics.work_done(measured.label_lookups, measured.fetches)
        metrics.answered(status, answer, measured.images)
