"""TLS and mutual TLS on the balancer's gRPC door, with certificates made for each test."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from devkit.fake_hub import FakeHub
from tests.integration.conftest import BalancerProcess, ClientTls, NodeProcess, sync_channel, wait_online

pytestmark = pytest.mark.slow
NodeFactory = Callable[..., NodeProcess]
BalancerFactory = Callable[..., BalancerProcess]


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    path: Path,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A private CA, a certificate for 127.0.0.1 and a client certificate, all signed by that CA."""
    d = tmp_path / "pki"
    d.mkdir()
    ca_key = _write_key(d / "ca.key")
    ca = _issue(d / "ca.pem", "llmlb test CA", ca_key, None, ca_key)
    _issue(d / "server.pem", "127.0.0.1", _write_key(d / "server.key"), ca, ca_key, server=True)
    _issue(d / "client.pem", "a node", _write_key(d / "client.key"), ca, ca_key)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def list_models(channel: grpc.Channel) -> rpb.ListModelsResponse:
    return rgrpc.RegistryStub(channel).ListModels(rpb.ListModelsRequest(), timeout=5)


def failure(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return cast(grpc.Call, info.value).code()


def test_a_tls_balancer_accepts_channels_trusting_its_ca_and_refuses_plaintext(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, pki: Pki
) -> None:
    balancer = balancer_factory(
        hub,
        tls=ClientTls(pki.ca),
        LLMLB_TLS_CERT=str(pki.server_cert),
        LLMLB_TLS_KEY=str(pki.server_key),
    )
    assert any(m.id == "gemma-3-270m" for m in balancer.registry.ListModels(rpb.ListModelsRequest()).models)
    with sync_channel(balancer.address, balancer.admin_key) as plaintext:
        assert failure(lambda: list_models(plaintext)) == grpc.StatusCode.UNAVAILABLE

    node = node_factory(balancer, hub)  # XLLM_TLS_CA from the fixture
    wait_online(balancer, node, within=15)


def test_a_mutual_tls_balancer_needs_a_client_certificate(
    balancer_factory: BalancerFactory, hub: FakeHub, node_factory: NodeFactory, pki: Pki
) -> None:
    balancer = balancer_factory(
        hub,
        tls=ClientTls(pki.ca, pki.client_cert, pki.client_key),
        LLMLB_TLS_CERT=str(pki.server_cert),
        LLMLB_TLS_KEY=str(pki.server_key),
        LLMLB_TLS_CLIENT_CA=str(pki.ca),
    )
    balancer.registry.ListModels(rpb.ListModelsRequest())  # the fixture's channel has the certificate
    with sync_channel(balancer.address, balancer.admin_key, ClientTls(pki.ca)) as no_cert:
        assert failure(lambda: list_models(no_cert)) == grpc.StatusCode.UNAVAILABLE

    refused = node_factory(balancer, hub, XLLM_TLS_CERT="", XLLM_TLS_KEY="")
    node = node_factory(balancer, hub)  # XLLM_TLS_CA, XLLM_TLS_CERT and XLLM_TLS_KEY
    wait_online(balancer, node, within=15)
    assert [n.id for n in balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes] == [node.node_id]
    assert not (refused.home / "node-id").exists()
