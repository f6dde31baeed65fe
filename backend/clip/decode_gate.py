"""How many images decode at once: by count (the cores), by memory (what the decoded pixels will
cost, known from the header), and with one slot kept for small pictures while big ones decode.

Counting images alone lets two 50-megapixel 16-bit PNGs take gigabytes at once; counting slots alone
lets two slow decodes hold every core while a normal photo waits behind them.
"""
import ctypes
import ctypes.util
import threading
import time
from contextlib import contextmanager

from .batcher import DeadlineExceeded

# Bytes per pixel as Pillow holds a decoded image (RGB takes 4), by mode; anything else: 4.
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 4, "PA": 4}
RGB_BYTES = 4


def decode_cost(mode: str, width: int, height: int) -> int:
    """Peak bytes to decode a picture and turn it into RGB: the decoded pixels plus one RGB copy."""
    return width * height * (MODE_BYTES.get(mode, 4) + RGB_BYTES)


def _malloc_trim():
    """glibc keeps freed memory of big decodes in its arenas; trimming gives it back to the system."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        trim = None
    return (lambda: trim(0)) if trim else (lambda: None)


class DecodeGate:
    def __init__(self, slots: int, memory_bytes: int, heavy_pixels: int, trim_bytes: int = 64 << 20):
        self.slots = max(1, slots)
        self.heavy_slots = max(1, self.slots - 1)  # with 2+ slots, one is always left for small pictures
        self.memory_bytes = memory_bytes
        self.heavy_pixels = heavy_pixels
        self.trim_bytes = trim_bytes
        self._trim = _malloc_trim()
        self._cond = threading.Condition()
        self._busy = self._heavy = self._bytes = 0

    def _fits(self, cost, heavy):
        if self._busy == 0:
            return True  # alone, anything within the pixel limit may decode
        if self._busy >= self.slots or (heavy and self._heavy >= self.heavy_slots):
            return False
        return self._bytes + cost <= self.memory_bytes

    @contextmanager
    def enter(self, pixels: int, cost: int, deadline: float):
        """Hold a decoding slot for `cost` bytes; raises DeadlineExceeded if none frees up in time."""
        heavy = pixels > self.heavy_pixels
        with self._cond:
            if not self._cond.wait_for(lambda: self._fits(cost, heavy), max(0.0, deadline - time.monotonic())):
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
                self._trim()

    @property
    def bytes_in_use(self) -> int:
        return self._bytes
