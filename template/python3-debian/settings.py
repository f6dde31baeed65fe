"""Settings from the environment, declared once each (type, default, allowed values) and checked at start.

A function declares its settings with Setting and reads them all with read() when its config module is
imported; the host imports function/handler.py at start, so a bad value stops the function there, with
one line naming the variable, the value given and what is allowed (SettingError; the host logs that line
and exits 78, EX_CONFIG), never later when a request meets it. The host's own settings are declared
here too (HOST_SETTINGS); host() gives their values, so a function can show e.g. MAX_BODY_BYTES without
a default of its own.

    from settings import Setting, read
    SETTINGS = read([Setting("MAX_BATCH", int, 0, minimum=0, maximum=256, doc="images per forward pass")])

Kinds: int, float, str, bool, and "list" (comma-separated; a tuple of the non-empty items, stripped).
An unset or empty (blank) variable takes the default, which is not checked: it is the declaration's own.
str and "list" with choices match them case-insensitively and give the choice as declared.
"""

import functools
import math
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import KW_ONLY, dataclass
from types import MappingProxyType
from typing import Any

EX_CONFIG = 78  # sysexits.h: a configuration error; what the host exits with on a SettingError
SHOWN_CHARS = 60  # of a bad value in the one line: a pasted file must not become the log line
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingError(ValueError):
    """A setting's value is not allowed. str(): one line, e.g.
    MAX_BATCH must be a whole number from 0 to 256, not 'eight'"""


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, kind (int, float, str, bool or "list"), default and limits."""

    name: str
    kind: Any
    default: Any
    _: KW_ONLY
    choices: Collection[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (int, float, str, bool, "list"):
            raise TypeError(f"{self.name}: kind must be int, float, str, bool or 'list', not {self.kind!r}")

    def allowed(self) -> str:
        """What the setting takes, in words: 'a whole number from 0 to 256', 'one of auto, cpu, cuda'."""
        if self.kind is bool:
            return "true or false (also 1/0, yes/no, on/off)"
        if self.kind in (int, float):
            noun = "a whole number" if self.kind is int else "a number"
            low, high = (_number(v) for v in (self.minimum, self.maximum))
            if low is not None and high is not None:
                return f"{noun} from {low} to {high}"
            if low is not None:
                return f"{noun} of at least {low}"
            return f"{noun} of at most {high}" if high is not None else noun
        if self.choices is None:
            return "a comma-separated list" if self.kind == "list" else "text"
        names = ", ".join(self.choices)
        return f"a comma-separated list of {names}" if self.kind == "list" else f"one of {names}"

    def parse(self, text: str) -> Any:
        """The value of `text` (already stripped, not empty); SettingError when it is not allowed."""
        if self.kind is bool:
            if text.lower() in TRUE + FALSE:
                return text.lower() in TRUE
            raise self.error(text)
        if self.kind in (int, float):
            return self._number(text)
        if self.kind == "list":
            items = tuple(item.strip() for item in text.split(",") if item.strip())
            return tuple(self._choice(item, text) for item in items)
        return self._choice(text, text)

    def _number(self, text: str) -> int | float:
        try:
            value = int(text) if self.kind is int else float(text)
        except ValueError:
            raise self.error(text) from None
        if not math.isfinite(value):
            raise self.error(text)
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise self.error(text)
        return value

    def _choice(self, item: str, text: str) -> str:
        if self.choices is None:
            return item
        for choice in self.choices:
            if choice.lower() == item.lower():
                return choice
        raise self.error(text)

    def error(self, text: str) -> SettingError:
        shown = text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."
        return SettingError(f"{self.name} must be {self.allowed()}, not {shown!r}")


def _number(value: float | None) -> str | None:
    """A limit as the message shows it: 256, 0.5, 33554432."""
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else str(value)


def read(declarations: Iterable[Setting], environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """{name: value} of every declared setting; the first bad value raises SettingError."""
    values = {}
    for setting in declarations:
        text = environ.get(setting.name, "").strip()
        values[setting.name] = setting.parse(text) if text else setting.default
    return values


# The host's own settings (index.py, lifecycle.py, workers.py). FUNCTION_PORT, not PORT: Knative sets
# PORT for the watchdog.
HOST_SETTINGS = (
    Setting("FUNCTION_HOST", str, "127.0.0.1", doc="address the host listens on (the watchdog's upstream)"),
    Setting("FUNCTION_PORT", int, 5000, minimum=1, maximum=65535, doc="port the host listens on"),
    # Idle threads cost little; above the requests a function admits at once, one over its limit is
    # answered at once, not queued in waitress.
    Setting("FUNCTION_THREADS", int, 48, minimum=1, maximum=10_000, doc="request threads per worker"),
    # waitress's default of 100 stalls a proxy that keeps more upstream connections (a watchdog under
    # 256 concurrent requests); poll(), not select(), so more than 1,024 sockets are possible.
    Setting("FUNCTION_CONNECTIONS", int, 1000, minimum=1, maximum=1_000_000, doc="open connections per worker"),
    Setting("MAX_BODY_BYTES", int, 32 * 1024 * 1024, minimum=1, doc="largest request body; larger ones get 413"),
    Setting("FUNCTION_WORKERS", int, 1, minimum=1, maximum=1024, doc="worker processes behind the one port"),
    Setting("DRAIN_TIMEOUT_S", float, 60.0, minimum=0, doc="longest SIGTERM drain"),
    Setting("FUNCTION_ALIVE_INTERVAL_S", float, 1.0, minimum=0.01, doc="how often alive() is polled once ready"),
    Setting("LOG_LEVEL", str, "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), doc="host logs"),
    Setting("LOG_FORMAT", str, "text", choices=("text", "json"), doc="access log lines: text or JSON"),
)


@functools.cache
def host() -> Mapping[str, Any]:
    """The host's settings, read once (after the host loaded function.env); SettingError if one is bad."""
    return MappingProxyType(read(HOST_SETTINGS))
