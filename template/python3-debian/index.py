"""Template host: serves function/handler.py over WSGI (waitress) behind of-watchdog (mode=http).

The handler stays pure: handle(event, context) -> {"statusCode", "body", "headers"}; an optional
handler.init() runs once before the function reports ready, an optional handler.alive() is polled
once it is (False: the function can no longer serve; the host takes it out), and an optional
handler.shutdown() runs last when SIGTERM has drained the requests. This file is the adapter between
waitress and the handler; the rest is in modules of their own: settings (settings.py), request ids,
counters, the access log and /metrics (observe.py), waitress's connections and refusals
(connections.py), readiness, liveness and drain (lifecycle.py), worker processes (workers.py), CPUs
(cpus.py). README.md describes the handler's API.
"""

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import connections
import cpus
import lifecycle
import observe
import settings
import workers
from waitress import create_server
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header
from werkzeug.wrappers import Request, Response
from werkzeug.wsgi import ClosingIterator

lifecycle.load_env_file("function.env")  # before the handler reads its settings
# function/handler.py, imported by main() once this host listens: connections that come while the
# function's modules load (a watchdog's, as the function starts) wait in the backlog, not refused.
handler: Any = None

LOG = logging.getLogger("host")


class Event:
    """One request as the handler sees it: body (bytes), headers, method, query, path."""

    def __init__(self, request: Request, body: bytes) -> None:
        self.body = body
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class Context:
    """What the host tells the handler about this request: its request_id, and note(images=, batches=,
    code=), which adds to the request's access-log line (observe.Record.note)."""

    def __init__(self, record: observe.Record) -> None:
        self.hostname = os.environ.get("HOSTNAME", "localhost")
        self.request_id = record.request_id
        self.note = record.note


IN_FLIGHT = lifecycle.InFlight()
OBSERVER: observe.Observer  # the function's observability, made by main() once the handler is imported


def prefers_html(accept: str) -> bool:
    return parse_accept_header(accept, MIMEAccept).best_match(["application/json", "text/html"]) == "text/html"


def host_answer(status: int, code: str, message: str, request_id: str, accept: str) -> tuple[str, bytes]:
    """An answer the host makes itself (a refusal, a handler that failed): (content type, body). JSON,
    or the function's own page (handler.error_page) for a browser that prefers HTML."""
    error_page = getattr(handler, "error_page", None)
    if error_page is not None and prefers_html(accept):
        try:
            page = error_page(status, code, message, request_id)
        except Exception:
            LOG.exception("the function's error_page() failed; answering JSON")
            page = None
        if page is not None:
            return "text/html; charset=utf-8", page.encode("utf-8")
    body = {"error": {"code": code, "message": message}, "request_id": request_id}
    return "application/json", json.dumps(body).encode()


def to_response(result: Any) -> Response:
    """The handler's answer ({"statusCode", "body", "headers"}, a bare body or a Response) as a Response."""
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


def answer(request: Request, data: bytes, record: observe.Record) -> tuple[Response, object]:
    """The handler's answer to one request, and the body it gave (for its error code)."""
    try:
        result = handler.handle(Event(request, data), Context(record))
        return to_response(result), (result.get("body") if isinstance(result, dict) else result)
    except Exception:  # a bug, never bad input: log it, never show a stack trace
        LOG.exception("handler failed")
        status, code, message = 500, "internal_error", "The function failed unexpectedly."
        accept = request.headers.get("Accept", "")
        content_type, body = host_answer(status, code, message, record.request_id, accept)
        return Response(body, status=status, content_type=content_type), {"error": {"code": code}}


def serve(environ: dict, start_response: Callable) -> Iterable[bytes]:
    request = Request(environ)
    data = request.get_data()  # waitress has already refused bodies over MAX_BODY_BYTES
    if request.path == "/metrics" and request.method in ("GET", "HEAD"):  # never the handler's, never counted
        text, content_type = OBSERVER.exposition(request.headers.get("Accept", ""))
        headers = {"Cache-Control": "no-store", "X-Request-Id": observe.request_id(None)}  # as every answer
        response = Response(text, content_type=content_type, headers=headers)
        return response(environ, start_response)
    record = OBSERVER.start(request.method, request.headers.get("X-Request-Id"), len(data))
    response, given = answer(request, data, record)
    response.headers["X-Request-Id"] = record.request_id
    OBSERVER.finish(record, response.status_code, given)
    return response(environ, start_response)


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """The WSGI app: a request counts as in flight from here until the server closes its answer."""
    IN_FLIGHT.enter()
    try:
        return ClosingIterator(serve(environ, start_response), IN_FLIGHT.leave)
    except BaseException:
        IN_FLIGHT.leave()
        raise


def answer_refusal(refused: connections.Refused) -> tuple[int, list[tuple[str, str]], bytes]:
    """A request waitress refused before the handler could see it: the host's answer, counted and logged."""
    status, code, message = connections.refusal(refused)
    record = OBSERVER.start(refused.method, refused.headers.get("X_REQUEST_ID"), 0)
    content_type, body = host_answer(status, code, message, record.request_id, refused.headers.get("ACCEPT", ""))
    OBSERVER.finish(record, status, {"error": {"code": code}}, timed=False)
    return status, [("Content-Type", content_type), ("X-Request-Id", record.request_id)], body


def import_handler() -> Any:
    """function/handler.py; a bad setting found as it loads (SettingError) ends the host with its one line."""
    try:
        from function import handler as imported
    except settings.SettingError as error:
        lifecycle.exit_for_setting(error)
    return imported


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lifecycle.remove_lock()
    try:
        config = settings.host()
    except settings.SettingError as error:
        lifecycle.exit_for_setting(error)
    logging.getLogger().setLevel(config["LOG_LEVEL"])
    host, port = config["FUNCTION_HOST"], config["FUNCTION_PORT"]
    # before the function is imported: it sizes its threads from FUNCTION_CPUS (cpus.py)
    LOG.info("%d CPUs per process (%s)", *cpus.publish(workers.count()))
    if workers.is_supervisor():  # FUNCTION_WORKERS > 1: this process only starts and watches them
        sys.exit(workers.supervise(host, port, lifecycle.LOCK_FILE, config["DRAIN_TIMEOUT_S"]))
    connections.answer_refusal = answer_refusal
    # the listening socket is made here and handed to waitress (its `sockets` argument): its
    # connections say whether they hold unfinished work, which the drain waits for
    listener = lifecycle.Listener.wrap(workers.listen_socket(host, port))
    global handler, OBSERVER
    handler = import_handler()
    OBSERVER = observe.Observer.for_handler(handler)

    server = create_server(
        app,
        sockets=[listener],
        threads=config["FUNCTION_THREADS"],
        max_request_body_size=config["MAX_BODY_BYTES"] + 1,
        channel_timeout=120,
        ident="function",
        connection_limit=config["FUNCTION_CONNECTIONS"],
        asyncore_use_poll=True,
        inbuf_overflow=8 * 1024 * 1024,
    )  # photo-sized bodies stay in memory, not a temp file
    server.channel_class = connections.Channel  # type: ignore[union-attr]

    def busy() -> bool:
        return IN_FLIGHT.count > 0 or listener.busy()

    def shutdown() -> None:  # last in the drain: the function's shutdown(), then this worker leaves the sums
        try:
            if hasattr(handler, "shutdown"):
                handler.shutdown()
        finally:
            observe.worker_exiting()

    def drain(signum: int, frame: Any) -> None:
        threading.Thread(target=lifecycle.drain_then_exit, name="drain", daemon=True, args=(busy, shutdown)).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    lifecycle.start_warm_up(getattr(handler, "init", None), getattr(handler, "alive", None))
    LOG.info("serving on http://%s:%d", host, port)
    server.run()


if __name__ == "__main__":
    main()
