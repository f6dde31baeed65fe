"""The host's connections: waitress's own, with what a function behind a proxy needs.

- Refusals waitress answers itself, before any app sees the request (a body over MAX_BODY_BYTES from
  its Content-Length, bad chunking, over-large headers), are the host's: JSON like every other error,
  or the function's error page for a browser (RefusalTask, answer_refusal).
- A request refused from its headers does not ask for 100 Continue.
- A refused request's connection is closed gently (see LINGER_S), never with a reset.
"""

import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

import observe
import settings
import waitress.channel
import waitress.parser
import waitress.task

LOG = logging.getLogger("host")


@dataclass(frozen=True)
class Refused:
    """A request waitress refused itself, as the host sees it: the parser's error and what it had read."""

    status: int  # waitress's: 400, 413, 431, 500 (a task that failed), 501 (an unknown transfer coding)
    method: str  # "" when the start line was never read
    headers: Mapping[str, str]  # as waitress keeps them: ACCEPT, X_REQUEST_ID, ... (none for a 431)


# The host's answer to a refusal: (status, headers, body). index.py sets it to the function's own answer
# (its error page for a browser, counted and logged); this default is the JSON alone.
Answer = Callable[[Refused], tuple[int, list[tuple[str, str]], bytes]]


def json_refusal(refused: Refused) -> tuple[int, list[tuple[str, str]], bytes]:
    status, code, message = refusal(refused)
    request_id = observe.request_id(refused.headers.get("X_REQUEST_ID"))
    body = json.dumps({"error": {"code": code, "message": message}, "request_id": request_id}).encode()
    return status, [("Content-Type", "application/json"), ("X-Request-Id", request_id)], body


answer_refusal: Answer = json_refusal


def refusal(refused: Refused) -> tuple[int, str, str]:
    """(status, code, message) of a refusal, from the host's catalogue (observe.HOST_ERRORS). A transfer
    coding waitress does not know (its 501) is a bad request: one status per code."""
    if refused.status == 413:
        limit = settings.host()["MAX_BODY_BYTES"]
        return 413, "body_too_large", f"The request body is larger than {limit} bytes."
    if refused.status == 431:
        return 431, "headers_too_large", "The request's headers are larger than the function takes."
    if refused.status == 500:
        return 500, "internal_error", "The function failed unexpectedly."
    if refused.status == 501:
        return 400, "bad_request", "The request's Transfer-Encoding is not one the function reads."
    return 400, "bad_request", "The request is not valid HTTP (its start line, headers, length or chunking)."


class RefusalTask(waitress.task.ErrorTask):
    """waitress's answer to a request it refuses before any app sees it (a body over MAX_BODY_BYTES from
    its Content-Length, bad chunking, over-large headers): the host's answer (answer_refusal) instead
    of waitress's plain text. Here, unlike in waitress's Error.to_response, the request's headers are
    known: a browser gets the function's page, a caller its X-Request-Id back."""

    def execute(self) -> None:
        parser = self.request
        refused = Refused(int(parser.error.code), str(parser.command or ""), dict(parser.headers))
        try:
            status, headers, body = answer_refusal(refused)
        except Exception:  # waitress's error task must not fail
            LOG.exception("the host's answer to a refused request failed")
            status, headers, body = json_refusal(refused)
        self.status = f"{status} {HTTPStatus(status).phrase}"
        self.response_headers.extend(headers)
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


# A refused request's connection is closed gently: the answer, then our side shut (FIN), then what
# the client still sends is read and dropped until it closes, up to these bounds. Closed at once, a
# socket with unread bytes sends a reset, which throws away an answer the client (of-watchdog, busy
# writing the body it buffered) has not read yet: it then reports its own 500 instead of our 413.
LINGER_S = 5.0
LINGER_BYTES = 64 * 1024 * 1024


class Parser(waitress.parser.HTTPRequestParser):
    """waitress's request parser; a request refused from its headers (a Content-Length over the limit)
    no longer asks for 100 Continue: the client gets the refusal instead of an invitation to upload."""

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.error is not None:
            self.expect_continue = False
        return consumed


class Channel(waitress.channel.HTTPChannel):
    """waitress's connection, with Parser, and a lingering close after a refusal (see LINGER_S)."""

    parser_class = Parser
    error_task_class = RefusalTask
    refused = False  # an error answer (413, 431, 400) was served: the client may still be sending
    linger_until = 0.0  # while lingering: when to give up waiting for the client to close
    linger_left = 0

    def service(self) -> None:
        if self.requests and self.requests[0].error is not None:
            self.refused = True
        super().service()

    def handle_close(self) -> None:
        if self.linger_until or not self.refused or not self.connected or self.socket is None:
            super().handle_close()
            return
        try:
            self.socket.shutdown(socket.SHUT_WR)  # the answer is out (closing follows a flush): FIN
        except OSError:
            super().handle_close()
            return
        self.linger_until = time.monotonic() + LINGER_S
        self.linger_left = LINGER_BYTES
        self.will_close = False

    def readable(self) -> bool:
        if not self.linger_until:
            return bool(super().readable())
        if time.monotonic() > self.linger_until:
            self.will_close = True  # writable() then lets the loop call handle_write, which closes
            return False
        return True

    def writable(self) -> bool:
        return self.will_close if self.linger_until else bool(super().writable())

    def handle_read(self) -> None:
        if not self.linger_until:
            super().handle_read()
            return
        try:
            data = self.socket.recv(65536)
        except OSError:
            data = b""
        self.linger_left -= len(data)
        if not data or self.linger_left <= 0:
            super().handle_close()

    def handle_write(self) -> None:
        if self.linger_until:
            super().handle_close()
        else:
            super().handle_write()
