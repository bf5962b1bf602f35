"""What every Prometheus exporter is expected to show, on the balancer's registry and the node's alike:
``process_*`` and ``python_*`` series, ``llmlb_build_info{version}``, and request latency under the
conventional ``*_request_duration_seconds`` name (the old ``*_request_seconds`` kept one release)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import BalancerMetrics, NodeMetrics

Metrics = BalancerMetrics | NodeMetrics


def balancer() -> BalancerMetrics:
    return BalancerMetrics(dict)


def node() -> NodeMetrics:
    return NodeMetrics(dict)


def families(metrics: Metrics) -> dict[str, str]:
    """Family name -> its HELP text, as a scraper reads the exposition."""
    body, _ = metrics.exposition()
    return {f.name: f.documentation for f in text_string_to_metric_families(body.decode())}


@pytest.mark.parametrize("make", [balancer, node], ids=["balancer", "node"])
def test_process_and_python_series_are_scraped_from_both_processes(make: Callable[[], Metrics]) -> None:
    names = families(make())
    for name in (
        "process_cpu_seconds",  # the parser drops a counter's _total
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_objects_collected",
    ):
        assert name in names, name


@pytest.mark.parametrize("make", [balancer, node], ids=["balancer", "node"])
def test_build_info_names_the_installed_version(make: Callable[[], Metrics]) -> None:
    metrics = make()
    version = metadata.version("llmlb")
    assert metrics.registry.get_sample_value("llmlb_build_info", {"version": version}) == 1.0


@pytest.mark.parametrize(("make", "prefix"), [(balancer, "llmlb"), (node, "xllm")], ids=["balancer", "node"])
def test_latency_is_under_the_conventional_name_and_the_old_one_for_one_release(
    make: Callable[[], Metrics], prefix: str
) -> None:
    metrics = make()
    metrics.observe("http", "chat", "m", "ok", 0.3)
    labels = {"door": "http", "route": "chat"}
    for name in (f"{prefix}_request_duration_seconds", f"{prefix}_request_seconds"):
        assert metrics.registry.get_sample_value(f"{name}_count", labels) == 1.0
        assert metrics.registry.get_sample_value(f"{name}_sum", labels) == pytest.approx(0.3)
    names = families(metrics)
    assert names[f"{prefix}_request_seconds"].startswith("Deprecated")
    assert f"{prefix}_request_duration_seconds" in names[f"{prefix}_request_seconds"]


def test_two_registries_in_one_process_each_get_their_own_standard_series() -> None:
    # Tests and `llmlb serve --workers` build several registries per process: no duplicate-name error.
    first, second = balancer(), node()
    assert "process_resident_memory_bytes" in families(first)
    assert "process_resident_memory_bytes" in families(second)
