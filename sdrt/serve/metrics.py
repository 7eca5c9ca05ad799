"""Prometheus metrics for `sdrt serve` (prometheus-client), in a registry of the app's own, so two apps
in one process (tests, Ray replicas) don't share counters. GET /metrics serves them as text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sdrt_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("sdrt_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("sdrt_queue_wait_seconds", "time a generation waited in the queue",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sdrt_queue_depth", "generations waiting", registry=r)
        self.in_flight = Gauge("sdrt_in_flight", "generations running (one batch)", registry=r)
        self.rejections = Counter("sdrt_rejections", "requests refused before any work, by reason", ["reason"],
                                  registry=r)
        self.cancelled = Counter("sdrt_cancelled", "generations cancelled, by reason", ["reason"], registry=r)
        self.unet_steps = Counter("sdrt_unet_steps", "sampling steps run (one batched UNet call each)", registry=r)
        self.images = Counter("sdrt_images", "images generated", registry=r)
        self.batch_images = Histogram("sdrt_batch_images", "images per batched generation",
                                      buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.unet_call_generations = Histogram("sdrt_unet_call_generations",
                                               "generations sharing one UNet call (--batching continuous)",
                                               buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.steps_per_second = Gauge("sdrt_unet_steps_per_second", "sampling steps per second, last generation",
                                      registry=r)
        self.images_per_second = Gauge("sdrt_images_per_second", "images per second, last generation", registry=r)

    def text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
