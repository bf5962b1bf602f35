"""The seed catalogue: the packaged one loads, broken ones fail with the entry named."""

import json
from pathlib import Path

import pytest

from balancer.catalog import CatalogError, load_catalog
from common.types import Capability, FileFormat


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
