"""The balancer as the fleet's source of truth for which models exist and what their files are.

A real `llmlb serve` process, its real gRPC server, generated stubs, and the fake hub on 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import cast

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import GRPC_CODE_KEY
from common.pb.llmlb.v1 import manifest_pb2 as mpb
from common.pb.llmlb.v1 import registry_pb2 as rpb
from common.pb.llmlb.v1 import types_pb2 as pb
from devkit.fake_hub import FakeHub
from tests.integration.conftest import ROOT, BalancerProcess

GGUF = b"GGUF" + bytes(range(256)) * 64
CONFIG = b'{"architectures": ["Tiny"]}'


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expect_error(call: Callable[[], object], status: grpc.StatusCode, code: str) -> str:
    """Runs ``call``, asserts it failed with ``status`` and llmlb ``code``; returns the message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = cast(grpc.Call, info.value)
    assert err.code() == status, err.details()
    assert dict(cast(Sequence[tuple[str, str]], err.trailing_metadata() or ())).get(GRPC_CODE_KEY) == code
    return err.details() or ""


def files_of(model: pb.Model) -> dict[str, pb.ManifestFile]:
    return {f.filename: f for f in model.manifest.files}


def test_register_refuses_capabilities_it_does_not_know_at_both_doors(balancer: BalancerProcess) -> None:
    """gRPC refuses UNSPECIFIED or an unnamed number as HTTP refuses an unknown name, in the same words."""
    before = balancer.registry.ListModels(rpb.ListModelsRequest())
    unnamed = pb.Capability.ValueType(99)
    for value, name in ((pb.CAPABILITY_UNSPECIFIED, "CAPABILITY_UNSPECIFIED"), (unnamed, "99")):
        request = rpb.RegisterModelRequest(repo_id="acme/any", capabilities=[pb.CAPABILITY_CHAT, value])
        message = expect_error(
            functools.partial(balancer.registry.RegisterModel, request),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_request",
        )
        assert (
            message.startswith("capabilities must be among chat, completion,")
            and f"got ['{name}']" in message
        )
    headers = {"authorization": f"Bearer {balancer.admin_key}"} if balancer.admin_key else {}
    answer = httpx.post(
        f"{balancer.http_url}/v0/models",
        json={"repo_id": "acme/any", "capabilities": ["chat", "juggling"]},
        headers=headers,
        timeout=10,
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("capabilities must be among chat, completion,")
    assert balancer.registry.ListModels(rpb.ListModelsRequest()) == before


def test_register_gguf_repo_pins_revision_with_sizes_and_sha256(
    balancer: BalancerProcess, hub: FakeHub
) -> None:
    head = hub.add_repo(
        "acme/tiny-GGUF", {"tiny-q4_k_m.gguf": GGUF, "config.json": CONFIG, "README.md": b"# hi"}
    )
    model = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/tiny-GGUF"))
    assert model.id == "acme/tiny-gguf"
    assert model.manifest.revision == head
    assert model.manifest.origin == hub.url
    files = files_of(model)
    assert set(files) == {"tiny-q4_k_m.gguf", "config.json"}  # the README is not a model file
    gguf = files["tiny-q4_k_m.gguf"]
    assert (gguf.size_bytes, gguf.sha256, gguf.format) == (len(GGUF), sha(GGUF), pb.FILE_FORMAT_GGUF)
    assert list(gguf.backends) == [pb.BACKEND_ANY]
    # The hub publishes no sha256 for small git files; the balancer hashed it while streaming it.
    assert files["config.json"].sha256 == sha(CONFIG)
    assert set(model.capabilities) >= {pb.CAPABILITY_CHAT, pb.CAPABILITY_COMPLETION}

    manifest = balancer.manifest.GetManifest(mpb.GetManifestRequest(model_id="ACME/tiny-gguf"))
    assert manifest.revision == head and manifest.repo == "acme/tiny-GGUF"
    assert [f.filename for f in manifest.files] == [f.filename for f in model.manifest.files]


def test_register_safetensors_repo_with_metal_file(balancer: BalancerProcess, hub: FakeHub) -> None:
    weights, metal = b"\x08" * 4096, b"\x0f" * 2048
    hub.add_repo(
        "acme/mlx-model", {"model.safetensors": weights, "model.metal.bin": metal, "tokenizer.json": b"{}"}
    )
    model = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/mlx-model"))
    files = files_of(model)
    assert files["model.safetensors"].format == pb.FILE_FORMAT_SAFETENSORS
    assert files["model.safetensors"].sha256 == sha(weights)
    assert files["model.metal.bin"].format == pb.FILE_FORMAT_METAL
    assert list(files["model.metal.bin"].backends) == [pb.BACKEND_METAL]

    def names(backend: pb.Backend.ValueType) -> set[str]:
        reply = balancer.manifest.GetManifest(mpb.GetManifestRequest(model_id=model.id, backend=backend))
        return {f.filename for f in reply.files}

    assert "model.metal.bin" not in names(pb.BACKEND_CUDA)
    assert "model.metal.bin" not in names(pb.BACKEND_CPU)
    assert names(pb.BACKEND_METAL) == set(files)


def test_repo_with_several_ggufs_needs_a_filename(balancer: BalancerProcess, hub: FakeHub) -> None:
    hub.add_repo("acme/multi", {"m-Q4_K_M.gguf": GGUF, "m-Q8_0.gguf": GGUF + b"8"})
    details = expect_error(
        lambda: balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/multi")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_request",
    )
    assert "m-Q8_0.gguf" in details
    model = balancer.registry.RegisterModel(
        rpb.RegisterModelRequest(repo_id="acme/multi", filename="m-Q8_0.gguf")
    )
    assert model.id == "acme/multi/m-q8_0"
    assert [f.filename for f in model.manifest.files] == ["m-Q8_0.gguf"]
    expect_error(
        lambda: balancer.registry.RegisterModel(
            rpb.RegisterModelRequest(repo_id="acme/multi", filename="nope.gguf")
        ),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    )


def test_registration_is_pinned_and_idempotent(balancer: BalancerProcess, hub: FakeHub) -> None:
    first = hub.add_repo("acme/moving", {"w.gguf": GGUF})
    a = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/moving"))
    b = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/moving"))
    assert a == b  # same revision, same timestamps: nothing was rewritten
    assert [m.id for m in balancer.registry.ListModels(rpb.ListModelsRequest()).models].count(
        "acme/moving"
    ) == 1

    second = hub.commit("acme/moving", {"w.gguf": GGUF + b"v2"})
    still = balancer.registry.GetModel(rpb.GetModelRequest(model_id="acme/moving"))
    assert still.manifest.revision == first  # the manifest does not follow the branch by itself
    moved = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/moving"))
    assert moved.manifest.revision == second
    assert files_of(moved)["w.gguf"].sha256 == sha(GGUF + b"v2")
    pinned = balancer.registry.RegisterModel(
        rpb.RegisterModelRequest(repo_id="acme/moving", revision=first, model_id="acme/moving-v1")
    )
    assert pinned.manifest.revision == first
    assert files_of(pinned)["w.gguf"].size_bytes == len(GGUF)


def test_delete_and_list(balancer: BalancerProcess, hub: FakeHub) -> None:
    hub.add_repo("acme/gone", {"w.gguf": GGUF})
    balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/gone"))
    ids = [m.id for m in balancer.registry.ListModels(rpb.ListModelsRequest()).models]
    assert "acme/gone" in ids and ids == sorted(ids)
    reply = balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id="acme/gone"))
    assert reply.model_id == "acme/gone"
    assert "acme/gone" not in [m.id for m in balancer.registry.ListModels(rpb.ListModelsRequest()).models]
    expect_error(
        lambda: balancer.registry.GetModel(rpb.GetModelRequest(model_id="acme/gone")),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    )
    expect_error(
        lambda: balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id="acme/gone")),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    )


BAD_IDS = ["../x", "a" * 257, "a//b", ""]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_invalid_argument_and_create_nothing(
    balancer: BalancerProcess, hub: FakeHub, bad: str
) -> None:
    hub.add_repo("acme/ok", {"w.gguf": GGUF})
    before = balancer.registry.ListModels(rpb.ListModelsRequest())
    hub.clear_log()
    calls = [
        lambda: balancer.registry.RegisterModel(
            rpb.RegisterModelRequest(repo_id="acme/ok", model_id=bad or "..")
        ),
        lambda: balancer.registry.GetModel(rpb.GetModelRequest(model_id=bad)),
        lambda: balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id=bad)),
        lambda: balancer.registry.GetModelStatus(rpb.GetModelStatusRequest(model_id=bad)),
        lambda: balancer.manifest.GetManifest(mpb.GetManifestRequest(model_id=bad)),
    ]
    for call in calls:
        expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "invalid_model_id")
    assert balancer.registry.ListModels(rpb.ListModelsRequest()) == before
    assert hub.requests == []  # refused before any traffic to the origin
    # No model directory or file appeared next to the metadata store.
    assert all(p.name.startswith(("llmlb.db", "balancer.log", "admin-key")) for p in balancer.home.iterdir())


def test_unknown_model_is_not_found(balancer: BalancerProcess) -> None:
    details = expect_error(
        lambda: balancer.registry.GetModel(rpb.GetModelRequest(model_id="no/such-model")),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    )
    assert "no/such-model" in details
    expect_error(
        lambda: balancer.manifest.GetManifest(mpb.GetManifestRequest(model_id="no/such-model")),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    )


def test_private_repo_needs_hf_token(balancer_factory, hub: FakeHub) -> None:
    head = hub.add_repo("acme/secret", {"w.gguf": GGUF}, private=True)
    without = balancer_factory(hub)
    details = expect_error(
        lambda: without.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/secret")),
        grpc.StatusCode.PERMISSION_DENIED,
        "origin_unauthorized",
    )
    assert "HF_TOKEN" in details
    with_token = balancer_factory(hub, token=True)
    model = with_token.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/secret"))
    assert model.manifest.revision == head
    assert files_of(model)["w.gguf"].sha256 == sha(GGUF)


def test_origin_outside_allowlist_is_refused_without_contact(balancer: BalancerProcess, hub: FakeHub) -> None:
    hub.add_repo("acme/ok", {"w.gguf": GGUF})
    hub.clear_log()
    for origin in (
        "https://evil.example.com",
        "http://127.0.0.2:8080",
        hub.url.replace("127.0.0.1", "localhost"),
    ):
        request = rpb.RegisterModelRequest(repo_id="acme/ok", origin=origin)
        details = expect_error(
            functools.partial(balancer.registry.RegisterModel, request),
            grpc.StatusCode.PERMISSION_DENIED,
            "origin_not_allowed",
        )
        assert "LLMLB_ALLOWED_ORIGINS" in details
    assert hub.requests == []
    assert balancer.registry.RegisterModel(
        rpb.RegisterModelRequest(repo_id="acme/ok", origin=hub.url + "/")
    ).id


def test_unknown_repo_and_unreachable_origin(balancer_factory, hub: FakeHub) -> None:
    proc = balancer_factory(hub, token=True)
    expect_error(
        lambda: proc.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/missing")),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    )
    hub.add_repo("acme/ok", {"w.gguf": GGUF})
    expect_error(
        lambda: proc.registry.RegisterModel(
            rpb.RegisterModelRequest(repo_id="acme/ok", revision="no-such-branch")
        ),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    )
    expect_error(
        lambda: proc.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="not a repo")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_request",
    )
    hub.stop()
    expect_error(
        lambda: proc.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/ok")),
        grpc.StatusCode.UNAVAILABLE,
        "origin_unreachable",
    )


def test_restart_keeps_every_model(balancer: BalancerProcess, hub: FakeHub) -> None:
    hub.add_repo("acme/keep", {"w.gguf": GGUF})
    kept = balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/keep"))
    balancer.registry.DeleteModel(rpb.DeleteModelRequest(model_id="whisper-base"))  # a catalogue model
    before = balancer.registry.ListModels(rpb.ListModelsRequest())
    assert balancer.stop() == 0  # SIGTERM: a clean exit
    balancer.start()
    after = balancer.registry.ListModels(rpb.ListModelsRequest())
    assert after == before
    assert balancer.registry.GetModel(rpb.GetModelRequest(model_id="acme/keep")) == kept
    # A deleted catalogue model is not re-seeded by the restart.
    assert "whisper-base" not in [m.id for m in after.models]
    assert "gemma-3-270m" in [m.id for m in after.models]


def test_catalogue_models_are_served(balancer: BalancerProcess) -> None:
    gemma = balancer.registry.GetModel(rpb.GetModelRequest(model_id="gemma-3-270m"))
    assert gemma.from_catalog
    assert gemma.manifest.files[0].filename == "gemma-3-270m-q4_k_m.gguf"
    assert gemma.manifest.files[0].size_bytes == 253113024
    assert not gemma.ready and list(gemma.nodes) == []  # no node has it yet
    status = balancer.registry.GetModelStatus(rpb.GetModelStatusRequest(model_id="gemma-3-270m"))
    assert (status.status, status.total_bytes, status.progress) == (pb.MODEL_STATE_ABSENT, 253113024, 0.0)


def test_read_blob_proxies_from_the_origin_without_touching_disk(
    balancer: BalancerProcess, hub: FakeHub
) -> None:
    big = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB: several chunks
    hub.add_repo("acme/blob", {"w.gguf": big})
    balancer.registry.RegisterModel(rpb.RegisterModelRequest(repo_id="acme/blob"))
    chunks = list(balancer.manifest.ReadBlob(mpb.ReadBlobRequest(model_id="acme/blob", filename="w.gguf")))
    assert b"".join(c.data for c in chunks) == big
    assert len(chunks) > 1 and all(c.total_size == len(big) and c.sha256 == sha(big) for c in chunks)
    assert [c.offset for c in chunks] == [sum(len(x.data) for x in chunks[:i]) for i in range(len(chunks))]
    resumed = balancer.manifest.ReadBlob(
        mpb.ReadBlobRequest(model_id="acme/blob", filename="w.gguf", offset=1000)
    )
    assert b"".join(c.data for c in resumed) == big[1000:]
    part = balancer.manifest.ReadBlob(
        mpb.ReadBlobRequest(model_id="acme/blob", filename="w.gguf", offset=10, length=20)
    )
    assert b"".join(c.data for c in part) == big[10:30]
    # Nothing but the metadata store and the log lives in the balancer's home.
    assert all(p.name.startswith(("llmlb.db", "balancer.log", "admin-key")) for p in balancer.home.rglob("*"))
    assert sum(p.stat().st_size for p in balancer.home.rglob("llmlb.db*")) < len(big)
    expect_error(
        lambda: list(
            balancer.manifest.ReadBlob(mpb.ReadBlobRequest(model_id="acme/blob", filename="../etc"))
        ),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    )
    expect_error(
        lambda: list(
            balancer.manifest.ReadBlob(
                mpb.ReadBlobRequest(model_id="acme/blob", filename="w.gguf", offset=len(big))
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_request",
    )


def test_health_and_reflection(balancer: BalancerProcess) -> None:
    assert balancer.channel is not None
    health = health_pb2_grpc.HealthStub(balancer.channel)
    for service in ("", "llmlb.v1.Registry", "llmlb.v1.Manifest"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(balancer.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"llmlb.v1.Registry", "llmlb.v1.Manifest", "grpc.health.v1.Health"} <= names


def test_cli_lists_and_registers(balancer: BalancerProcess, hub: FakeHub) -> None:
    hub.add_repo("acme/cli", {"w.gguf": GGUF})

    def llmlb(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "balancer.cli", *args, "--balancer", balancer.address],
            cwd=ROOT,
            env={**os.environ, "LLMLB_API_KEY": balancer.admin_key},
            capture_output=True,
            text=True,
            timeout=30,
        )

    added = llmlb("models", "add", "acme/cli")
    assert added.returncode == 0, added.stderr
    listed = llmlb("models", "list")
    assert listed.returncode == 0 and "acme/cli" in listed.stdout and "gemma-3-270m" in listed.stdout
    missing = llmlb("models", "show", "no/such")
    assert missing.returncode == 1 and "model_not_found" in missing.stderr
    removed = llmlb("models", "rm", "acme/cli", "--json")
    assert removed.returncode == 0 and '"model_id": "acme/cli"' in removed.stdout
