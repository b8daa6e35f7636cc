"""Prometheus metrics of one server (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Every metric the server exports at ``/metrics``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "vitmerge_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "vitmerge_request_latency_seconds",
            "End-to-end request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "vitmerge_queue_wait_seconds",
            "Time an image waits before its batch starts",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "vitmerge_inference_seconds", "Engine time per batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "vitmerge_batch_size", "Images per engine batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("vitmerge_queue_depth", "Images waiting for the inference worker", registry=r)
        self.predictions = Counter(
            "vitmerge_predictions", "Predictions by task and routing source", ["task", "source"], registry=r
        )
        self.cache = Counter(
            "vitmerge_weight_cache_lookups", "Materialised task-weight cache lookups", ["result"], registry=r
        )
        self.merge_jobs = Counter("vitmerge_merge_jobs", "Merge jobs by outcome", ["outcome"], registry=r)
        self.model_info = Info("vitmerge_model", "The bundle being served", registry=r)
        self.swaps = Counter("vitmerge_model_swaps", "Hot swaps to a new bundle", registry=r)
        self.ready = Gauge("vitmerge_ready", "1 while a model is loaded and the worker is alive", registry=r)

    def cache_lookup(self, hit: bool) -> None:
        self.cache.labels("hit" if hit else "miss").inc()
