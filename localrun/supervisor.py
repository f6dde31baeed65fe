"""What scripts/serve does with the functions it started: their logs shown on its stderr as they are
written, "serving" said once all are ready, and, when one exits on its own (it cannot start: a bad
setting, a missing program), the others stopped and the gateway ended non-zero with that function's
reason in one line, instead of serving 502s."""

import logging
import os
import re
import sys
import threading
import time
from typing import TextIO

from localrun.functions import FunctionProcess

LOG = logging.getLogger("gateway")
POLL_S = 0.1
# of-watchdog's own lines (Go's log format); the function's lines pass through it unprefixed
WATCHDOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")
# the template host's log prefix (time, logger, level): the reason is what follows it
HOST_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ (?:CRITICAL|ERROR|WARNING|INFO|DEBUG) ")
REASON_CHARS = 300


def one_line_reason(log: str) -> str:
    """Why a function exited, from the end of its log: the exception line of its last traceback, else
    its last line that is not the watchdog's (nsenter's "failed to execute", a host's own error)."""
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    traceback_at = max(
        (i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), default=None
    )
    if traceback_at is not None:
        # the exception line is the first one after the header that is not indented (frames, source)
        for line in lines[traceback_at + 1 :]:
            if not line[0].isspace():
                return line[:REASON_CHARS]
    own = [line for line in lines if not WATCHDOG_LINE.match(line)]
    return HOST_PREFIX.sub("", (own or lines or ["it wrote nothing"])[-1])[:REASON_CHARS]


class Relay(threading.Thread):
    """Copies a function's log file to our stderr in whole lines as it grows. A file, not a pipe: a
    function never blocks on a slow terminal, nor fails on a broken pipe once the gateway is gone."""

    lock = threading.Lock()  # one line at a time from all relays

    def __init__(self, fn: FunctionProcess) -> None:
        super().__init__(name=f"relay-{fn.name}", daemon=True)
        self.fn = fn
        self.done = threading.Event()  # set once everything the exited function wrote is shown

    def run(self) -> None:
        pending = b""
        with open(self.fn.dir / "function.log", "rb") as log:
            while True:
                exited = self.fn.started.poll() is not None  # read before the last read: nothing is missed
                chunk = log.read(1 << 16)
                if chunk:
                    whole, newline, pending = (pending + chunk).rpartition(b"\n")
                    self.show(whole + newline)
                elif exited:
                    self.show(pending + b"\n" if pending else b"")
                    break
                else:
                    time.sleep(POLL_S)
        self.done.set()

    def show(self, data: bytes) -> None:
        if data:
            with self.lock:
                sys.stderr.buffer.write(data)
                sys.stderr.flush()


def say(line: str, stream: TextIO | None = None) -> None:
    """One line in one write, under the relays' lock: never spliced into a function's log line (stdout
    and stderr often share one file, unbuffered, where print() writes the text and its newline apart)."""
    stream = stream or sys.stdout
    with Relay.lock:
        stream.flush()
        stream.buffer.write(line.encode() + b"\n")
        stream.buffer.flush()


class Supervisor:
    """Watches the functions until the gateway stops them (stop(), on SIGTERM/SIGINT) or one of them
    exits on its own (then every function is stopped and the process exits 1). `ready_line` is printed
    once every function is ready."""

    def __init__(self, functions: dict[str, FunctionProcess], ready_line: str) -> None:
        self.functions = functions
        self.ready_line = ready_line
        self.relays = {name: Relay(fn) for name, fn in functions.items()}
        self.ending = threading.Lock()  # held by whoever ends the functions first: a signal or a failure

    def start(self) -> None:
        for relay in self.relays.values():
            relay.start()
        threading.Thread(target=self.watch, name="supervisor", daemon=True).start()

    def watch(self) -> None:
        announced = False
        while True:
            for fn in self.functions.values():
                if fn.started.poll() is not None:
                    self.give_up(fn, announced)
                    return
            if not announced and all(fn.healthy() for fn in self.functions.values()):
                say(self.ready_line)
                announced = True
            time.sleep(POLL_S)

    def give_up(self, fn: FunctionProcess, was_ready: bool) -> None:
        if not self.ending.acquire(blocking=False):
            return  # stopping on a signal: its exit is expected
        self.relays[fn.name].done.wait(5)  # its last lines first, then the reason under them
        reason = one_line_reason(fn.output())
        what = "exited" if was_ready else "could not start"
        self.stop_all()
        say(f"gateway: {fn.name} {what} (exit status {fn.started.returncode}): {reason}", sys.stderr)
        os._exit(1)

    def stop(self) -> None:
        """Each function drains and stops (the page first, then what it calls), then exit 0."""
        if self.ending.acquire(blocking=False):
            self.stop_all()
            os._exit(0)

    def stop_all(self) -> None:
        for fn in reversed(list(self.functions.values())):
            fn.stop(timeout=70)
