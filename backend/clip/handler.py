"""clip function: CLIP zero-shot classification. Pure handle(event, context); the model loads in init()."""
import logging
import re
import time
import uuid

from . import config, metrics
from .intake import ClientError, parse_request

LOG = logging.getLogger("clip")
SETTINGS = config.from_env()
READY_PATHS = ("/ready", "/_/ready")
REQUEST_ID = re.compile(r"^[\w.-]{1,64}$")
SERVICE = None  # set once by init(); requests before that answer 503


def init():
    """Called once by the template host before the lock file is written: load everything."""
    global SERVICE
    from .service import Service  # torch and open_clip load here, not at import
    SERVICE = Service(SETTINGS)
    metrics.watch(SERVICE)


def shutdown():
    """Called by the template host when it drains this worker."""
    metrics.worker_exiting()


def handle(event, context):
    if event.path == "/metrics" and event.method in ("GET", "HEAD"):
        return metrics.exposition(event)
    request_id = event.headers.get("X-Request-Id", "")
    request_id = request_id if REQUEST_ID.match(request_id) else uuid.uuid4().hex
    return metrics.observe(event, request_id, lambda: respond(event, request_id))


def respond(event, request_id):
    started = time.perf_counter()
    try:
        status, body, headers = 200, route(event), {}
    except ClientError as error:
        status, headers = error.status, error.headers
        body = {"error": {"code": error.code, "message": error.message}}
    body["request_id"] = request_id
    if event.method == "POST":
        body["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return {"statusCode": status, "body": body,
            "headers": {"Content-Type": "application/json", "X-Request-Id": request_id,
                        "Cache-Control": "no-store", **headers}}


def route(event):
    if event.method in ("GET", "HEAD"):
        if event.path in READY_PATHS:
            if SERVICE is None:
                raise ClientError(503, "loading", "The model is still loading.", {"Retry-After": "5"})
            return {"ready": True}
        if SERVICE is None:
            return {"ready": False, "model": SETTINGS.model, "pretrained": SETTINGS.pretrained}
        return {"ready": True, **SERVICE.describe()}
    if event.method != "POST":
        raise ClientError(405, "method_not_allowed", f"{event.method[:10]} is not supported; POST an image, "
                          "or GET for a description.", {"Allow": "GET, HEAD, POST"})
    if SERVICE is None:
        raise ClientError(503, "loading", "The model is still loading; try again in a few seconds.",
                          {"Retry-After": "5"})
    return SERVICE.classify(parse_request(event, SETTINGS.max_images))
