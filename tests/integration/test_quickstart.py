"""The original quickstarts, line by line, against the fake hub: real processes on 127.0.0.1.

1. A ``supported_models.json`` in the original format (``source: hf_gguf``, a rounded ``size_bytes`` and
   no sha256) placed in ``$LLMLB_HOME``; ``llmlb serve`` with no ``--catalog``; ``xllm --models-dir ...``
   with no command; chat through the official ``openai`` client, a few requests at once while the
   model downloads; ``GET /v0/models/<id>/status`` during the download; the pinned manifest.
2. Models placed by hand: a ``model.gguf`` in ``~/.llmlb/models/<id>/`` answered by chat, a folder of
   safetensors listed with ``owned_by: local`` and a manifest naming each file's format, a folder with a
   bad name skipped, a catalogue id kept pinned, a changed file on the shared dir used by the next request.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from devkit.fake_hub import FakeHub
from devkit.model_files import ModelFiles
from tests.fixtures.eventually import eventually
from tests.integration.conftest import BalancerProcess, NodeProcess, wait_online

REPO = "bartowski/Llama-3.2-1B-Instruct-GGUF"
FILE = "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
ENTRY = {  # as the original quickstart wrote it: a rounded size, no sha256, no capabilities
    "id": "llama-3.2-1b",
    "name": "Llama 3.2 1B",
    "source": "hf_gguf",
    "repo_id": REPO,
    "artifacts": [{"filename": FILE, "size_bytes": 876000000}],
    "required_vram_mb": 2048,
    "tags": ["chat", "instruct"],
}
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]
OLD = time.time() - 3600  # files "copied an hour ago": settled, as a scan wants them


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def client(balancer: BalancerProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{balancer.http_url}/v1", api_key=balancer.admin_key, max_retries=0, timeout=180
    )


def http(balancer: BalancerProcess) -> httpx.Client:
    headers = {"Authorization": f"Bearer {balancer.admin_key}"}
    return httpx.Client(base_url=balancer.http_url, headers=headers, timeout=30)


def chat(balancer: BalancerProcess, model: str) -> str:
    reply = client(balancer).chat.completions.create(model=model, messages=HELLO, max_tokens=4, temperature=0)
    return reply.choices[0].message.content or ""


def listed(balancer: BalancerProcess) -> dict[str, dict[str, Any]]:
    with http(balancer) as h:
        return {m["id"]: m for m in h.get("/v1/models").json()["data"]}


def manifest(balancer: BalancerProcess, model_id: str) -> dict[str, Any]:
    with http(balancer) as h:
        reply = h.get(f"/v0/models/registry/{model_id}/manifest.json")
        reply.raise_for_status()
        return reply.json()  # type: ignore[no-any-return]


@pytest.fixture
def started() -> Any:
    procs: list[BalancerProcess | NodeProcess] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()


def test_the_original_catalogue_in_llmlb_home_downloads_once_and_answers_chat_through_openai(
    hub: FakeHub, gemma_chat_gguf: Path, tmp_path: Path, started: list[Any]
) -> None:
    data = gemma_chat_gguf.read_bytes()
    hub.add_repo(REPO, {FILE: data})
    home = tmp_path / "llmlb"
    home.mkdir()
    (home / "supported_models.json").write_text(json.dumps({"models": [ENTRY]}))
    balancer = BalancerProcess(home, {"HF_ENDPOINT": hub.url, "LLMLB_LOG_FORMAT": "json"})
    started.append(balancer)
    balancer.start()  # no --catalog: $LLMLB_HOME/supported_models.json

    pinned = manifest(balancer, "llama-3.2-1b")
    [file] = pinned["files"]
    assert (file["filename"], file["format"]) == (FILE, "gguf")
    assert (file["size_bytes"], file["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(pinned["revision"]) == 40  # pinned to the hub's commit
    assert '"catalog.size_pinned"' in balancer.log() and '"published_bytes": 876000000' in balancer.log()

    # `xllm --models-dir /custom/path/models` with no command: it serves.
    env = {"HF_ENDPOINT": hub.url, "XLLM_LOG_FORMAT": "console", **balancer.node_env()}
    node = NodeProcess(tmp_path / "node", balancer.address, env, [], command=())
    node.models_dir = tmp_path / "custom" / "path" / "models"
    started.append(node)
    node.start()
    wait_online(balancer, node)

    hub.set_total_throttle(48 * 1024 * 1024)  # seconds of download: time to ask for its status
    statuses: list[dict[str, Any]] = []
    with ThreadPoolExecutor(3) as pool, http(balancer) as h:
        answers = [pool.submit(chat, balancer, "llama-3.2-1b") for _ in range(3)]

        def downloading() -> bool:
            status = h.get("/v0/models/llama-3.2-1b/status").json()
            statuses.append(status)
            return bool(status["status"] == "downloading")

        eventually(downloading, 60, "the model downloading")
        assert all(a.result(timeout=180) for a in answers)  # every request waited for the one download
    during = statuses[-1]
    assert during["total_bytes"] == len(data) and 0 <= during["downloaded_bytes"] < len(data)
    assert [n["state"] for n in during["nodes"]] == ["downloading"]
    assert hub.bytes_served(REPO, FILE) == len(data)
    assert (node.models_dir / "llama-3.2-1b" / FILE).stat().st_size == len(data)
    assert "Download progress: 100% (" in node.log()  # the console log reads as a sentence
    assert listed(balancer)["llama-3.2-1b"]["owned_by"] == "bartowski"  # as catalogue models are today

    with pytest.raises(openai.NotFoundError) as err:
        chat(balancer, "llama-3.2-3b")
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_models_placed_by_hand_are_listed_as_local_served_and_reread_when_they_change(
    hub: FakeHub, gemma: ModelFiles, gemma_chat_gguf: Path, tmp_path: Path, started: list[Any]
) -> None:
    plain_gguf = next(p for p in gemma.paths.values() if p.name.endswith(".gguf"))
    models, shared = tmp_path / "node" / "models", tmp_path / "shared"
    # mkdir -p ~/.llmlb/models/llama-3.2-1b && cp X.gguf ~/.llmlb/models/llama-3.2-1b/model.gguf
    (models / "llama-3.2-1b").mkdir(parents=True)
    os.link(gemma_chat_gguf, models / "llama-3.2-1b" / "model.gguf")
    (models / "Bad Name!").mkdir()
    os.link(gemma_chat_gguf, models / "Bad Name!" / "model.gguf")
    (models / "gemma-3-270m").mkdir()  # the catalogue's id: the catalogue's model stays pinned
    os.link(gemma_chat_gguf, models / "gemma-3-270m" / "model.gguf")
    (shared / "tiny-llama-st").mkdir(parents=True)  # a folder of safetensors with config and tokenizer
    for name, body in {
        "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "README.md": b"# not a model file",
    }.items():
        (shared / "tiny-llama-st" / name).write_bytes(body)
        os.utime(shared / "tiny-llama-st" / name, (OLD, OLD))
    (shared / "shared-gemma").mkdir()
    os.link(gemma_chat_gguf, shared / "shared-gemma" / "model.gguf")

    balancer = BalancerProcess(tmp_path / "llmlb", {"HF_ENDPOINT": hub.url, "LLMLB_LOG_FORMAT": "json"})
    started.append(balancer)
    balancer.start()
    env = {"HF_ENDPOINT": hub.url, "XLLM_LOCAL_SCAN_INTERVAL": "0.5", **balancer.node_env()}
    node = NodeProcess(tmp_path / "node", balancer.address, env, ["--shared-dir", str(shared)])
    started.append(node)
    node.start()
    wait_online(balancer, node)

    eventually(
        lambda: {"llama-3.2-1b", "tiny-llama-st", "shared-gemma"} <= listed(balancer).keys(),
        30,
        "local models",
    )
    models_now = listed(balancer)
    for model_id in ("llama-3.2-1b", "tiny-llama-st", "shared-gemma"):
        assert models_now[model_id]["owned_by"] == "local"
    assert models_now["gemma-3-270m"]["owned_by"] == "hugginllam"  # kept: the catalogue's, pinned
    assert not any("bad" in m for m in models_now)
    assert "local_model.bad_id" in node.log() and "local_model.catalogue_id" in node.log()

    st = manifest(balancer, "tiny-llama-st")
    formats = {f["filename"]: f["format"] for f in st["files"]}
    assert formats == {
        "config.json": "config",
        "model.safetensors": "safetensors",
        "tokenizer.json": "config",
        "tokenizer_config.json": "config",
    }
    by_name = {f["filename"]: f for f in st["files"]}
    assert by_name["model.safetensors"]["sha256"] == sha256_of(shared / "tiny-llama-st" / "model.safetensors")

    assert chat(balancer, "llama-3.2-1b").strip()  # the hand-placed model.gguf answers
    assert chat(balancer, "shared-gemma").strip()
    gemma_manifest = manifest(balancer, "gemma-3-270m")
    assert [f["filename"] for f in gemma_manifest["files"]] == ["gemma-3-270m-q4_k_m.gguf"]

    # The shared copy is replaced by a GGUF without a chat template: the very next request reads it.
    os.link(plain_gguf, shared / "shared-gemma" / ".next")
    os.replace(shared / "shared-gemma" / ".next", shared / "shared-gemma" / "model.gguf")
    with pytest.raises(openai.BadRequestError) as err:
        chat(balancer, "shared-gemma")
    assert "chat template" in str(err.value)
    changed = sha256_of(plain_gguf)
    eventually(
        lambda: manifest(balancer, "shared-gemma")["files"][0]["sha256"] == changed,
        30,
        "the new sha256 listed",
    )
