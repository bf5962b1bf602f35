"""Format and backend classification by file name (DESIGN.md seed rules)."""

import pytest

from common.errors import LlmlbError
from common.formats import backends_for, capabilities_for, check_filename, classify, is_manifest_file
from common.types import Backend, Capability, FileFormat


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("model-Q4_K_M.gguf", FileFormat.GGUF),
        ("sub/MODEL.GGUF", FileFormat.GGUF),
        ("model.safetensors", FileFormat.SAFETENSORS),
        ("model.metal.bin", FileFormat.METAL),
        ("en_US-joe-medium.onnx", FileFormat.ONNX),
        ("model.bin", FileFormat.WHISPER),
        ("ggml-base.bin", FileFormat.WHISPER),
        ("vocabulary.txt", FileFormat.CONFIG),
        ("en_US-joe-medium.onnx.json", FileFormat.CONFIG),
        ("tokenizer.model", FileFormat.CONFIG),
        ("weights.dat", FileFormat.OTHER),
    ],
)
def test_classify(name: str, fmt: FileFormat) -> None:
    assert classify(name) is fmt


def test_metal_files_are_only_for_metal_nodes() -> None:
    assert backends_for(FileFormat.METAL) == (Backend.METAL,)
    assert backends_for(FileFormat.GGUF) == (Backend.ANY,)


@pytest.mark.parametrize(
    "name", ["README.md", ".gitattributes", "assets/logo.png", "pytorch_model.pt", ".cache/x"]
)
def test_docs_and_foreign_weights_are_not_manifest_files(name: str) -> None:
    assert not is_manifest_file(name)


def test_capabilities_follow_formats() -> None:
    assert Capability.CHAT in capabilities_for({FileFormat.GGUF, FileFormat.CONFIG})
    assert capabilities_for({FileFormat.WHISPER, FileFormat.CONFIG}) == [Capability.TRANSCRIPTION]
    assert capabilities_for({FileFormat.ONNX}) == [Capability.SPEECH]
    assert capabilities_for({FileFormat.CONFIG}) == []


@pytest.mark.parametrize("name", ["", "/etc/passwd", "a/../b", "..", "a//b", "a\\b", "./a", "a/"])
def test_bad_file_names_are_refused(name: str) -> None:
    with pytest.raises(LlmlbError):
        check_filename(name)
