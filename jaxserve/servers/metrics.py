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


_LABELS = ["model", "version"]


class ServerMetrics:
    def __init__(self, models, registry: CollectorRegistry | None = None):
        """models: the server's jaxserve.servers.registry.ModelRegistry; each loaded version's engine stats()
        are read at scrape time, labelled model and version. Requests refused before a version was chosen carry
        model="" and version=""."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jaxserve_requests", "Requests that ended, by outcome", [*_LABELS, "outcome"], registry=r
        )
        for v in models.ready_versions():
            for outcome in OUTCOMES:
                self.requests.labels(v.name, v.version, outcome)
        self.ttft = Histogram(
            "jaxserve_time_to_first_token_seconds",
            "Arrival to first token (queue + prefill)",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "jaxserve_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            _LABELS,
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jaxserve_e2e_request_latency_seconds",
            "Arrival to the last output",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(models))

    def observe(self, outcome: str, output=None, served=None) -> None:
        """A request ended with `outcome` (one of OUTCOMES); `output` is its last RequestOutput, if any; `served`
        the version that answered (None: refused before one was chosen)."""
        labels = (served.name, served.version) if served is not None else ("", "")
        self.requests.labels(*labels, outcome).inc()
        if output is None:
            return
        m = output.metrics
        if m.ttft is not None:
            self.ttft.labels(*labels).observe(m.ttft)
        if m.tpot is not None:
            self.tpot.labels(*labels).observe(m.tpot)
        end = m.finished_time or m.last_token_time
        if end is not None:
            self.e2e.labels(*labels).observe(end - m.arrival_time)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    def __init__(self, models):
        self.models = models

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

        def add(kind, name, doc, labels, value, extra=()):
            fam = families.get(name)
            if fam is None:
                cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
                fam = families[name] = cls(name, doc, labels=[*_LABELS, *(k for k, _ in extra)])
            fam.add_metric([*labels, *(v for _, v in extra)], value)

        process = None
        for model in self.models.models.values():
            for version in model.versions.values():
                labels = (model.name, version.version)
                add(
                    "gauge",
                    "jaxserve_model_traffic_percent",
                    "Share of the model's traffic the split gives the version",
                    labels,
                    model.split.get(version.version, 0),
                )
                add(
                    "gauge",
                    "jaxserve_model_version_state",
                    "The version's state (value 1)",
                    labels,
                    1,
                    [("state", version.state)],
                )
                add(
                    "counter",
                    "jaxserve_rollbacks",
                    "Automatic rollbacks of the version (a canary set to 0%)",
                    labels,
                    self.models.rollbacks[(model.name, version.version)],
                )
                if version.engine is None:
                    continue
                card = version.card
                add(
                    "gauge",
                    "jaxserve_model_memory_bytes",
                    "Bytes the version holds",
                    labels,
                    card.weight_bytes,
                    [("kind", "weights")],
                )
                add(
                    "gauge",
                    "jaxserve_model_memory_bytes",
                    "Bytes the version holds",
                    labels,
                    card.kv_cache_bytes,
                    [("kind", "kv_cache")],
                )
                add("gauge", "jaxserve_model_info", "The served model (value 1)", labels, 1)
                st = version.engine.stats()  # data parallel: summed over the replicas
                process = st
                self._engine(add, labels, st)
        yield from families.values()
        if process is not None:
            yield from _process_families(process)

    @staticmethod
    def _engine(add, labels, st) -> None:
        def gauge(name, doc, value):
            add("gauge", name, doc, labels, value)

        def counter(name, doc, value):
            add("counter", name, doc, labels, value)

        gauge("jaxserve_num_requests_waiting", "Sequences in the waiting queue", st.num_waiting)
        gauge("jaxserve_num_requests_running", "Sequences holding KV pages", st.num_running)
        gauge("jaxserve_kv_pages_in_use", "KV cache pages referenced by a request", st.kv_pages_in_use)
        gauge("jaxserve_kv_pages_total", "Usable KV cache pages", st.kv_pages_total)
        queried, hits = st.prefix_cache_queries, st.prefix_cache_hits
        gauge(
            "jaxserve_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / looked up",
            hits / queried if queried else 0.0,
        )
        counter("jaxserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", queried)
        counter("jaxserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", hits)
        counter(
            "jaxserve_num_preemptions", "Sequences preempted (recomputed later) for lack of pages", st.num_preemptions
        )
        counter("jaxserve_prompt_tokens", "Prompt tokens admitted", st.prompt_tokens)
        counter("jaxserve_generation_tokens", "Tokens generated", st.generation_tokens)
        counter("jaxserve_engine_steps", "Engine steps run", st.steps)
        # Speculative decoding (vLLM's spec_decode counters); all 0 without a speculative_config.
        drafts, proposed, accepted = st.spec_num_drafts, st.spec_num_draft_tokens, st.spec_num_accepted_tokens
        counter("jaxserve_spec_decode_num_drafts", "Sequences that verified proposals, per step", drafts)
        counter("jaxserve_spec_decode_num_draft_tokens", "Proposed tokens verified", proposed)
        counter("jaxserve_spec_decode_num_accepted_tokens", "Proposed tokens accepted", accepted)
        gauge(
            "jaxserve_spec_decode_acceptance_rate",
            "Accepted / proposed tokens since start",
            accepted / proposed if proposed else 0.0,
        )
        gauge(
            "jaxserve_spec_decode_mean_accepted_length",
            "Tokens a verifying sequence emits per step, on average (1 + accepted / drafts)",
            1 + accepted / drafts if drafts else 0.0,
        )


def _process_families(st):
    """The compile counters: one process, whichever engine reads them."""
    c = CounterMetricFamily("jaxserve_compilations", "XLA compilations in this process (persistent-cache loads too)")
    c.add_metric([], st.compilations)
    yield c
    c = CounterMetricFamily("jaxserve_compilation_cache_hits", "Compilations served by the persistent cache")
    c.add_metric([], st.compilation_cache_hits)
    yield c
    g = GaugeMetricFamily("jaxserve_compilations_since_warmup", "Compilations after warm-up (0 in a healthy server)")
    g.add_metric([], st.compilations_since_warmup)
    yield g


def metric_value(exposition: str, spec: str) -> float:
    """The sum of the samples `spec` names in a Prometheus exposition: 'name' or 'name{k="v",...}' (every sample
    of that name whose labels include these; the servers label most series with model and version)."""
    from prometheus_client.parser import text_string_to_metric_families

    name, _, rest = spec.partition("{")
    want = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if kv) if rest else {}
    want = {k: v.strip('"') for k, v in want.items()}
    found, total = False, 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                found, total = True, total + sample.value
    if not found:
        raise KeyError(spec)
    return total
