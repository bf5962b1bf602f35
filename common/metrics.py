"""Prometheus metrics of both processes: one registry per process, names under ``llmlb_`` and ``xllm_``.

Each side gets a small object with the calls its code makes (``observe``, ``first_token``, ``tokens``);
gauges that describe current state (queue depth, nodes, downloads) are read at scrape time. Both
registries also carry what every Prometheus exporter is expected to: ``process_*`` (CPU, memory, open
files), ``python_*`` (interpreter, garbage collector) and ``llmlb_build_info{version}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib import metadata

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds: routing overhead is sub-millisecond, a long generation minutes.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


class _Gauges(Collector):
    """Gauges computed when scraped, from a function returning ``{name: (help, {labels: value})}``."""

    def __init__(
        self,
        read: Callable[[], Mapping[str, tuple[str, Mapping[tuple[str, ...], float]]]],
        labels: Mapping[str, tuple[str, ...]],
    ) -> None:
        self._read = read
        self._labels = labels

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, (help_text, values) in self._read().items():
            family = GaugeMetricFamily(name, help_text, labels=list(self._labels.get(name, ())))
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
            yield family


def package_version() -> str:
    """The installed llmlb's version (its package metadata); ``0+unknown`` when run from a bare tree."""
    try:
        return metadata.version("llmlb")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _standard_collectors(registry: CollectorRegistry) -> None:
    """``process_*``, ``python_*`` and ``llmlb_build_info`` on ``registry``: the conventional series
    dashboards and alerts expect of any exporter. Fresh collectors: the library's own are bound to its
    global registry, which neither process serves."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    build = Info(
        "llmlb_build", "The running llmlb's version (the series' value is always 1).", registry=registry
    )
    build.info({"version": package_version()})


class _Metrics:
    def __init__(self, prefix: str) -> None:
        self.registry = CollectorRegistry()
        _standard_collectors(self.registry)
        self.requests = Counter(
            f"{prefix}_requests_total",
            "Requests answered, by door, route, model and outcome code ('ok' or an error code).",
            ["door", "route", "model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{prefix}_request_duration_seconds",
            "Time from receiving a request to its last byte, by door and route.",
            ["door", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # The name before the Prometheus convention (``*_duration_seconds``): kept for one release.
        self.latency_old = Histogram(
            f"{prefix}_request_seconds",
            f"Deprecated, removed in the next release: the same as {prefix}_request_duration_seconds.",
            ["door", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "Time from receiving a streamed request to its first token or audio chunk.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.token_count = Counter(
            f"{prefix}_tokens_total",
            "Tokens processed, by model and kind (prompt or completion).",
            ["model", "kind"],
            registry=self.registry,
        )

    def observe(self, door: str, route: str, model: str, code: str, seconds: float) -> None:
        """Counts one finished request and its latency; ``code`` is ``ok`` or an ``ErrorCode`` value."""
        self.requests.labels(door, route, model, code).inc()
        self.latency.labels(door, route).observe(seconds)
        self.latency_old.labels(door, route).observe(seconds)

    def first_token(self, route: str, seconds: float) -> None:
        self.ttft.labels(route).observe(seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self.token_count.labels(model, "prompt").inc(prompt)
        if completion:
            self.token_count.labels(model, "completion").inc(completion)

    def exposition(self) -> tuple[bytes, str]:
        """The text format Prometheus scrapes, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class BalancerMetrics(_Metrics):
    """``llmlb_*``: requests, latency, time to first token, tokens, prompt tokens cached per node,
    routing outcomes, retries, queue, nodes, downloads."""

    def __init__(
        self, state: Callable[[], Mapping[str, tuple[str, Mapping[tuple[str, ...], float]]]]
    ) -> None:
        super().__init__("llmlb")
        self.retries = Counter(
            "llmlb_retries_total",
            "Requests tried again on another node after a node failed, by route.",
            ["route"],
            registry=self.registry,
        )
        # Node ids are labels: they are bounded by registration (a node id is only routed to, and so
        # only counted, once an operator's fleet token registered it), like models by the catalogue.
        self.prompt_token_count = Counter(
            "llmlb_prompt_tokens_total",
            "Prompt tokens of chat and completion answers, by model, node and source: 'cached' (reused"
            " from the node's prompt cache) or 'computed'.",
            ["model", "node", "source"],
            registry=self.registry,
        )
        self.route_outcomes = Counter(
            "llmlb_route_outcomes_total",
            "Chat and completion requests routed, by policy and outcome: 'hit' (to a node holding part of"
            " the prompt), 'miss', 'yielded' (the holder was too busy) or 'affinity' (by prompt_cache_key"
            " or user).",
            ["policy", "outcome"],
            registry=self.registry,
        )
        self.registry.register(
            _Gauges(
                state,
                {
                    "llmlb_nodes": ("state",),
                    "llmlb_model_downloads": ("model",),
                    "llmlb_queue_depth": (),
                    "llmlb_node_model_slots": ("node", "model"),
                },
            )
        )

    def watch_deployments(self, read: Callable[[], Mapping[tuple[str, ...], float]]) -> None:
        """Registers the scheduler's metrics: ``read`` gives the deployments' copies at scrape time.
        Called again (a new scheduler on the same registry), it only changes what ``read`` is."""
        self._read_deployments = read
        if hasattr(self, "schedule_decisions"):
            return
        self.schedule_decisions = Counter(
            "llmlb_schedule_decisions_total",
            "The scheduler's decisions, by action ('place', 'remove', 'shortfall') and reason.",
            ["action", "reason"],
            registry=self.registry,
        )
        self.placement = Histogram(
            "llmlb_placement_seconds",
            "Seconds from placing a copy to its being ready: 'estimate' (the scheduler's) and 'actual'.",
            ["kind"],
            buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        help_text = "Copies of each deployed model: 'desired' (the scheduler's target) and 'ready'."
        self.registry.register(
            _Gauges(
                lambda: {"llmlb_deployment_copies": (help_text, self._read_deployments())},
                {"llmlb_deployment_copies": ("model", "state")},
            )
        )

    def schedule_decision(self, action: str, reason: str) -> None:
        self.schedule_decisions.labels(action, reason).inc()

    def placement_seconds(self, kind: str, seconds: float) -> None:
        self.placement.labels(kind).observe(seconds)

    def prompt_tokens(self, model: str, node: str, prompt: int, cached: int) -> None:
        """Counts an answer's prompt tokens on ``node``: ``cached`` of them reused, the rest computed."""
        cached = min(max(cached, 0), prompt)
        if cached:
            self.prompt_token_count.labels(model, node, "cached").inc(cached)
        if prompt - cached:
            self.prompt_token_count.labels(model, node, "computed").inc(prompt - cached)


class NodeMetrics(_Metrics):
    """``xllm_*``: requests, latency, time to first token, tokens (prompt ones cached or computed), queue,
    loaded models, prefix cache bytes, memory (the budget and each model's share), downloads."""

    def __init__(
        self, state: Callable[[], Mapping[str, tuple[str, Mapping[tuple[str, ...], float]]]]
    ) -> None:
        super().__init__("xllm")
        self.download_bytes = Counter(
            "xllm_download_bytes_total",
            "Model bytes written by downloads, by source kind (origin, balancer, peer).",
            ["source"],
            registry=self.registry,
        )
        self.downloads = Counter(
            "xllm_downloads_total",
            "Finished file downloads, by outcome (ok or an error code).",
            ["outcome"],
            registry=self.registry,
        )
        self.prompt_token_count = Counter(
            "xllm_prompt_tokens_total",
            "Prompt tokens, by model and source: cached (a kept prefix reused) or computed.",
            ["model", "source"],
            registry=self.registry,
        )
        self.registry.register(
            _Gauges(
                state,
                {
                    "xllm_models": ("state",),
                    "xllm_queue_depth": (),
                    "xllm_active_requests": (),
                    "xllm_prefix_cache_bytes": ("model",),
                    "xllm_memory_budget_bytes": (),
                    "xllm_model_memory_bytes": ("model",),
                },
            )
        )

    def prompt_tokens(self, model: str, cached: int, computed: int) -> None:
        """Counts a request's prompt tokens by whether a kept prefix supplied them."""
        if cached:
            self.prompt_token_count.labels(model, "cached").inc(cached)
        if computed:
            self.prompt_token_count.labels(model, "computed").inc(computed)
