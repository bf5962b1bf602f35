"""The PromQL reading the dashboard test relies on: it finds each metric an expression selects, and
nothing else (functions, label names, durations, numbers, keywords)."""

from __future__ import annotations

import pytest

from tests.fixtures.promql import metric_names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        (
            'sum by (route) (rate(llmlb_requests_total{job=~"$j",code!="ok"}[$__rate_interval]))',
            {"llmlb_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(llmlb_request_duration_seconds_bucket[5m])))",
            {"llmlb_request_duration_seconds_bucket"},
        ),
        (
            "xllm_model_memory_bytes / on (instance) group_left xllm_memory_budget_bytes",
            {"xllm_model_memory_bytes", "xllm_memory_budget_bytes"},
        ),
        (
            'count without (pid) (process_cpu_seconds_total{a="b}c"} offset 1h) > 1e3 and bool 2',
            {"process_cpu_seconds_total"},
        ),
        ('label_replace(x_total, "dst", "$1", "src", "(.*)")', {"x_total"}),
    ],
)
def test_each_selected_metric_is_found_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
