"""Model-id rules from DESIGN.md: what clients may send and what they get back."""

import pytest

from common.errors import ErrorCode, LlmlbError
from common.model_id import MAX_MODEL_ID_LENGTH, derive_model_id, model_dir, normalize_model_id


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("gemma-3-270m", "gemma-3-270m"),
        ("Org/Model_V1.5", "org/model_v1.5"),
        ("a/b/c", "a/b/c"),
        ("x" * MAX_MODEL_ID_LENGTH, "x" * MAX_MODEL_ID_LENGTH),
    ],
)
def test_valid_ids_are_lower_cased(raw: str, normal: str) -> None:
    assert normalize_model_id(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "../x",
        "a/../b",
        "..",
        "a..b",
        "/abs",
        "trailing/",
        "a//b",
        "a/./b",
        ".",
        "x" * (MAX_MODEL_ID_LENGTH + 1),
        "has space",
        "semi;colon",
        "back\\slash",
        "nul\x00byte",
        "ünïcode",
        "a:b",
    ],
)
def test_bad_ids_are_invalid_model_id(raw: str) -> None:
    with pytest.raises(LlmlbError) as info:
        normalize_model_id(raw)
    assert info.value.code is ErrorCode.INVALID_MODEL_ID
    assert info.value.spec.http_status == 400


def test_error_message_bounds_a_hostile_id() -> None:
    with pytest.raises(LlmlbError) as info:
        normalize_model_id("a b" + "y" * 250)
    assert len(info.value.message) < 200


def test_derived_ids_come_from_repo_and_file() -> None:
    assert derive_model_id("Org/Repo-GGUF") == "org/repo-gguf"
    assert derive_model_id("org/repo", "sub/Model.Q4_K_M.gguf") == "org/repo/model.q4_k_m"
    assert derive_model_id("org/repo", "voice+x.onnx") == "org/repo/voice-x"


def test_model_dir_stays_inside_models_dir(tmp_path) -> None:
    assert model_dir(tmp_path, "Org/M") == (tmp_path / "org" / "m").resolve()
    with pytest.raises(LlmlbError):
        model_dir(tmp_path, "../../etc")
    assert list(tmp_path.iterdir()) == []  # validating never creates anything
