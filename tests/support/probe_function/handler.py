"""A function for testing the template host itself (no model): says which process answered, sleeps or
holds on request, and its init() can be made slow or failing per worker through the environment.

It uses the host's API as a function does: NAME, ERROR_CODES, sample(), its own metric, context.note()
and error_page(). Query parameters: ?sleep=S, ?hold=FOLDER (support.held), ?status=N&code=X (an error
answer with that code), ?images=N and ?batch=SEQxSIZE (noted for the access log), ?html_code=X (an HTML
answer whose code is noted), ?crash=1 (the handler raises)."""
import html
import os
import time
import uuid
from pathlib import Path

from prometheus_client import Counter, Gauge
from settings import Setting, read

# read at import, as a function's config module does: a bad value stops the host at start
SETTINGS = read([Setting("PROBE_SLEEP_CAP_S", float, 10.0, minimum=0, maximum=60, doc="longest ?sleep"),
                 Setting("PROBE_ERROR_PAGE", bool, True, doc="whether error_page() gives a page")])

NAME = "probe"
ERROR_CODES = frozenset({"probe_refused", "probe_html"})
HANDLED = Counter("probe_handled_total", "Requests that reached the probe's handle()")
WORKERS_UP = Gauge("probe_workers_sampled", "1 per live worker, set by sample()", multiprocess_mode="livesum")


def sample():
    WORKERS_UP.set(1)


def error_page(status, code, message, request_id):
    if not SETTINGS["PROBE_ERROR_PAGE"]:
        return None
    return (f"<!doctype html><title>probe: {status}</title><p id=code>{html.escape(code)}</p>"
            f"<p id=message>{html.escape(message)}</p><p id=request>{html.escape(request_id)}</p>")


def init():
    worker = os.environ.get("FUNCTION_WORKER", "0")
    if os.environ.get("PROBE_FAIL_INIT") == worker:
        raise RuntimeError(f"worker {worker}: init failed on purpose")
    time.sleep(float(os.environ.get(f"PROBE_INIT_S_{worker}", "0")))


def hold(folder):
    """?hold=FOLDER: say so with a file in FOLDER named for this process, then wait until FOLDER/release
    exists (a minute at most): a test then knows which requests are in the handler, and for how long."""
    (folder / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + 60
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def handle(event, context):
    HANDLED.inc()
    time.sleep(min(float(event.query.get("sleep", "0") or 0), SETTINGS["PROBE_SLEEP_CAP_S"]))
    if event.query.get("hold"):
        hold(Path(event.query["hold"]))
    if event.query.get("crash"):
        raise RuntimeError("the probe crashed on purpose")
    if "images" in event.query:
        context.note(images=int(event.query["images"]))
    batches = [tuple(int(n) for n in b.split("x")) for b in event.query.getlist("batch")]
    if batches:
        context.note(batches=batches)
    if event.query.get("html_code"):
        context.note(code=event.query["html_code"])
        return {"statusCode": 400, "body": "<p>refused</p>", "headers": {"Content-Type": "text/html"}}
    if event.query.get("code"):
        return {"statusCode": int(event.query.get("status", "400")),
                "body": {"error": {"code": event.query["code"], "message": "as asked"}}}
    return {"statusCode": 200, "body": {"pid": os.getpid(), "worker": os.environ.get("FUNCTION_WORKER"),
                                        "workers": os.environ.get("FUNCTION_WORKERS"),
                                        "prometheus_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
                                        "cpus": os.environ.get("FUNCTION_CPUS"),
                                        "cpus_source": os.environ.get("FUNCTION_CPUS_SOURCE"),
                                        "request_id": context.request_id}}
