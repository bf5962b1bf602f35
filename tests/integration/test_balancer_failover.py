"""Nodes and clients that know several balancer addresses, with real processes on 127.0.0.1.

A dead address is a free port nobody listens on. The node-side drill starts two balancers, each on its
own SQLite store with keys off (two processes sharing one SQLite file are not a supported deployment;
replicas share PostgreSQL), attaches a node to the first, kills it and times the node's arrival on the
second.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.pb.llmlb.v1 import registry_pb2 as rpb
from devkit.fake_hub import FakeHub, gguf_blob
from tests.fixtures.eventually import eventually
from tests.fixtures.keyless import dead_address
from tests.integration.conftest import (
    BalancerProcess,
    NodeProcess,
    llmlb,
    online,
    wait_online,
    xllm,
)

MiB = 1024 * 1024
# The promise is "back in a live replica's rotation within about 1-2 s"; the bound leaves room for a
# busy two-core test machine.
FAILOVER_WITHIN_S = 5.0


def log_events(node: NodeProcess, event: str) -> list[dict[str, Any]]:
    """The node's JSON log lines for ``event``."""
    found = []
    for line in node.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            found.append(entry)
    return found


def attached_to(node: NodeProcess) -> list[str]:
    """The balancers the node logged attaching to (``balancer.connected``), in order."""
    return [str(e["balancer"]) for e in log_events(node, "balancer.connected")]


def test_a_node_whose_first_balancer_is_down_registers_with_the_next(
    balancer: BalancerProcess, hub: FakeHub, node_factory: Callable[..., NodeProcess]
) -> None:
    node = node_factory(balancer, hub, start=False)
    node.balancer = f"{dead_address()},{balancer.address}"
    node.start()
    wait_online(balancer, node)
    eventually(
        lambda: attached_to(node) == [balancer.address], 10, "attached to the live one", describe=node.log
    )


def test_a_node_moves_to_the_other_balancer_within_seconds_when_its_balancer_dies(
    balancer_factory: Callable[..., BalancerProcess],
    hub: FakeHub,
    node_factory: Callable[..., NodeProcess],
) -> None:
    first = balancer_factory(hub, LLMLB_AUTH="off")
    second = balancer_factory(hub, LLMLB_AUTH="off")
    node = node_factory(first, hub, start=False)
    node.balancer = f"{first.address},{second.address}"
    node.start()
    wait_online(first, node)
    assert node.node_id not in online(second)

    first.stop(signal.SIGKILL)  # no goodbye: the session stream just breaks
    killed = time.monotonic()
    eventually(
        lambda: node.node_id in online(second),
        FAILOVER_WITHIN_S,
        "the node online on the second balancer",
        every=0.05,
        describe=node.log,
    )
    assert time.monotonic() - killed < FAILOVER_WITHIN_S
    # The balancer lists the node online as it accepts the session, a moment before the node logs it.
    eventually(
        lambda: attached_to(node) == [first.address, second.address],
        10,
        "the node's log naming both balancers in turn",
        describe=node.log,
    )


def test_xllm_pull_asks_the_next_balancer_when_the_first_is_down(
    balancer: BalancerProcess, hub: FakeHub, tmp_path: Path
) -> None:
    data = gguf_blob(2 * MiB, seed=7)
    hub.add_repo("acme/failover", {"f.gguf": data})
    model_id = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/failover")).id
    home = tmp_path / "n"
    at = f"{dead_address()},{balancer.address}"
    # The node's own route to the origin is a closed port: the bytes can come only through the proxy
    # of the balancer that answered, never the dead one.
    done = xllm(
        home,
        *("pull", "--balancer", at, "--models-dir", str(home / "models"), "--download-via", "balancer"),
        *("--json", model_id),
        env={"HF_ENDPOINT": "http://127.0.0.1:9", **balancer.node_env()},
    )
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert result["files"]["f.gguf"]["from"] == "download", result
    assert (home / "models" / model_id / "f.gguf").read_bytes() == data


def test_the_cli_uses_the_first_balancer_that_answers(balancer: BalancerProcess) -> None:
    listed = llmlb(
        "models",
        "list",
        "--json",
        "--balancer",
        f"{dead_address()},{balancer.address}",
        home=balancer.home,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "gemma-3-270m" in {m["id"] for m in json.loads(listed.stdout)["models"]}

    by_env = llmlb(
        "models",
        "list",
        "--json",
        home=balancer.home,
        env={"LLMLB_ADDR": f"{dead_address()},{balancer.address}"},
        timeout=60,
    )
    assert by_env.returncode == 0, by_env.stderr


def test_the_cli_names_every_balancer_it_tried_when_none_answers(tmp_path: Path) -> None:
    one, two = dead_address(), dead_address()
    failed = llmlb("models", "list", "--balancer", f"{one},{two}", home=tmp_path, timeout=60)
    assert failed.returncode == 1, failed.stderr
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach any balancer")
    assert one in line and two in line

    malformed = llmlb("models", "list", "--balancer", f"{one},,{two}", home=tmp_path, timeout=60)
    assert malformed.returncode == 2
    assert (
        malformed.stderr.strip()
        == f"error: --balancer='{one},,{two}': an empty entry in the list; expected host:port[,host:port...]"
    )
