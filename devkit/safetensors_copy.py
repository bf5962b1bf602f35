"""A safetensors copy of the packaged gemma GGUF, for tests and benchmarks of the transformers runtime.

No small safetensors chat model ships on the package index, so the packaged GGUF is dequantised by
``transformers`` (its GGUF reader) once and written as a plain Hugging Face folder: ``config.json``,
``model.safetensors``, tokenizer files. The folder lives under ``<repo>/build/test-models/``, named by
the GGUF's sha256, so a clone converts once (about two minutes on two cores) and never again.
``transformers`` refuses ``save_pretrained`` of a model read from a GGUF, so the weights are written with
``safetensors`` directly and the GGUF quantisation note is dropped from the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from common.formats import backends_for, classify
from common.types import Capability, ManifestFile, Model, ModelSource
from devkit import packaged_models
from devkit.model_files import ROOT, ModelFiles, catalogue_model

BUILD = Path(os.environ.get("LLMLB_TEST_BUILD_DIR", ROOT / "build" / "test-models"))
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def safetensors_copy(gguf: Path, name: str = "gemma-3-270m-safetensors", root: Path = BUILD) -> Path:
    """The folder holding the safetensors copy of ``gguf``, converted on first use."""
    target = root / f"{name}-{sha256_of(gguf)[:16]}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        _convert(gguf, work)
        try:
            work.rename(target)
        except OSError:  # another process finished first: its copy is as good
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Tied weights (the embedding doubles as the output layer) are one tensor: save each storage once.
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        state[key] = tensor.detach().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def safetensors_files(folder: Path, model_id: str = "gemma-3-270m-safetensors") -> ModelFiles:
    """The copy in ``folder`` as a node's resolver hands it to its pool: every file of the folder in the
    manifest, and the packaged gemma's chat template (its tokenizer files carry none)."""
    gemma = catalogue_model(packaged_models.GEMMA)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    model = Model(
        id=model_id,
        name="Gemma 3 270M (safetensors)",
        source=ModelSource.HF,
        repo_id=f"local/{model_id}",
        revision="",
        origin="",
        files=[
            ManifestFile(n, classify(n), (folder / n).stat().st_size, backends=backends_for(classify(n)))
            for n in names
        ],
        capabilities=[Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDING],
        chat_template=gemma.chat_template,
    )
    return ModelFiles(model=model, paths={n: folder / n for n in names})


def catalogue_entry(folder: Path, model_id: str = "gemma-3-270m-safetensors") -> dict[str, object]:
    """A catalogue entry (``LLMLB_CATALOG``'s shape) for the copy in ``folder``: every file with its size
    and sha256 (hashed once, then kept beside the folder), the packaged gemma's chat template."""
    sums_path = folder.with_name(folder.name + ".sha256.json")
    try:
        sums: dict[str, str] = json.loads(sums_path.read_text())
    except (OSError, ValueError):
        sums = {p.name: sha256_of(p) for p in sorted(folder.iterdir()) if p.is_file()}
        sums_path.write_text(json.dumps(sums, indent=2))
    files = safetensors_files(folder, model_id)
    return {
        "id": model_id,
        "name": files.model.name,
        "source": "hf",
        "repo_id": f"local/{model_id}",
        "artifacts": [
            {"filename": f.filename, "size_bytes": f.size_bytes, "sha256": sums[f.filename]}
            for f in files.model.files
        ],
        "capabilities": [c.value for c in files.model.capabilities],
        "chat_template": files.model.chat_template,
    }
