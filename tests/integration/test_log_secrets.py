"""No log line carries a secret: a real balancer and node, driven down every error path we can reach.

Each run starts `llmlb serve` (on PostgreSQL) and `xllm serve` in one log format (console, then JSON)
at debug level, with every kind of secret the fleet knows: the admin key, a node key, an API key, a
key nobody issued, the fleet token and the stored secret it is derived from, the node's own token, an
HF token and the password in the store's URL. It then sends bad ranges, a 0-byte file and bad
credentials to both bulk servers, bad and wrong-scope keys to both doors, freezes the node, stops the
database, kills the balancer and starts one whose database nobody answers on, and finally reads every
log the processes wrote: no secret may appear in any of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest

from balancer.fleet.token import SECRET_NAME, derive
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import manifest_pb2_grpc as mgrpc
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import registry_pb2_grpc as rgrpc
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub, gguf_blob
from devkit.ports import free_port
from devkit.postgres import SUPERUSER, PostgresServer
from tests.fixtures.eventually import eventually
from tests.integration.conftest import (
    ROOT,
    BalancerProcess,
    NodeProcess,
    sync_channel,
    wait_online,
    xllm,
)

pytestmark = pytest.mark.slow

HF_SECRET = "hf_logsecret_7Qm2Zr9Kc4Vb8Nx1"
OWN_TOKEN = "xllm-own-token-logsecret-3Jd8Wq5Ty"
UNISSUED_KEY = "llmlb_sk_logsecret_never_issued_6Hp2Lx9Rv"
PG_PASSWORD = "pg-logsecret-Vz4Nc8Qw2Ks"
HUGE_RANGE = "bytes=0-" + "7" * 5000
DATA = gguf_blob(64 * 1024, seed=41)

DEFAULT_TTL_S = 3600  # LLMLB_FLEET_TOKEN_TTL, which these balancers leave at its default


def bulk_get(port: int, token: str | None, query: str, range_header: str | None = None) -> int:
    """One raw request to a bulk server; the HTTP status it answers (0: the connection was dropped)."""
    lines = [f"GET {query} HTTP/1.1", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if range_header is not None:
        lines.append(f"Range: {range_header}")
    lines.append("Connection: close")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 2 else 0


def drive_bulk_server(port: int, good: str, others: list[str], model_id: str) -> None:
    """Bad ranges and bad credentials against one bulk server (the balancer's or a node's)."""
    blob = f"/blob?model={model_id}&file=w.gguf"
    assert bulk_get(port, good, blob, HUGE_RANGE) == 400
    assert bulk_get(port, good, blob, f"bytes={len(DATA)}-") == 416
    assert bulk_get(port, good, blob, "bytes=9-2") == 400
    assert bulk_get(port, good, blob, "bytes=0-9") == 206
    assert bulk_get(port, good, "/blob?model=acme/none&file=w.gguf", "bytes=0-9") == 404
    for token in others:  # each presented with a bad range too: the refusal comes first
        assert bulk_get(port, token, blob, HUGE_RANGE) in (401, 403)
    assert bulk_get(port, None, blob) == 401
    assert bulk_get(port, good, "/nowhere") == 400


def secrets_of(
    balancer: BalancerProcess, api_key: str, store: PostgresServer, database: str
) -> dict[str, str]:
    fleet_secret = store.sql(f"SELECT secret FROM balancer_secrets WHERE name = '{SECRET_NAME}'", database)
    found = {
        "admin key": balancer.admin_key,
        "node key": balancer.node_key,
        "api key": api_key,
        "fleet secret": fleet_secret,
    }
    # The tokens of the windows around now (the default window is an hour): the one nodes hold, the
    # next they were sent, and the last, in case the window turned during the run.
    window = int(time.time() // DEFAULT_TTL_S)
    found["fleet token"] = derive(fleet_secret, window)
    found["last window's fleet token"] = derive(fleet_secret, window - 1)
    found["next window's fleet token"] = derive(fleet_secret, window + 1)
    assert all(len(value) >= 16 for value in found.values()), "each secret is real and long enough to find"
    return found | {
        "unissued key": UNISSUED_KEY,
        "node's own token": OWN_TOKEN,
        "HF token": HF_SECRET,
        "PostgreSQL password": PG_PASSWORD,
    }


def leaks(logs: dict[str, str], secrets: dict[str, str]) -> list[str]:
    """``log: secret name: the line`` for each line that carries a secret or a long piece of one."""
    found = []
    for where, text in logs.items():
        for line in text.splitlines():
            for name, value in secrets.items():
                # Most of a secret is as bad as all of it: a 16-character piece counts (a key's prefix,
                # shown in listings by design, is 12).
                if any(value[i : i + 16] in line for i in range(0, len(value) - 15, 4)):
                    found.append(f"{where}: {name}: {line[:300]}")
    return found


def database_down(tmp_path: Path, fmt: str) -> subprocess.Popen[str]:
    """A balancer told to use a PostgreSQL store nobody answers on, with a password: it stops at start."""
    url = f"postgresql+asyncpg://llmlb:{PG_PASSWORD}@127.0.0.1:{free_port()}/llmlb"
    env = {
        **os.environ,
        "LLMLB_HOME": str(tmp_path / "db-down"),
        "LLMLB_DATABASE_URL": url,
        "LLMLB_LOG_FORMAT": fmt,
        "LLMLB_LOG_LEVEL": "debug",
        "HF_TOKEN": HF_SECRET,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "balancer.cli", "serve", "--grpc-listen", f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_no_log_line_carries_a_secret_on_any_error_path(
    fmt: str,
    balancer_factory: Callable[..., BalancerProcess],
    node_factory: Callable[..., NodeProcess],
    hub: FakeHub,
    restartable_postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    stopped_at_start = database_down(tmp_path, fmt)  # meanwhile: it needs nothing below
    hub.add_token(HF_SECRET)
    hub.add_repo("acme/logged", {"w.gguf": DATA, "empty.json": b""}, private=True)
    store = restartable_postgres
    database = store.create_database()
    # Loopback connections are trusted, so the password is never checked, only carried everywhere.
    url = f"postgresql+asyncpg://{SUPERUSER}:{PG_PASSWORD}@{store.host}:{store.port}/{database}"
    balancer = balancer_factory(
        hub, LLMLB_LOG_FORMAT=fmt, LLMLB_LOG_LEVEL="debug", HF_TOKEN=HF_SECRET, LLMLB_DATABASE_URL=url
    )
    model_id = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/logged")).id
    api_key = balancer.registry.CreateKey(rpb.CreateKeyRequest(name="api", scopes=[pb.SCOPE_API])).secret
    secrets = secrets_of(balancer, api_key, store, database)
    env = {
        "XLLM_LOG_FORMAT": fmt,
        "XLLM_LOG_LEVEL": "debug",
        "HF_TOKEN": HF_SECRET,
        "XLLM_AUTH_TOKEN": OWN_TOKEN,
    }
    node = node_factory(balancer, hub, start=False, **env)
    pulled = xllm(
        node.home,
        "pull",
        "--balancer",
        balancer.address,
        "--models-dir",
        str(node.models_dir),
        model_id,
        env={"HF_ENDPOINT": hub.url, **env},
    )
    assert pulled.returncode == 0, pulled.stderr
    node.start()
    wait_online(balancer, node)

    # The balancer's bulk proxy: the fleet token reads; the API key lacks the node scope.
    proxy_port = balancer.manifest.GetBulkEndpoint(mpb.GetBulkEndpointRequest(), timeout=10).port
    drive_bulk_server(proxy_port, secrets["fleet token"], [api_key, UNISSUED_KEY, OWN_TOKEN], model_id)
    assert bulk_get(proxy_port, balancer.node_key, f"/blob?model={model_id}&file=w.gguf", "bytes=0-") == 206
    # A 0-byte file (a node never counts one as held: its own server's answer is a unit test's).
    assert bulk_get(proxy_port, balancer.node_key, f"/blob?model={model_id}&file=empty.json") == 200
    assert (
        bulk_get(proxy_port, balancer.node_key, f"/blob?model={model_id}&file=empty.json", "bytes=0-") == 200
    )
    # The node's bulk server: its own token and the fleet token read; keys do not.
    with sync_channel(node.address, OWN_TOKEN) as channel:
        node_port = mgrpc.ManifestStub(channel).GetBulkEndpoint(mpb.GetBulkEndpointRequest(), timeout=10).port
    drive_bulk_server(node_port, OWN_TOKEN, [balancer.node_key, api_key, UNISSUED_KEY], model_id)

    # Bad and wrong-scope keys at both of the balancer's doors, and at the node's gRPC door.
    for key in (UNISSUED_KEY, api_key, balancer.node_key):
        with sync_channel(balancer.address, key) as channel, pytest.raises(grpc.RpcError):
            rgrpc.RegistryStub(channel).CreateKey(rpb.CreateKeyRequest(name="x", scopes=[pb.SCOPE_ADMIN]))
        with sync_channel(node.address, key) as channel, pytest.raises(grpc.RpcError):
            mgrpc.ManifestStub(channel).GetBulkEndpoint(mpb.GetBulkEndpointRequest(), timeout=10)
    with httpx.Client(base_url=balancer.http_url, timeout=30) as http:
        for key in (UNISSUED_KEY, balancer.node_key):
            assert http.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code in (
                401,
                403,
            )
        assert http.get("/v0/keys", headers={"authorization": f"Bearer {api_key}"}).status_code == 403
        chat = {"model": model_id, "messages": [{"role": "user", "content": "hi"}]}
        refused = http.post("/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {api_key}"})
        assert refused.status_code >= 400  # weights no runtime loads: refused, and logged

    # An unreachable node (frozen, so it needs no restart), the database down, an unreachable balancer.
    assert node.proc is not None
    node_id = node.node_id
    node.proc.send_signal(signal.SIGSTOP)
    try:
        eventually(
            lambda: all(
                n.id != node_id or n.state != pb.NODE_STATE_ONLINE
                for n in balancer.registry.ListNodes(rpb.ListNodesRequest()).nodes
            ),
            15,
            "the frozen node seen offline",
        )
    finally:
        node.proc.send_signal(signal.SIGCONT)
    store.halt()
    eventually(lambda: "store.unavailable" in balancer.log(), 15, "the balancer finding its store down")
    balancer.stop(signal.SIGKILL)
    eventually(lambda: "balancer.unreachable" in node.log(), 15, "the node noticing its balancer gone")
    node.stop()

    logs = {"balancer": balancer.log(), "node": node.log(), "xllm pull": pulled.stdout + pulled.stderr}
    out, err = stopped_at_start.communicate(timeout=30)
    assert stopped_at_start.returncode != 0 and "llmlb:" in err  # it says why it stops
    logs["database down"] = out + err
    logs |= {str(p.relative_to(tmp_path)): p.read_text(errors="replace") for p in tmp_path.rglob("*.log")}
    assert "bulk_auth_refused" in logs["balancer"] and "bulk_auth_refused" in logs["node"]  # the paths ran
    found = leaks(logs, secrets)
    assert found == [], "\n".join(found)
