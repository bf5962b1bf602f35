"""A real balancer and node listen for bulk transfers on the ports their settings name.

An operator opens fixed ports between hosts: ``LLMLB_BULK_PORT`` and ``XLLM_BULK_PORT`` set them (the
defaults, 50052 and 50062, are the unit tests'; here free ports stand for them so tests can run side
by side), each process serves there, and ``Manifest.GetBulkEndpoint`` tells nodes and peers that port.
A port someone else holds stops the process at start, naming the setting that moves it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from devkit.fake_hub import FakeHub
from devkit.ports import free_port
from tests.integration.conftest import (
    ROOT,
    BalancerProcess,
    NodeProcess,
    sync_channel,
    wait_online,
)
from tests.integration.test_node_identity import bulk_opens

pytestmark = pytest.mark.timeout(90)


def test_the_bulk_proxy_and_a_nodes_bulk_server_listen_on_the_ports_set(
    balancer_factory: Callable[..., BalancerProcess], hub: FakeHub, node_factory: Callable[..., NodeProcess]
) -> None:
    proxy_port, node_port = free_port(), free_port()
    balancer = balancer_factory(hub, LLMLB_BULK_PORT=str(proxy_port))
    node = node_factory(balancer, hub, XLLM_BULK_PORT=str(node_port))
    wait_online(balancer, node, within=15)

    assert balancer.manifest.GetBulkEndpoint(mpb.GetBulkEndpointRequest(), timeout=10).port == proxy_port
    with sync_channel(balancer.address, balancer.node_key) as channel:
        token = rgrpc.RegistryStub(channel).GetFleetToken(rpb.GetFleetTokenRequest(), timeout=10).token
    with sync_channel(node.address, token) as channel:
        advertised = mgrpc.ManifestStub(channel).GetBulkEndpoint(mpb.GetBulkEndpointRequest(), timeout=5).port
    assert advertised == node_port
    # Each port answers as a bulk server: the fleet token is let in (then told the model is unknown).
    assert bulk_opens(proxy_port, token) and bulk_opens(node_port, token)


@pytest.mark.parametrize(
    ("command", "setting"),
    [
        (["node.cli", "serve", "--balancer", "127.0.0.1:9", "--models-dir", "models"], "XLLM_BULK_PORT"),
        (["balancer.cli", "serve", "--http-listen", "off"], "LLMLB_BULK_PORT"),
    ],
)
def test_a_taken_bulk_port_stops_the_process_at_start_naming_the_setting(
    tmp_path: Path, command: list[str], setting: str
) -> None:
    # What a second node on one host meets with the fixed default: the port is already someone's.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "LLMLB_HOME": str(tmp_path), setting: str(port)}
        done = subprocess.run(
            [sys.executable, "-m", *command, "--grpc-listen", f"127.0.0.1:{free_port()}"],
            cwd=tmp_path,
            env=env | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} for bulk transfers" in done.stderr
    assert f"{setting} (0: any free port)" in done.stderr


@pytest.mark.parametrize("door", ["http", "grpc"])
def test_a_taken_balancer_port_is_one_line_naming_the_setting_and_no_traceback(
    tmp_path: Path, door: str
) -> None:
    # `llmlb serve` started twice, or beside another server on 8080: the second must say so plainly
    # (the HTTP door's bind failure used to escape the event loop as uvicorn's SystemExit, with pages
    # of tracebacks and a misleading exit status 3).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_port = port if door == "grpc" else free_port()
        http_port = port if door == "http" else free_port()
        env = {**os.environ, "LLMLB_HOME": str(tmp_path), "LLMLB_BULK_PORT": "0"}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "balancer.cli",
                "serve",
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
                "--http-listen",
                f"127.0.0.1:{http_port}",
            ],
            cwd=tmp_path,
            env=env | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    setting = "LLMLB_HTTP_LISTEN" if door == "http" else "LLMLB_GRPC_LISTEN"
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"llmlb: cannot listen on 127.0.0.1:{port} ({setting}"), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
