"""Template host: serves function/handler.py over WSGI (waitress) behind of-watchdog (mode=http).

The handler stays pure: handle(event, context) -> {"statusCode", "body", "headers"}; an optional
handler.init() runs once before the function reports ready, an optional handler.alive() is polled
once it is (False: the function can no longer serve; the host takes it out), and an optional
handler.shutdown() runs last when SIGTERM has drained the requests. Readiness, liveness and
drain: lifecycle.py; several worker processes behind the one port: workers.py.
"""
import json
import logging
import os
import signal
import sys
import threading

import waitress.utilities
from waitress import create_server
from werkzeug.wrappers import Request, Response

import lifecycle
import workers

lifecycle.load_env_file("function.env")  # before the handler reads its settings
from function import handler  # noqa: E402

LOG = logging.getLogger("host")
HOST = os.environ.get("FUNCTION_HOST", "127.0.0.1")
PORT = int(os.environ.get("FUNCTION_PORT", "5000"))  # not $PORT: Knative sets that for the watchdog
THREADS = int(os.environ.get("FUNCTION_THREADS", "48"))  # idle threads cost little; keep it above the requests
# a function admits at once, so one over its limit is answered at once, not queued in waitress
MAX_BODY = int(os.environ.get("MAX_BODY_BYTES", str(32 * 1024 * 1024)))
# Open connections served at once; waitress's default of 100 stalls a proxy that keeps more upstream
# connections (a watchdog or load balancer under 256 concurrent requests). poll(), not select(),
# so more than 1,024 sockets are possible.
CONNECTIONS = int(os.environ.get("FUNCTION_CONNECTIONS", "1000"))


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


IN_FLIGHT = lifecycle.InFlight()


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
    lifecycle.remove_lock()
    if workers.is_supervisor():  # FUNCTION_WORKERS > 1: this process only starts and watches them
        sys.exit(workers.supervise(HOST, PORT, lifecycle.LOCK_FILE, lifecycle.DRAIN_TIMEOUT))
    server = create_server(app, **workers.listen_args(HOST, PORT), threads=THREADS,
                           max_request_body_size=MAX_BODY + 1, channel_timeout=120, ident="function",
                           connection_limit=CONNECTIONS, asyncore_use_poll=True,
                           inbuf_overflow=8 * 1024 * 1024)  # photo-sized bodies stay in memory, not a temp file

    def drain(signum, frame):
        threading.Thread(target=lifecycle.drain_then_exit, name="drain", daemon=True,
                         args=(lambda: unfinished(server), getattr(handler, "shutdown", None))).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    lifecycle.start_warm_up(getattr(handler, "init", None), getattr(handler, "alive", None))
    LOG.info("serving on http://%s:%d", HOST, PORT)
    server.run()


if __name__ == "__main__":
    main()
