"""A real balancer and node listen for bulk transfers on the ports their settings name.

An operator opens fixed ports between hosts: ``LLMLB_BULK_PORT`` and ``XLLM_BULK_PORT`` set them (the
defaults, 50052 and 50062, are the unit tests'; here free ports stand for them so tests can run side
by side), each process serves there, and ``Manifest.GetBulkEndpoint`` tells nodes and peers that port.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from devkit.fake_hub import FakeHub
from tests.integration.conftest import BalancerProcess, NodeProcess, free_port, sync_channel, wait_online
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
