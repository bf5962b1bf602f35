"""Property-based fuzzing of the HTTP door against its own ``/openapi.json`` (schemathesis).

A real balancer process with an echo node serving the packaged text model: every operation the
document describes is called with generated requests (valid and not), with an admin key. No answer
may be a 5xx, and every answer's status, content type and body must be what the document says.
Bounded: a few examples per operation, so the whole run takes well under a minute.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devkit.echo_node import EchoNode
from devkit.fake_hub import FakeHub
from tests.integration.conftest import BalancerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
EXAMPLES_PER_OPERATION = 10
Operation = APIOperation[Any, Any, Any, Any]


@pytest.fixture
def served(balancer_factory: Any, hub: FakeHub) -> Iterator[BalancerProcess]:
    """A balancer with an echo node (on its own event loop thread) serving the packaged text model."""
    balancer: BalancerProcess = balancer_factory(hub)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="echo-node", daemon=True)
    thread.start()
    node = EchoNode(balancer.address, api_key=balancer.admin_key, models=("gemma-3-270m",))
    asyncio.run_coroutine_threadsafe(node.start(), loop).result(30)
    try:
        yield balancer
    finally:
        asyncio.run_coroutine_threadsafe(node.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz(operation: Operation, strategy: st.SearchStrategy[Case[Any]], examples: int) -> str | None:
    """The first failure ``examples`` requests drawn from ``strategy`` find, shrunk; None when all pass."""

    @given(case=strategy)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,  # every run starts fresh: a failure must come from the code under test
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case[Any]) -> None:
        case.call_and_validate(checks=CHECKS, timeout=30)

    try:
        run()
    except Unsatisfiable:  # nothing of this kind to draw (no invalid form of a route without inputs)
        return None
    except (FailureGroup, Exception) as failure:  # failed checks (a group), or the call itself failing
        return f"{operation.method.upper()} {operation.path}: {failure}"
    return None


def test_every_operation_answers_as_documented_and_never_with_a_server_error(served: BalancerProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{served.http_url}/openapi.json")
    schema.config.update(base_url=served.http_url, headers={"authorization": f"Bearer {served.admin_key}"})
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 20
    for operation in operations:
        examples = operation.get_strategies_from_examples()
        attempts = [
            (st.one_of(*examples), 2 * len(examples)) if examples else None,
            (operation.as_strategy(GenerationMode.POSITIVE), EXAMPLES_PER_OPERATION),
            (operation.as_strategy(GenerationMode.NEGATIVE), EXAMPLES_PER_OPERATION),
        ]
        for attempt in attempts:
            if attempt is not None and (failure := fuzz(operation, *attempt)) is not None:
                failures.append(failure)
    assert not failures, "\n\n".join(failures)
