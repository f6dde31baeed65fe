"""The host's connections: waitress's own, with what a function behind a proxy needs.

- Refusals waitress answers itself, before any app sees the request (a body over MAX_BODY_BYTES from
  its Content-Length, bad chunking, over-large headers), are JSON like every other error.
- A request refused from its headers does not ask for 100 Continue.
- A refused request's connection is closed gently (see LINGER_S), never with a reset.
"""

import json
import logging
import socket
import time
import uuid

import settings
import waitress.channel
import waitress.parser
import waitress.utilities

LOG = logging.getLogger("host")


WAITRESS_CODES = {413: "body_too_large", 431: "headers_too_large", 400: "bad_request"}


def waitress_error_as_json(self: waitress.utilities.Error, ident: str | None = None) -> tuple:
    code = WAITRESS_CODES.get(self.code, "http_error")
    limit = settings.host()["MAX_BODY_BYTES"]
    message = f"The request body is larger than {limit} bytes." if self.code == 413 else f"{self.reason}."
    request_id = uuid.uuid4().hex  # as every answer carries one (the request's own is not parsed yet)
    body = json.dumps({"error": {"code": code, "message": message}, "request_id": request_id}).encode()
    return f"{self.code} {self.reason}", [("Content-Type", "application/json"), ("X-Request-Id", request_id)], body


def json_protocol_errors() -> None:
    """Make waitress's own protocol errors JSON, like every other error of the function.

    waitress answers these before any app sees the request: an over-long body is refused from its
    Content-Length before the body is read (the app is only called once a whole body has arrived,
    so it cannot refuse one early), and so are bad chunking and over-large headers. waitress has no
    public setting for the format of these answers; its Error.to_response (stable since waitress 1)
    is the one point they all go through. Set here, in the host process only, never on import; a
    waitress without it keeps its plain-text answers (same statuses) and says so in the log."""
    error = getattr(waitress.utilities, "Error", None)
    if error is None or not callable(getattr(error, "to_response", None)):
        LOG.warning("this waitress has no Error.to_response: its protocol errors stay plain text")
        return
    error.to_response = waitress_error_as_json


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
