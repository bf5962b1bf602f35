"""``tools`` and ``tool_choice`` of a Chat Completions or Responses body -> ``Tool``s and a ``ToolChoice``.

Chat nests a function tool (``{type: function, function: {name, parameters}}``) where Responses keeps
it flat (``{type: function, name, parameters}``); each API's mapping flattens its own shape into
``FunctionSpec``s, and the checks here, with their messages, are then the same for both. A refusal names
a field as the caller's API spells it (``ToolShape``). Whether names are well formed, and whether a
named choice is among the tools, is checked later at admission, for every door.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from common.errors import ErrorCode, LlmlbError
from common.inference import Tool, ToolChoice, ToolChoiceMode


@dataclass(frozen=True, slots=True)
class ToolShape:
    """Where one API puts a function's name, for messages that name the field as the caller wrote it."""

    name_field: str  # the name's path under a tool (``tools.<i>.``) and under ``tool_choice.``
    named_choice: str  # what a tool_choice naming a function looks like

    def name_path(self, where: str) -> str:
        return f"{where}.{self.name_field}"


CHAT_TOOLS = ToolShape("function.name", "{'type': 'function', 'function': {'name': ...}}")
RESPONSES_TOOLS = ToolShape("name", "{'type': 'function', 'name': ...}")


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One function tool, or a ``tool_choice`` object naming one, flattened from either API's shape."""

    type: str
    name: str | None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


_MODES = {"auto": ToolChoiceMode.AUTO, "none": ToolChoiceMode.NONE, "required": ToolChoiceMode.REQUIRED}


def _invalid(message: str) -> LlmlbError:
    return LlmlbError(ErrorCode.INVALID_REQUEST, message)


def tooling(
    specs: Iterable[FunctionSpec], choice: str | FunctionSpec | None, shape: ToolShape
) -> tuple[tuple[Tool, ...], ToolChoice]:
    """A request's tools and its tool choice, each checked (``_function_tools``, ``_tool_choice``)."""
    return _function_tools(specs, shape), _tool_choice(choice, shape)


def _function_tools(specs: Iterable[FunctionSpec], shape: ToolShape) -> tuple[Tool, ...]:
    """The tools a request offers; any other type than ``function``, or a tool without a name, is refused."""
    tools = []
    for i, spec in enumerate(specs):
        if spec.type != "function":
            raise _invalid(f"tools.{i}.type {spec.type[:40]!r} is not supported; use 'function'")
        if not spec.name:
            raise _invalid(f"missing required parameter: {shape.name_path(f'tools.{i}')!r}")
        tools.append(
            Tool(
                name=spec.name,
                description=spec.description or "",
                parameters=json.dumps(spec.parameters) if spec.parameters is not None else "",
                strict=bool(spec.strict),
            )
        )
    return tuple(tools)


def _tool_choice(choice: str | FunctionSpec | None, shape: ToolShape) -> ToolChoice:
    """A mode (``auto``, ``none``, ``required``) or a named function; absent: ``auto``."""
    if choice is None:
        return ToolChoice()
    if isinstance(choice, str):
        if choice == "function":
            raise _invalid(f"tool_choice 'function' needs a name: {shape.named_choice}")
        mode = _MODES.get(choice)
        if mode is None:
            raise _invalid(
                f"tool_choice {choice[:40]!r} is not supported; use 'auto', 'none', 'required' or a function"
            )
        return ToolChoice(mode)
    if choice.type != "function":
        raise _invalid(
            f"tool_choice.type {choice.type[:40]!r} is not supported; name a function: {shape.named_choice}"
        )
    if not choice.name:
        raise _invalid(f"missing required parameter: {shape.name_path('tool_choice')!r}")
    return ToolChoice(ToolChoiceMode.FUNCTION, choice.name)
