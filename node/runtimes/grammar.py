"""llama.cpp grammars (GBNF) that constrain sampling: JSON answers and tool calls.

A grammar is built from JSON Schemas with llama-cpp-python's converter (the balancer has already
refused, with ``common.json_schema_check``, any schema the converter would not enforce exactly). Several
schemas go into one grammar for tool calls, so each one's rules are renamed under a prefix of its own:
two tools may both define ``$defs/Item`` differently.

Building the grammar text costs milliseconds to tens of milliseconds for a big schema, paid again for
every request that repeats the schema, so the texts are kept in a small LRU keyed by what they were
built from. llama.cpp parses the text itself when sampling starts.
"""

from __future__ import annotations

import functools
import json
import re

from common.inference import (
    ChatRequest,
    ResponseFormat,
    ResponseFormatType,
    Tool,
    ToolChoiceMode,
)
from node.runtimes.tool_calls import CALL_ARGUMENTS, CALL_CLOSE, CALL_NAME_OPEN, CALL_OPEN, CALL_SEPARATOR

CACHE_SIZE = 64  # distinct schemas a node keeps built grammars for

# A JSON object of any shape (OpenAI's json_object mode).
_ANY_OBJECT = "{}"
# Free text that does not begin with a call's marker: the other branch of tool_choice "auto".
_FREE_TEXT = r"[^<] [^\x00]*"

_RULE = re.compile(r"^([a-zA-Z0-9-]+)\s*::=\s*(.*)$")
_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*")


def _literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


@functools.lru_cache(maxsize=CACHE_SIZE)
def schema_rules(schema: str) -> dict[str, str]:
    """The converter's rules for one schema (JSON text), ``root`` among them."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    rules: dict[str, str] = {}
    for line in json_schema_to_gbnf(schema).splitlines():
        match = _RULE.match(line)
        if match:
            rules[match.group(1)] = match.group(2)
    return rules


def _rename(body: str, rename: dict[str, str]) -> str:
    """``body`` with rule names replaced, leaving string literals and character classes alone."""
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch in '"[':
            close = '"' if ch == '"' else "]"
            j = i + 1
            while j < len(body) and body[j] != close:
                j += 2 if body[j] == "\\" else 1
            out.append(body[i : j + 1])
            i = j + 1
            continue
        match = _NAME.match(body, i) if ch.isalpha() else None
        if match:
            word = match.group(0)
            out.append(rename.get(word, word))
            i = match.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _prefixed(schema: str, prefix: str) -> tuple[str, list[str]]:
    """One schema's rules under ``prefix``: the name of its root rule, and the rule lines."""
    rules = schema_rules(schema)
    rename = {name: f"{prefix}-{name}" for name in rules}
    lines = [f"{rename[name]} ::= {_rename(body, rename)}" for name, body in rules.items()]
    return rename["root"], lines


@functools.lru_cache(maxsize=CACHE_SIZE)
def response_grammar(response_format: ResponseFormat) -> str | None:
    """The grammar for a ``response_format``; None for free text."""
    if response_format.type is ResponseFormatType.JSON_OBJECT:
        return _whole(_ANY_OBJECT)
    if response_format.type is ResponseFormatType.JSON_SCHEMA:
        return _whole(response_format.schema)
    return None


def _whole(schema: str) -> str:
    root, lines = _prefixed(schema, "answer")
    return "\n".join([f"root ::= {root}", *lines])


def _call_rule(index: int, tool: Tool) -> tuple[str, list[str]]:
    root, lines = _prefixed(tool.parameters or _NO_ARGUMENTS, f"tool{index}")
    head = _literal(CALL_OPEN + CALL_NAME_OPEN + tool.name + CALL_ARGUMENTS)
    name = f"call{index}"
    return name, [f"{name} ::= {head} {root} {_literal(CALL_CLOSE)}", *lines]


_NO_ARGUMENTS = '{"type": "object", "properties": {}}'


def tool_grammar(request: ChatRequest) -> str | None:
    """The grammar for a chat with tools; None when the answer is free (no tools, or choice 'none')."""
    mode = request.tool_choice.mode
    if not request.tools or mode is ToolChoiceMode.NONE:
        return response_grammar(request.params.response_format)
    return _tool_grammar(
        request.tools,
        mode,
        request.tool_choice.function,
        request.parallel_tool_calls,
        request.params.response_format,
    )


@functools.lru_cache(maxsize=CACHE_SIZE)
def _tool_grammar(
    tools: tuple[Tool, ...],
    mode: ToolChoiceMode,
    function: str,
    parallel: bool,
    response_format: ResponseFormat,
) -> str:
    lines: list[str] = []
    calls: list[str] = []
    for index, tool in enumerate(tools):
        if mode is ToolChoiceMode.FUNCTION and tool.name != function:
            continue
        name, rules = _call_rule(index, tool)
        calls.append(name)
        lines.extend(rules)
    lines.append(f"call ::= {' | '.join(calls)}")
    if parallel and mode is not ToolChoiceMode.FUNCTION:
        lines.append(f"calls ::= call ({_literal(CALL_SEPARATOR)} call)*")
    else:
        lines.append("calls ::= call")
    if mode is ToolChoiceMode.AUTO:
        text = response_grammar(response_format)
        if text is None:
            lines.append(f"text ::= {_FREE_TEXT}")
        else:  # the text branch keeps the response format's shape
            root, rules = _prefixed(response_format.schema or _ANY_OBJECT, "answer")
            lines.extend(rules)
            lines.append(f"text ::= {root}")
        lines.insert(0, "root ::= calls | text")
    else:
        lines.insert(0, "root ::= calls")
    return "\n".join(lines)
