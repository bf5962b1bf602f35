"""The console's short history: 10-second buckets per series, percentiles from a bounded sample."""

from __future__ import annotations

from dataclasses import dataclass

from balancer.history import History, percentile


@dataclass
class Finished:
    model: str = "m"
    node_id: str = "n1"
    first_token_s: float | None = None
    completion_tokens: int = 0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_requests_in_one_bucket_are_counted_per_fleet_model_and_node() -> None:
    clock = Clock()
    history = History(clock=clock, queue_depth=lambda: 3)
    history.finished(Finished(first_token_s=0.05, completion_tokens=20), "ok", 0.1)
    history.finished(Finished(node_id="n2", completion_tokens=10), "timeout", 0.3)

    [fleet] = history.points()
    assert fleet["t"] == 1_000_000
    assert (fleet["requests"], fleet["errors"], fleet["queue_depth"]) == (2, 1, 3)
    assert fleet["requests_per_s"] == 0.2 and fleet["tokens_per_s"] == 3.0
    assert (fleet["latency_p50_ms"], fleet["latency_p99_ms"], fleet["ttft_p50_ms"]) == (100.0, 300.0, 50.0)
    assert [p["requests"] for p in history.points("model", "m")] == [2]
    assert [p["requests"] for p in history.points("node", "n2")] == [1]
    assert history.names("node") == ["n1", "n2"] and history.names("model") == ["m"]


def test_buckets_older_than_the_span_fall_away_and_since_filters() -> None:
    clock = Clock()
    history = History(clock=clock, bucket_s=10, span_s=60)
    for _ in range(8):  # eight buckets, one request each; the span keeps six
        history.finished(Finished(), "ok", 0.01)
        clock.now += 10
    starts = [p["t"] for p in history.points()]
    assert len(starts) <= 6 and starts == sorted(starts)
    assert starts[-1] == 1_000_070
    assert [p["t"] for p in history.points(since=1_000_060)] == [1_000_060, 1_000_070]


def test_a_busy_bucket_keeps_a_bounded_sample_of_the_latest_latencies() -> None:
    history = History(clock=Clock(), samples=4)
    for ms in (1, 2, 3, 4, 100, 100, 100, 100):
        history.finished(Finished(model="", node_id=""), "ok", ms / 1000)
    [point] = history.points()
    assert point["requests"] == 8
    assert point["latency_p50_ms"] == 100.0  # the early, fast calls were overwritten


def test_a_request_with_an_unknown_model_counts_only_for_the_fleet() -> None:
    history = History(clock=Clock())
    history.finished(Finished(model="", node_id=""), "model_not_found", 0.001)
    assert history.points()[0]["errors"] == 1
    assert history.names("model") == [] and history.names("node") == []


def test_only_known_models_and_nodes_get_a_series_and_removed_ones_lose_theirs() -> None:
    live = {("model", "m"), ("node", "n1"), ("node", "n2")}
    history = History(clock=Clock(), known=lambda kind, name: (kind, name) in live)
    for i in range(200):  # names no catalogue or registration vouches for
        history.finished(Finished(model=f"made-up-{i}", node_id=f"impostor-{i}"), "ok", 0.01)
    history.finished(Finished(model="m", node_id="n1"), "ok", 0.01)
    history.finished(Finished(model="m", node_id="n2"), "ok", 0.01)
    assert history.points()[0]["requests"] == 202  # every request still counts for the fleet
    assert history.names("model") == ["m"] and history.names("node") == ["n1", "n2"]

    live -= {("model", "m"), ("node", "n2")}  # the model deleted, the node removed
    assert history.names("model") == [] and history.names("node") == ["n1"]
    assert history.points("node", "n2") == [] and history.points("model", "m") == []
    live.add(("node", "n2"))  # registered again: it starts a new series, not the old one
    assert history.points("node", "n2") == []


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
