"""Prometheus metrics shared by the HTTP and gRPC servers (one registry per server, not the global one).

Per-request figures (outcome, TTFT, time per output token, end-to-end latency) are observed by the front end
when a request ends; engine figures (queues, KV pages, prefix-cache hit rate, preemptions, tokens, steps,
compilations) are read from the engine at scrape time, so the engine loop pays nothing for them.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

OUTCOMES = (
    "stop",
    "length",
    "abort",
    "error",
    "cancelled",
    "deadline",
    "invalid",
    "rejected",
    "unavailable",
    "not_found",
    "unauthenticated",
    "slow_client",
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, engine, model_name: str = "", registry: CollectorRegistry | None = None):
        """engine: a jaxserve.engine_api.Engine (its stats() are read at scrape time)."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("jaxserve_requests", "Requests that ended, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.ttft = Histogram(
            "jaxserve_time_to_first_token_seconds",
            "Arrival to first token (queue + prefill)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "jaxserve_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jaxserve_e2e_request_latency_seconds", "Arrival to the last output", buckets=_LATENCY_BUCKETS, registry=r
        )
        r.register(_EngineCollector(engine, model_name))

    def observe(self, outcome: str, output=None) -> None:
        """A request ended with `outcome` (one of OUTCOMES); `output` is its last RequestOutput, if any."""
        self.requests.labels(outcome).inc()
        if output is None:
            return
        m = output.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.tpot is not None:
            self.tpot.observe(m.tpot)
        end = m.finished_time or m.last_token_time
        if end is not None:
            self.e2e.observe(end - m.arrival_time)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        st = self.engine.stats()  # data parallel: summed over the replicas

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            return c

        info = GaugeMetricFamily("jaxserve_model_info", "The served model (value 1)", labels=["model"])
        info.add_metric([self.model_name], 1)
        yield info
        yield gauge("jaxserve_num_requests_waiting", "Sequences in the waiting queue", st.num_waiting)
        yield gauge("jaxserve_num_requests_running", "Sequences holding KV pages", st.num_running)
        yield gauge("jaxserve_kv_pages_in_use", "KV cache pages referenced by a request", st.kv_pages_in_use)
        yield gauge("jaxserve_kv_pages_total", "Usable KV cache pages", st.kv_pages_total)
        queried, hits = st.prefix_cache_queries, st.prefix_cache_hits
        yield gauge(
            "jaxserve_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / looked up",
            hits / queried if queried else 0.0,
        )
        yield counter("jaxserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", queried)
        yield counter("jaxserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", hits)
        yield counter(
            "jaxserve_num_preemptions", "Sequences preempted (recomputed later) for lack of pages", st.num_preemptions
        )
        yield counter("jaxserve_prompt_tokens", "Prompt tokens admitted", st.prompt_tokens)
        yield counter("jaxserve_generation_tokens", "Tokens generated", st.generation_tokens)
        yield counter("jaxserve_engine_steps", "Engine steps run", st.steps)
        yield counter(
            "jaxserve_compilations", "XLA compilations in this process (persistent-cache loads too)", st.compilations
        )
        yield counter(
            "jaxserve_compilation_cache_hits", "Compilations served by the persistent cache", st.compilation_cache_hits
        )
        # Speculative decoding (vLLM's spec_decode counters); all 0 without a speculative_config.
        drafts, proposed, accepted = st.spec_num_drafts, st.spec_num_draft_tokens, st.spec_num_accepted_tokens
        yield counter("jaxserve_spec_decode_num_drafts", "Sequences that verified proposals, per step", drafts)
        yield counter("jaxserve_spec_decode_num_draft_tokens", "Proposed tokens verified", proposed)
        yield counter("jaxserve_spec_decode_num_accepted_tokens", "Proposed tokens accepted", accepted)
        yield gauge(
            "jaxserve_spec_decode_acceptance_rate",
            "Accepted / proposed tokens since start",
            accepted / proposed if proposed else 0.0,
        )
        yield gauge(
            "jaxserve_spec_decode_mean_accepted_length",
            "Tokens a verifying sequence emits per step, on average (1 + accepted / drafts)",
            1 + accepted / drafts if drafts else 0.0,
        )
        yield gauge(
            "jaxserve_compilations_since_warmup",
            "Compilations after warm-up (0 in a healthy server)",
            st.compilations_since_warmup,
        )
