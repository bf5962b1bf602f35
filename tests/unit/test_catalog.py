"""The seed catalogue: the packaged one and the original format load; broken ones name the entry."""

import json
import re
from pathlib import Path

import pytest

from balancer.catalog import CatalogError, load_catalog
from common.config import load_balancer_config
from common.types import Capability, FileFormat, Model, ModelSource


def test_packaged_catalogue_has_the_small_models() -> None:
    models = {m.id: m for m in load_catalog(None, "https://huggingface.co")}
    assert {"gemma-3-270m", "whisper-base", "piper-en-us-joe-medium"} <= set(models)
    gemma = models["gemma-3-270m"]
    assert gemma.files[0].format is FileFormat.GGUF
    assert gemma.files[0].size_bytes == 253113024
    assert len(gemma.files[0].sha256) == 64
    assert Capability.CHAT in gemma.capabilities
    assert "<start_of_turn>" in gemma.chat_template  # the GGUF carries no template of its own
    assert all(m.from_catalog for m in models.values())
    assert models["whisper-base"].capabilities == [Capability.TRANSCRIPTION]


@pytest.mark.parametrize(
    ("catalog", "message"),
    [
        ({"models": [{"id": "../x", "artifacts": []}]}, "must not"),
        (
            {"models": [{"id": "a", "artifacts": [{"filename": "../../etc/passwd", "size_bytes": 1}]}]},
            "bad file",
        ),
        ({"models": [{"id": "a"}, {"id": "A"}]}, "twice"),
        ({"models": [{"id": "a", "capabilities": ["teleport"]}]}, "teleport"),
        ({"nope": []}, "'models' list"),
    ],
)
def test_broken_catalogue_names_the_problem(tmp_path: Path, catalog: object, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(catalog))
    with pytest.raises(CatalogError, match=message):
        load_catalog(path, "https://huggingface.co")


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{broken")
    with pytest.raises(CatalogError, match="not JSON"):
        load_catalog(path, "https://huggingface.co")


ORIGINAL_ENTRY = {  # an entry of the original supported_models.json, as its quickstart wrote it
    "id": "llama-3.2-1b",
    "name": "Llama 3.2 1B",
    "source": "hf_gguf",
    "repo_id": "bartowski/Llama-3.2-1B-Instruct-GGUF",
    "artifacts": [{"filename": "Llama-3.2-1B-Instruct-Q4_K_M.gguf", "size_bytes": 876000000}],
    "required_vram_mb": 2048,
    "tags": ["chat", "instruct"],
}


def _one(tmp_path: Path, entry: dict[str, object]) -> Model:
    path = tmp_path / "supported_models.json"
    path.write_text(json.dumps({"models": [entry]}))
    [model] = load_catalog(path, "https://huggingface.co")
    return model


def test_an_entry_of_the_original_format_loads_with_capabilities_from_its_tags(tmp_path: Path) -> None:
    model = _one(tmp_path, ORIGINAL_ENTRY)
    assert model.source is ModelSource.HF
    assert model.capabilities == [Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING]
    assert model.required_vram_mb == 2048
    assert (model.files[0].size_bytes, model.files[0].sha256) == (876000000, "")  # a hint, pinned at seeding


@pytest.mark.parametrize(
    ("source", "tags", "filename", "capabilities"),
    [
        ("hf_gguf", ["embedding"], "e.gguf", [Capability.EMBEDDING]),
        ("hf_safetensors", ["chat"], "model.safetensors", [Capability.CHAT, Capability.COMPLETION]),
        ("hf_onnx", ["tts"], "voice.onnx", [Capability.SPEECH]),
        ("hf_gguf", [], "m.gguf", [Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING]),
        ("hf", ["small"], "model.bin", [Capability.TRANSCRIPTION]),
    ],
)
def test_an_entry_naming_no_capabilities_gets_them_from_tags_and_formats(
    tmp_path: Path, source: str, tags: list[str], filename: str, capabilities: list[Capability]
) -> None:
    entry = {**ORIGINAL_ENTRY, "source": source, "tags": tags}
    entry["artifacts"] = [{"filename": filename, "size_bytes": 10}]
    assert _one(tmp_path, entry).capabilities == capabilities


def test_named_capabilities_win_over_tags(tmp_path: Path) -> None:
    entry = {**ORIGINAL_ENTRY, "capabilities": ["completion"]}
    assert _one(tmp_path, entry).capabilities == [Capability.COMPLETION]


def test_an_unknown_source_is_refused_naming_the_entry(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=re.escape("llama-3.2-1b")):
        _one(tmp_path, {**ORIGINAL_ENTRY, "source": "ftp"})


def test_the_catalogue_in_llmlb_home_is_read_when_none_is_named(tmp_path: Path) -> None:
    assert load_balancer_config(home=tmp_path, env={}).catalog_path is None  # the packaged one
    (tmp_path / "supported_models.json").write_text(json.dumps({"models": [ORIGINAL_ENTRY]}))
    config = load_balancer_config(home=tmp_path, env={})
    assert config.catalog_path == tmp_path / "supported_models.json"
    named = tmp_path / "other.json"
    assert load_balancer_config(home=tmp_path, env={}, catalog_path=named).catalog_path == named
    assert load_balancer_config(home=tmp_path, env={"LLMLB_CATALOG": str(named)}).catalog_path == named
