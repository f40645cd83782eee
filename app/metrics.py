"""The Prometheus metrics updated as things happen (app.telemetry serves them at
/metrics): in this process's memory, or under `poe serve` with several API processes in
PROMETHEUS_MULTIPROC_DIR, summed over the processes when scraped. Updating one costs
about a microsecond: children with fixed labels are bound here, once."""

from __future__ import annotations

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
