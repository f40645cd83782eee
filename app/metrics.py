"""The Prometheus metrics updated as things happen (app.telemetry serves them at
/metrics): in this process's memory, or under `poe serve` with several API processes in
PROMETHEUS_MULTIPROC_DIR, summed over the processes when scraped. The per-request ones
go through TALLY: gathered in plain Python and added up once a second.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

from prometheus_client import Counter, Histogram

HTTP_SECONDS = Histogram(
    "poe_http_request_duration_seconds", "HTTP requests by method, route template and status: latency "
    "(the _count series counts the requests)", ["method", "route", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ASSEMBLY_SECONDS = Histogram(
    "poe_model_assembly_seconds", "Time to assemble a composite model from the pool's ONNX parts",
    buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25))
MODEL_CACHE = Counter("poe_model_cache_requests", "Composite models asked of the model cache, by result "
                      "(hit: in memory; miss: assembled)", ["result"])
CACHE_HIT, CACHE_MISS = MODEL_CACHE.labels("hit"), MODEL_CACHE.labels("miss")
NATIVE_ANSWERS = Counter("poe_native_lane_answers", "POST /models answered by the native lane (plain queries "
                         "joined in C, no cache; see app.serving.native)")



class Tally:
    """Histogram observations and counter increments gathered in plain Python and added to
    their Prometheus metrics in bulk by `flush` (once a second in an API process, before
    /metrics answers, and at shutdown). On the request path an update is then a dict
    increment under an uncontended lock, where an observation written straight through
    costs about 8 us under several API processes (memory-mapped files, a lock each);
    measured in benchmarks/service.py, request ids and metrics cost 20% of a cached
    POST /models's throughput before this. Metrics are at most a second behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._observed: dict = {}  # histogram child -> [sum, count per bucket]
        self._counted: dict = {}  # counter child -> increment

    def observe(self, child: Histogram, amount: float) -> None:
        with self._lock:
            entry = self._observed.get(child)
            if entry is None:
                entry = self._observed[child] = [0.0, [0] * len(child._upper_bounds)]
            entry[0] += amount
            # Histogram.observe counts an amount in the first bucket whose bound is >= it.
            entry[1][bisect_left(child._upper_bounds, amount)] += 1

    def inc(self, child: Counter, amount: float = 1) -> None:
        with self._lock:
            self._counted[child] = self._counted.get(child, 0) + amount

    def flush(self) -> None:
        with self._lock:
            observed, self._observed = self._observed, {}
            counted, self._counted = self._counted, {}
        for child, (total, buckets) in observed.items():
            child._sum.inc(total)
            for value, n in zip(child._buckets, buckets, strict=True):
                if n:
                    value.inc(n)
        for child, n in counted.items():
            child.inc(n)


TALLY = Tally()
