"""What the core measured of one request (Service.classify fills it as the work goes), for the edge to
record: the handler passes it to metrics and the access log. The core itself records nothing."""

import threading
from dataclasses import dataclass, field


@dataclass
class Measured:
    """Filled as the work goes, so a request that fails part-way still reports what it did."""

    images: int = 0
    texts: int = 0  # texts embedded (POST /embeddings)
    batches: list[tuple[int, int]] = field(default_factory=list)  # (seq, size) of each batch it rode in
    label_lookups: dict[str, int] = field(default_factory=dict)  # custom labels: hit, miss, shared
    fetches: list[str] = field(default_factory=list)  # per URL input: "ok" or its error code
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # a batch's pictures: in parallel

    def rode(self, batch: tuple[int, int]) -> None:
        with self._lock:
            if batch not in self.batches:
                self.batches.append(batch)

    def fetched(self, outcome: str) -> None:
        with self._lock:
            self.fetches.append(outcome)
