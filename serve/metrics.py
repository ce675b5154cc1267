"""What the server shows Prometheus at /metrics: requests by HTTP status, tokens, latency, queue depth and
generations in flight; the crisis guard's counters (categories and counts); and, for an engine that batches
(serve/batching.py), its generate calls. Counts and categories only, never message text: the page is open to
scrapers that carry no key."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from cbt_llm.domain.guard import CrisisGuard

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)  # seconds


class ServeMetrics:
    """The server's own registry (one per app, so two apps in one process count apart)."""

    def __init__(self, engine, guard: CrisisGuard, concurrency: int):
        self.registry = reg = CollectorRegistry()
        self.requests = Counter("cbt_llm_requests", "chat completion requests by HTTP status", ["status"], registry=reg)
        self.tokens = Counter("cbt_llm_tokens", "tokens by kind (prompt, completion)", ["kind"], registry=reg)
        self.latency = Histogram(
            "cbt_llm_request_seconds",
            "chat completion latency, queueing included",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue = Gauge("cbt_llm_queue_depth", "requests waiting for the model", registry=reg)
        self.in_flight = Gauge("cbt_llm_in_flight", f"generations running (0 to {concurrency})", registry=reg)
        reg.register(GuardCollector(guard))
        if hasattr(engine, "batches"):
            reg.register(BatchCollector(engine))

    def count(self, status: int) -> None:
        """One chat completion request answered with HTTP `status`."""
        self.requests.labels(str(status)).inc()

    def page(self) -> str:
        """The Prometheus text exposition of everything above."""
        return generate_latest(self.registry).decode()


class GuardCollector:
    """The guard's counters on every scrape: categories and counts only, never message text."""

    def __init__(self, guard: CrisisGuard):
        self.guard = guard

    def collect(self):
        m = self.guard.metrics()
        turns = CounterMetricFamily("cbt_llm_guard_user_turns", "user turns checked by the crisis guard")
        turns.add_metric([], m["user_turns_total"])
        crisis = CounterMetricFamily(
            "cbt_llm_guard_crisis_turns", "crisis user turns by risk construct", labels=["construct"]
        )
        for cat, n in sorted(m["crisis_turns_total"].items()):
            crisis.add_metric([str(cat)], n)
        mode = CounterMetricFamily("cbt_llm_guard_crisis_mode_turns", "turns in crisis mode from an earlier turn")
        mode.add_metric([], m["crisis_mode_turns_total"])
        replaced = CounterMetricFamily(
            "cbt_llm_guard_output_replaced", "model outputs replaced by the crisis block", labels=["reason"]
        )
        for reason, n in sorted(m["output_replaced_total"].items()):
            replaced.add_metric([str(reason)], n)
        layers = CounterMetricFamily(
            "cbt_llm_guard_flags", "flags raised, by the layer that raised them", labels=["layer"]
        )
        for layer, n in sorted(m["flags_by_layer_total"].items()):
            layers.add_metric([str(layer)], n)
        errors = CounterMetricFamily(
            "cbt_llm_guard_layer_errors", "optional guard layers that failed (their verdict skipped)", labels=["layer"]
        )
        errors.add_metric(["classifier"], m["classifier_errors_total"])
        errors.add_metric(["model_tier"], m["model_tier_errors_total"])
        uncorroborated = CounterMetricFamily(
            "cbt_llm_guard_patterns_not_corroborated",
            "user turns a non-acute pattern matched and the learned layer read as no crisis (not flagged)",
        )
        uncorroborated.add_metric([], m["patterns_not_corroborated_total"])
        yield from (turns, crisis, mode, replaced, layers, errors, uncorroborated)


class BatchCollector:
    """A batching engine's counters (serve/batching.py): generate calls made, and the requests they answered."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        batches = CounterMetricFamily("cbt_serve_batches", "generate calls on the model (batches, lone samples)")
        batches.add_metric([], self.engine.batches)
        answered = CounterMetricFamily("cbt_serve_batched_requests", "requests answered by those generate calls")
        answered.add_metric([], self.engine.requests)
        yield from (batches, answered)
