"""How many images decode at once: by count (the cores), by memory (what the decoded pixels will
cost, known from the header), and small pictures first: they go ahead of big ones whenever a slot
frees, and with three or more slots one is always kept for them.

Counting images alone lets two 50-megapixel 16-bit PNGs take gigabytes at once; counting slots alone
lets two slow decodes hold every core while a normal photo waits behind them.
"""

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import DeadlineExceeded

# Bytes per pixel as Pillow holds a decoded image (RGB takes 4), by mode; anything else: 4.
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 4, "PA": 4}
RGB_BYTES = 4


def decode_cost(mode: str, width: int, height: int) -> int:
    """Peak bytes to decode a picture and turn it into RGB: the decoded pixels plus one RGB copy."""
    return width * height * (MODE_BYTES.get(mode, 4) + RGB_BYTES)


def _malloc_trim() -> Callable[[], object]:
    """glibc keeps freed memory of big decodes in its arenas; trimming gives it back to the system."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        trim = None
    return (lambda: trim(0)) if trim else (lambda: None)


trim_memory = _malloc_trim()  # also after requests with big bodies (handler.py)


class DecodeGate:
    def __init__(self, slots: int, memory_bytes: int, heavy_pixels: int, trim_bytes: int = 64 << 20):
        self.slots = max(1, slots)
        # With 3+ slots one is always left for small pictures; with fewer, keeping one would halve the
        # rate of big ones, so small pictures only go first whenever a slot frees.
        self.heavy_slots = self.slots - 1 if self.slots > 2 else self.slots
        self.memory_bytes = memory_bytes
        self.heavy_pixels = heavy_pixels
        self.trim_bytes = trim_bytes
        self._cond = threading.Condition()
        self._busy = self._heavy = self._bytes = self._small_waiting = self._waiting = 0

    def _fits(self, cost: int, heavy: bool) -> bool:
        if self._busy >= self.slots or (heavy and (self._heavy >= self.heavy_slots or self._small_waiting)):
            return False
        return self._busy == 0 or self._bytes + cost <= self.memory_bytes  # alone, any picture may decode

    @contextmanager
    def enter(self, pixels: int, cost: int, deadline: float) -> Iterator[None]:
        """Hold a decoding slot for `cost` bytes; raises DeadlineExceeded if none frees up in time."""
        heavy = pixels > self.heavy_pixels
        with self._cond:
            self._small_waiting += not heavy
            self._waiting += 1
            try:
                fits = self._cond.wait_for(lambda: self._fits(cost, heavy), max(0.0, deadline - time.monotonic()))
            finally:
                self._small_waiting -= not heavy
                self._waiting -= 1
            if not fits:
                self._cond.notify_all()  # heavy ones may have waited for this small one
                raise DeadlineExceeded()
            self._busy += 1
            self._heavy += heavy
            self._bytes += cost
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._heavy -= heavy
                self._bytes -= cost
                self._cond.notify_all()
            if cost >= self.trim_bytes:
                trim_memory()

    @property
    def bytes_in_use(self) -> int:
        return self._bytes

    @property
    def waiting(self) -> int:
        """Decodes waiting for a slot (or, for an instant, checking whether one is free)."""
        return self._waiting
