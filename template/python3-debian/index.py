"""Template host: serves function/handler.py over WSGI (waitress) behind of-watchdog (mode=http).

The handler stays pure: handle(event, context) -> {"statusCode", "body", "headers"}.
An optional handler.init() runs once in the background (if it raises, the function stays up but
never ready, and says why in one log line); the watchdog's lock file
($TMPDIR/.lock, suppress_lock=true) is written only after it returns, and removed
first thing on SIGTERM, so /_/health and Kubernetes readiness follow the function.
An optional handler.alive() is polled once ready: False (a function that can no longer
serve) removes the lock and exits non-zero, so the platform replaces the replica.
"""
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time

import waitress.utilities
from waitress import create_server
from werkzeug.wrappers import Request, Response

import workers
from function import handler

LOG = logging.getLogger("host")
HOST = os.environ.get("FUNCTION_HOST", "127.0.0.1")
PORT = int(os.environ.get("FUNCTION_PORT", "5000"))  # not $PORT: Knative sets that for the watchdog
THREADS = int(os.environ.get("FUNCTION_THREADS", "48"))  # idle threads cost little; clip needs > CLIP_MAX_QUEUE
MAX_BODY = int(os.environ.get("MAX_BODY_BYTES", str(32 * 1024 * 1024)))
DRAIN_TIMEOUT = float(os.environ.get("DRAIN_TIMEOUT_S", "60"))
# Open connections served at once; waitress's default of 100 stalls a proxy that keeps more upstream
# connections (a watchdog or load balancer under 256 concurrent requests). poll(), not select(),
# so more than 1,024 sockets are possible.
CONNECTIONS = int(os.environ.get("FUNCTION_CONNECTIONS", "1000"))
ALIVE_INTERVAL = float(os.environ.get("FUNCTION_ALIVE_INTERVAL_S", "1"))
LOCK_FILE = os.path.join(tempfile.gettempdir(), ".lock")


class Event:
    def __init__(self, request, body):
        self.body = body
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class Context:
    def __init__(self):
        self.hostname = os.environ.get("HOSTNAME", "localhost")


class InFlight:
    """Counts requests being handled, so SIGTERM can wait for them."""

    def __init__(self):
        self.count = 0
        self.cond = threading.Condition()

    def __enter__(self):
        with self.cond:
            self.count += 1

    def __exit__(self, *exc):
        with self.cond:
            self.count -= 1
            self.cond.notify_all()


IN_FLIGHT = InFlight()


def json_error(status, code, message):
    body = json.dumps({"error": {"code": code, "message": message}})
    return Response(body, status=status, content_type="application/json")


def to_response(result):
    if isinstance(result, Response):
        return result
    result = result if isinstance(result, dict) else {"body": result}
    body = result.get("body", b"")
    headers = dict(result.get("headers") or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        headers.setdefault("Content-Type", "application/json")
    if isinstance(body, str):
        body = body.encode("utf-8")
    response = Response(body, status=int(result.get("statusCode", 200)))
    response.headers.update(headers)  # bytes bodies and their content type pass through untouched
    return response


def app(environ, start_response):
    request = Request(environ)
    with IN_FLIGHT:
        try:
            # waitress has already refused bodies over MAX_BODY (see waitress_error_as_json)
            response = to_response(handler.handle(Event(request, request.get_data()), Context()))
        except Exception:  # a bug, never bad input: log it, never show a stack trace
            LOG.exception("handler failed")
            response = json_error(500, "internal_error", "The function failed unexpectedly.")
        return response(environ, start_response)


WAITRESS_CODES = {413: "body_too_large", 431: "headers_too_large", 400: "bad_request"}


def waitress_error_as_json(self, ident=None):
    """waitress answers protocol errors itself (an over-long body is refused from its Content-Length
    before it is read); make those answers JSON like every other error of the function."""
    code = WAITRESS_CODES.get(self.code, "http_error")
    message = f"The request body is larger than {MAX_BODY} bytes." if self.code == 413 else f"{self.reason}."
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


waitress.utilities.Error.to_response = waitress_error_as_json


def write_lock():
    with open(LOCK_FILE, "w"):
        pass


def remove_lock():
    try:
        os.remove(LOCK_FILE)
    except FileNotFoundError:
        pass


def warm_up():
    try:
        if hasattr(handler, "init"):
            handler.init()
    except Exception as exc:  # up but never ready: the handler answers why; liveness probes restart it
        LOG.error("function init failed, not ready: %s", exc)
        LOG.debug("init failure", exc_info=True)
        return
    write_lock()
    LOG.info("ready: lock file %s written", LOCK_FILE)
    while getattr(handler, "alive", None):
        time.sleep(ALIVE_INTERVAL)
        try:
            alive = handler.alive()
        except Exception:
            LOG.exception("handler.alive() failed")
            alive = False
        if not alive:
            remove_lock()
            LOG.critical("the function reports it can no longer serve; exiting so the platform replaces it")
            logging.shutdown()
            os._exit(1)


def unfinished(server):
    """Whether a connection holds a request the app has not seen yet (body still arriving, or queued
    for a worker) or an answer not yet handed to the socket: exiting then would cut it off. (waitress
    keeps its connections in server._map; without it, only the app's own count is waited for.)"""
    return IN_FLIGHT.count > 0 or any(
        getattr(channel, "request", None) is not None or getattr(channel, "requests", None)
        or getattr(channel, "total_outbufs_len", 0) for channel in list(getattr(server, "_map", {}).values()))


def main():
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    remove_lock()
    if workers.is_supervisor():  # FUNCTION_WORKERS > 1: this process only starts and watches them
        sys.exit(workers.supervise(HOST, PORT, LOCK_FILE, DRAIN_TIMEOUT))
    server = create_server(app, **workers.listen_args(HOST, PORT), threads=THREADS,
                           max_request_body_size=MAX_BODY + 1, channel_timeout=120, ident="function",
                           connection_limit=CONNECTIONS, asyncore_use_poll=True,
                           inbuf_overflow=8 * 1024 * 1024)  # photo-sized bodies stay in memory, not a temp file

    def drain(signum, frame):
        def finish():
            remove_lock()  # first: readiness goes red before anything else happens
            LOG.info("SIGTERM: lock removed, draining %d request(s)", IN_FLIGHT.count)
            time.sleep(0.05)  # let requests already accepted by waitress reach the app
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while unfinished(server) and time.monotonic() < deadline:
                time.sleep(0.02)
            if hasattr(handler, "shutdown"):
                handler.shutdown()
            logging.shutdown()
            sys.stdout.flush()
            os._exit(0)
        threading.Thread(target=finish, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    LOG.info("serving on http://%s:%d", HOST, PORT)
    server.run()


if __name__ == "__main__":
    main()
