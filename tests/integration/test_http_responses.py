"""``POST /v1/responses`` with the official ``openai`` client against one real gemma-3-270m node.

One balancer and one node serve the whole module (started once): answers are short and greedy so the
file stays quick. The mapping itself (every input item, format and tool shape) is unit-tested in
``tests/unit/test_http_responses.py``; here the client must parse what a real answer looks like. The
Grafana dashboard's queries are checked against this fleet's live ``/metrics`` too, so no second
fleet starts for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devkit.model_files import ModelFiles
from tests.fixtures.eventually import eventually
from tests.fixtures.promql import metric_names
from tests.integration.conftest import ROOT, BalancerProcess, packaged_models_fleet

pytestmark = pytest.mark.slow
GEMMA = "gemma-3-270m"
SHORT: dict[str, Any] = {"max_output_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, gemma: ModelFiles) -> Iterator[BalancerProcess]:
    """A balancer with one gemma node answering from the packaged models' dir."""
    with packaged_models_fleet(tmp_path_factory.mktemp("responses")) as balancer:
        yield balancer


def client(door: BalancerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{door.http_url}/v1", api_key=door.admin_key, max_retries=0, timeout=120)


def test_a_plain_create_returns_text_usage_and_a_stateless_response(door: BalancerProcess) -> None:
    response = client(door).responses.create(
        model=GEMMA, instructions="Answer briefly.", input="Name a colour.", **SHORT
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.output[0].type == "message"
    assert response.usage is not None and 0 < response.usage.output_tokens <= 8
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.store is False
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"


# Plain dicts, as a user writes them (the client's TypedDicts cannot tell these items apart).
HISTORY: Any = [
    {"role": "developer", "content": "You count."},
    {"role": "user", "content": [{"type": "input_text", "text": "One, two,"}]},
    {"role": "assistant", "content": [{"type": "output_text", "text": "three,"}]},
    {"role": "user", "content": "go on"},
]


def test_message_items_with_text_parts_continue_a_conversation(door: BalancerProcess) -> None:
    response = client(door).responses.create(
        model=GEMMA,
        input=HISTORY,
        **SHORT,
    )
    assert response.output_text.strip()


def test_a_stream_sends_typed_events_in_order_and_its_text_equals_the_final_response(
    door: BalancerProcess,
) -> None:
    with client(door).responses.stream(model=GEMMA, input="Say hello.", **SHORT) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert text and last.response.output_text == text
    assert last.response.usage is not None and last.response.usage.output_tokens > 0


def test_stream_true_on_create_yields_the_same_events(door: BalancerProcess) -> None:
    events = list(client(door).responses.create(model=GEMMA, input="Say hi.", stream=True, **SHORT))
    assert events[0].type == "response.created"
    done = events[-1]
    assert done.type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and done.response.output_text == text


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"previous_response_id": "resp_abc"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "reasoning"),
        ({"store": True}, "store"),
    ],
)
def test_what_is_not_offered_is_a_400_naming_it(
    door: BalancerProcess, extra: dict[str, object], names: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(door).responses.create(**{"model": GEMMA, "input": "hi", **SHORT, **extra})
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "invalid_request" and names in body["message"]


def test_responses_are_counted_under_their_own_route(door: BalancerProcess) -> None:
    client(door).responses.create(model=GEMMA, input="Hi.", **SHORT)
    line = f'llmlb_requests_total{{code="ok",door="http",model="{GEMMA}",route="responses"}}'

    def counted() -> bool:
        return any(row.startswith(line) for row in httpx.get(f"{door.http_url}/metrics").text.splitlines())

    eventually(counted, 5, "an ok responses request in the metrics")


def live_sample_names(url: str) -> set[str]:
    """Every sample name a scrape of ``url`` shows (``_bucket``, ``_total`` and the like included)."""
    families = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    return {sample.name for family in families for sample in family.samples}


def test_every_query_of_the_grafana_dashboard_names_a_metric_the_fleet_serves(door: BalancerProcess) -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana" / "llmlb.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs and all(panel["targets"] for panel in dashboard["panels"])
    wanted = {name for expr in exprs for name in metric_names(expr)}
    # The panels the dashboard promises: traffic, latency, first token, tokens, queues, node, processes.
    for name in (
        "llmlb_requests_total",
        "llmlb_request_duration_seconds_bucket",
        "llmlb_time_to_first_token_seconds_bucket",
        "llmlb_tokens_total",
        "llmlb_queue_depth",
        "xllm_models",
        "xllm_model_memory_bytes",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in wanted, name

    # One streamed chat: the first-token and token series exist from then on.
    stream = client(door).chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "Hi."}], max_tokens=4, temperature=0.0, stream=True
    )
    assert list(stream)
    served = live_sample_names(f"{door.http_url}/metrics") | live_sample_names(
        f"http://{door.node_metrics}/metrics"
    )
    assert sorted(wanted - served) == []
