"""Which engine serves a model: the engines a node offers, chosen by file format and capability.

Each engine is one module exposing ``SPEC``; adding an engine is a new module named in ``ENGINE_MODULES``.
Engine libraries are imported only when a model loads, so a node without one still serves the others.
A module may also expose ``available(settings) -> bool``: an engine that cannot run on this node (its
library is missing, or another engine serves those files better on this backend) is then not offered,
so the node neither reports it nor picks it. Earlier modules win when two serve the same files.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from common.errors import ErrorCode, LlmlbError
from common.types import Capability, FileFormat, Model
from node.runtimes.base import RuntimeSettings, RuntimeSpec

ENGINE_MODULES: tuple[str, ...] = (
    "node.runtimes.llama",
    "node.runtimes.vllm",  # before transformers: on a CUDA node with vLLM it serves safetensors
    "node.runtimes.transformers",
    "node.runtimes.whisper",
    "node.runtimes.piper",
    "node.runtimes.diffusion",
)


class Engines:
    """The engines a node offers, looked up by (model files, capability)."""

    def __init__(self, specs: Iterable[RuntimeSpec]) -> None:
        self._specs = list(specs)

    @classmethod
    def default(cls, settings: RuntimeSettings | None = None) -> Engines:
        """Every engine of ``ENGINE_MODULES`` that can run on a node with ``settings``."""
        settings = settings or RuntimeSettings()
        specs: list[RuntimeSpec] = []
        for name in ENGINE_MODULES:
            module = importlib.import_module(name)
            available = getattr(module, "available", None)
            if available is None or available(settings):
                specs.append(module.SPEC)
        return cls(specs)

    @property
    def specs(self) -> list[RuntimeSpec]:
        return list(self._specs)

    @property
    def names(self) -> list[str]:
        return [s.engine for s in self._specs]

    @property
    def formats(self) -> list[FileFormat]:
        """Every weight format some engine here loads, for the node's registration."""
        return [f for f in FileFormat if any(f in s.formats for s in self._specs)]

    @property
    def capabilities(self) -> list[Capability]:
        """Everything some engine here can serve, for the node's registration."""
        return [c for c in Capability if any(c in s.capabilities for s in self._specs)]

    def select(self, model: Model, capability: Capability) -> RuntimeSpec:
        """The engine that serves ``capability`` for ``model``.

        A model that lacks the capability is ``model_not_found`` (as the balancer answers it); a model
        whose files no engine here loads for it is ``no_capable_nodes``.
        """
        if capability not in model.capabilities:
            have = ", ".join(c.value for c in model.capabilities) or "nothing"
            raise LlmlbError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {model.id!r} does not support {capability.value} (it supports {have})",
            )
        for spec in self._specs:
            if spec.serves(model, capability):
                return spec
        formats = sorted({f.format.value for f in model.files})
        raise LlmlbError(
            ErrorCode.NO_CAPABLE_NODES,
            f"no runtime on this node serves {capability.value} from {', '.join(formats) or 'no files'}",
        )

    def specs_for(self, model: Model) -> list[RuntimeSpec]:
        """Every engine that serves some capability of ``model`` with its files."""
        return [s for s in self._specs if any(s.serves(model, c) for c in model.capabilities)]
