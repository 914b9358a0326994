"""Prometheus metrics under vLLM's names with the ``jvt:`` prefix, in a registry of their own.

Per-request counters and histograms are observed on the engine thread when a request finishes
(``observe``); the engine-state gauges read the bridge's latest ``engine.stats()`` snapshot at
scrape time, so a scrape never calls into the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jvt.types import RequestOutput

# vLLM's bucket bounds (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0)


class ServerMetrics:
    """The server's metrics. stats: returns the latest engine.stats() dict ({} before the
    first step), or None: no engine behind this process alone (Ray Serve replicas export their
    own); unfinished: the API process's count of unfinished engine requests."""

    def __init__(self, model_name: str, stats: Callable[[], dict] | None,
                 unfinished: Callable[[], int] = lambda: 0):
        # Counters would also export a *_created series each; vLLM turns them off too
        # (process-wide: the server owns its process).
        prometheus_client.disable_created_metrics()
        self.model_name = model_name
        self.registry = r = CollectorRegistry()
        label = ["model_name"]
        self.prompt_tokens = Counter("jvt:prompt_tokens", "Prompt tokens of finished requests.",
                                     label, registry=r)
        self.generation_tokens = Counter("jvt:generation_tokens",
                                         "Generated tokens of finished requests.", label,
                                         registry=r)
        self.request_success = Counter("jvt:request_success",
                                       "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.prefix_cache_hits = Counter("jvt:prefix_cache_hits",
                                         "Prompt tokens whose KV was reused (prefix sharing).",
                                         label, registry=r)
        self.ttft = Histogram("jvt:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("jvt:inter_token_latency_seconds", "Time between output tokens.",
                             label, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("jvt:e2e_request_latency_seconds", "Request arrival to finish.",
                             label, buckets=_REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("jvt:request_queue_time_seconds",
                                    "Request arrival to its first step.", label,
                                    buckets=_REQUEST_BUCKETS, registry=r)
        r.register(_EngineCollector(model_name, stats, unfinished))

    def observe(self, out: RequestOutput) -> None:
        """Record one finished request (engine thread)."""
        m, name = out.metrics, self.model_name
        self.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(name).inc(len(out.token_ids))
        self.request_success.labels(name, out.finish_reason).inc()
        self.prefix_cache_hits.labels(name).inc(m.prefix_tokens_reused)
        if m.ttft is not None:
            self.ttft.labels(name).observe(m.ttft)
        itl = self.itl.labels(name)
        for gap in m.itl:
            itl.observe(gap)
        if m.finished_time is not None:
            self.e2e.labels(name).observe(m.finished_time - m.arrival_time)
        if m.queue_time is not None:
            self.queue_time.labels(name).observe(m.queue_time)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


KV_USAGE_DOC = "Fraction of the KV budget's chunks in use (1 = full), retained slots included."


class _EngineCollector:
    """Gauges (and the preemption counter) derived from the engine's stats at scrape time, and
    the API side's count of unfinished requests."""

    def __init__(self, model_name: str, stats: Callable[[], dict] | None,
                 unfinished: Callable[[], int]):
        self.model_name = model_name
        self.stats = stats
        self.unfinished = unfinished

    def collect(self):
        label = [self.model_name]
        gauges = [("jvt:num_requests_unfinished",
                   "Requests the server holds (queued, running or finishing; the API side).",
                   self.unfinished())]
        if self.stats is not None:
            s = self.stats()
            gauges += [("jvt:num_requests_running", "Requests in the running batch.",
                        s.get("running", 0)),
                       ("jvt:num_requests_waiting", "Requests waiting to be scheduled.",
                        s.get("waiting", 0)),
                       ("jvt:kv_cache_usage_perc", KV_USAGE_DOC, kv_usage(s))]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(label, value)
            yield g
        if self.stats is None:
            return
        c = CounterMetricFamily("jvt:num_preemptions", "Preemptions (swap or recompute).",
                                labels=["model_name"])
        c.add_metric(label, s.get("preemptions", 0))
        yield c


def kv_usage(s: dict) -> float:
    """Fraction of the KV budget's chunks in use, from engine.stats()."""
    budget_chunks = s.get("kv_budget_bytes", 0) // max(1, s.get("chunk_bytes", 1))
    return s.get("chunks_in_use", 0) / budget_chunks if budget_chunks else 0.0
