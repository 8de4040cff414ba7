"""The server's Prometheus metrics (prometheus-client), in a registry of its own."""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests by endpoint and status, tokens, latencies, and the scheduler's gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flaxlm_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("flaxlm_prompt_tokens", "prompt tokens of accepted "
                                     "requests", registry=r)
        self.generation_tokens = Counter("flaxlm_generation_tokens", "tokens generated",
                                         registry=r)
        self.ttft = Histogram("flaxlm_time_to_first_token_seconds", "from submission to a "
                              "request's first token", buckets=_LATENCY, registry=r)
        self.tpot = Histogram("flaxlm_time_per_output_token_seconds", "between a request's "
                              "tokens after the first", buckets=_LATENCY, registry=r)
        gauges = {"flaxlm_queue_depth": ("requests waiting or being prefilled",
                                         lambda: scheduler.queue_depth),
                  "flaxlm_busy_slots": ("decode slots holding a request",
                                        lambda: scheduler.busy_slots),
                  "flaxlm_max_slots": ("decode slots", lambda: scheduler.max_slots),
                  "flaxlm_programs_compiled": ("XLA programs compiled since start",
                                               lambda: scheduler.num_compiled)}
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
