"""Prometheus metrics of both services, served on --metrics-port at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("clipsearch_requests", "Finished RPCs", ["method", "status"])
REQUEST_SECONDS = Histogram("clipsearch_request_seconds", "RPC latency", ["method"],
                            buckets=LATENCY_BUCKETS)
# by token name (clipsearch/access.py): "unknown" for a missing or unknown token
CALLER_REQUESTS = Counter("clipsearch_caller_requests", "Finished RPCs by token name",
                          ["caller", "method", "status"])
CALLER_REFUSALS = Counter("clipsearch_caller_refusals", "RPCs refused by token name and reason "
                          "(unauthenticated, permission, rate, concurrency)",
                          ["caller", "method", "reason"])

# encoder
BATCH_SIZE = Histogram("clipsearch_encoder_batch_size", "Items per model batch", ["tower"],
                       buckets=BATCH_BUCKETS)
BATCH_SECONDS = Histogram("clipsearch_encoder_batch_seconds", "Model time per batch", ["tower"],
                          buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("clipsearch_encoder_queue_depth", "Items waiting for a batch", ["tower"])
MODEL_LOAD_SECONDS = Gauge("clipsearch_encoder_model_load_seconds",
                           "Time to load and warm the model")
ITEM_ERRORS = Counter("clipsearch_encoder_item_errors", "Items refused as bad input", ["tower"])

# search
MILVUS_SECONDS = Histogram("clipsearch_milvus_seconds", "Milvus call latency", ["operation"],
                           buckets=LATENCY_BUCKETS)
COLLECTION_SIZE = Gauge("clipsearch_collection_size", "Images stored (as of the last count)")
INDEXED = Counter("clipsearch_indexed_items", "Index items answered", ["status"])
SEARCH_BATCH_SIZE = Histogram("clipsearch_search_batch_size",
                              "Text queries sharing one encoder call", buckets=BATCH_BUCKETS)
QUERY_CACHE_LOOKUPS = Counter("clipsearch_query_cache_lookups",
                              "Query texts looked up in the query-embedding cache",
                              ["result"])  # hit | miss
QUERY_CACHE_EVICTIONS = Counter("clipsearch_query_cache_evictions",
                                "Query vectors evicted to keep the cache within its bytes")
QUERY_CACHE_BYTES = Gauge("clipsearch_query_cache_bytes",
                          "Bytes held by the query-embedding cache (vectors, texts, overhead)")
QUERY_CACHE_ENTRIES = Gauge("clipsearch_query_cache_entries",
                            "Query vectors held by the query-embedding cache")


def observe_request(method: str, status: str, seconds: float) -> None:
    REQUESTS.labels(method, status).inc()
    REQUEST_SECONDS.labels(method).observe(seconds)


def serve_metrics(host: str, port: int) -> None:
    """Starts the /metrics HTTP endpoint on a daemon thread (port 0: not at all)."""
    if port:
        start_http_server(port, addr=host)
