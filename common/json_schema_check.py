"""Which JSON Schemas the nodes can enforce while sampling; checked on the balancer, at admission.

A node turns a schema into a llama.cpp grammar (``node.runtimes.grammar``), and that converter drops
what it does not understand without a word: ``minimum`` on a number, ``uniqueItems``, ``not``, a
``format`` it has no rule for. An answer sampled from such a grammar may then fail the caller's schema.
So every keyword is checked here against an allowlist that mirrors what the converter really
enforces, and anything else is refused with a message that names it, before the request is routed.
Keywords that only describe (``title``, ``description``, ``default``, ...) are always allowed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from common.errors import ErrorCode, LlmlbError

MAX_SCHEMA_CHARS = 64 * 1024  # a grammar grows with its schema; bigger ones are almost always mistakes
MAX_DEPTH = 32

# Annotations: no effect on which values validate.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",  # OpenAPI's hint on a oneOf; the alternatives themselves decide
    }
)
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# The string formats the converter has a rule for.
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})


class _Refusal(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def parse_schema(text: str, where: str) -> Any:
    """The schema in ``text`` as JSON; ``invalid_request`` naming ``where`` when it is not JSON."""
    if len(text) > MAX_SCHEMA_CHARS:
        raise _invalid(f"{where}: the schema is {len(text)} characters; the limit is {MAX_SCHEMA_CHARS}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"{where}: the schema is not valid JSON: {exc}") from None


def check_schema(schema: Any, where: str) -> None:
    """``invalid_request`` unless a grammar can enforce ``schema`` exactly.

    ``where`` names the parameter in the message, e.g. ``response_format.json_schema``; the message
    also gives the path inside the schema, e.g. ``'patternProperties' is not supported (at
    properties.tags)``.
    """
    try:
        _Checker(schema).visit(schema, "", 0)
    except _Refusal as refusal:
        at = f" (at {refusal.path})" if refusal.path else ""
        raise _invalid(f"{where}: {refusal.message}{at}") from None


def _invalid(message: str) -> LlmlbError:
    return LlmlbError(ErrorCode.INVALID_REQUEST, message)


def _join(path: str, part: str | int) -> str:
    return f"{path}.{part}" if path else str(part)


class _Checker:
    def __init__(self, root: Any) -> None:
        self.root = root

    def visit(self, schema: Any, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Refusal(path, f"the schema nests deeper than {MAX_DEPTH} levels")
        if isinstance(schema, bool):
            # true / false schemas: the converter has no rule for either
            raise _Refusal(path, "a boolean schema (true/false) is not supported; use {} for any object")
        if not isinstance(schema, Mapping):
            raise _Refusal(path, f"a schema must be a JSON object, got {type(schema).__name__}")
        keys = set(schema) - _ANNOTATIONS
        for container in ("$defs", "definitions"):
            if container in keys:
                keys.discard(container)
                defs = schema[container]
                if not isinstance(defs, Mapping):
                    raise _Refusal(_join(path, container), f"'{container}' must be an object")
                for name, sub in defs.items():
                    self.visit(sub, _join(_join(path, container), name), depth + 1)
        if "$ref" in keys:
            self._ref(schema["$ref"], keys - {"$ref"}, path)
        elif "anyOf" in keys or "oneOf" in keys:
            self._union(schema, keys, path, depth)
        elif "const" in keys or "enum" in keys:
            self._constant(schema, keys, path)
        else:
            self._typed(schema, keys, path, depth)

    def _ref(self, ref: Any, rest: set[str], path: str) -> None:
        if rest:
            raise _Refusal(path, f"'$ref' beside {_names(rest)} is not supported; the converter ignores them")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise _Refusal(path, f"'$ref' {ref!r} is not supported; only local references ('#/...') are")
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or part not in target:
                raise _Refusal(path, f"'$ref' {ref!r} points to nothing")
            target = target[part]

    def _union(self, schema: Mapping[str, Any], keys: set[str], path: str, depth: int) -> None:
        word = "anyOf" if "anyOf" in keys else "oneOf"
        rest = keys - {word}
        if rest:
            raise _Refusal(
                path, f"'{word}' beside {_names(rest)} is not supported; put them in each alternative"
            )
        alternatives = schema[word]
        if not isinstance(alternatives, list) or not alternatives:
            raise _Refusal(path, f"'{word}' must be a non-empty list")
        for i, sub in enumerate(alternatives):
            self.visit(sub, _join(_join(path, word), i), depth + 1)

    def _constant(self, schema: Mapping[str, Any], keys: set[str], path: str) -> None:
        rest = keys - {"const", "enum", "type"}
        if rest:
            raise _Refusal(path, f"{_names(rest)} beside 'const'/'enum' is not supported")
        if "enum" in keys and (not isinstance(schema["enum"], list) or not schema["enum"]):
            raise _Refusal(path, "'enum' must be a non-empty list")
        if "type" in keys:
            # the converter writes the listed values and never looks at the type: they must agree
            values = [schema["const"]] if "const" in keys else list(schema["enum"])
            allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            for value in values:
                if not any(_is_type(value, t) for t in allowed):
                    raise _Refusal(
                        path, f"the value {value!r} is not of the schema's type {schema['type']!r}"
                    )

    def _typed(self, schema: Mapping[str, Any], keys: set[str], path: str, depth: int) -> None:
        kind = schema.get("type")
        if isinstance(kind, list):
            for t in kind:
                if not isinstance(t, str) or t not in _TYPES:
                    raise _Refusal(path, f"unknown type {t!r}")
            if keys - {"type"}:
                raise _Refusal(
                    path, f"a list of types beside {_names(keys - {'type'})} is not supported; use 'anyOf'"
                )
            return
        if kind is not None and (not isinstance(kind, str) or kind not in _TYPES):
            raise _Refusal(path, f"unknown type {kind!r}")
        if kind == "object" or (kind is None and ("properties" in keys or "additionalProperties" in keys)):
            self._object(schema, keys, path, depth)
        elif kind == "array":
            self._array(schema, keys, path, depth)
        elif kind == "string":
            self._string(schema, keys, path)
        elif kind is None:
            rest = keys
            if rest:
                raise _Refusal(path, f"{_names(rest)} without a 'type' is not supported")
        else:  # number, integer, boolean, null: the converter knows no bounds
            self._refuse_extra(keys - {"type"}, path)

    def _object(self, schema: Mapping[str, Any], keys: set[str], path: str, depth: int) -> None:
        self._refuse_extra(keys - {"type", "properties", "required", "additionalProperties"}, path)
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise _Refusal(path, "'properties' must be an object")
        for name, sub in properties.items():
            self.visit(sub, _join(_join(path, "properties"), name), depth + 1)
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _Refusal(path, "'required' must be a list of property names")
        for name in required:
            if name not in properties:
                raise _Refusal(path, f"'required' names {name!r}, which is not in 'properties'")
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping | bool):
            if isinstance(extra, Mapping):
                self.visit(extra, _join(path, "additionalProperties"), depth + 1)
        elif extra is not None:
            raise _Refusal(path, "'additionalProperties' must be a boolean or a schema")

    def _array(self, schema: Mapping[str, Any], keys: set[str], path: str, depth: int) -> None:
        self._refuse_extra(keys - {"type", "items", "prefixItems", "minItems", "maxItems"}, path)
        items = schema.get("items", schema.get("prefixItems"))
        if items is None:
            if keys & {"minItems", "maxItems"}:
                raise _Refusal(path, "'minItems'/'maxItems' need 'items'")
            return
        if "items" in keys and "prefixItems" in keys:
            raise _Refusal(path, "'items' beside 'prefixItems' is not supported")
        if isinstance(items, list):
            if keys & {"minItems", "maxItems"}:
                raise _Refusal(path, "'minItems'/'maxItems' beside a tuple of items is not supported")
            for i, sub in enumerate(items):
                self.visit(sub, _join(_join(path, "items"), i), depth + 1)
            return
        for bound in ("minItems", "maxItems"):
            if bound in keys and (not isinstance(schema[bound], int) or schema[bound] < 0):
                raise _Refusal(path, f"'{bound}' must be a non-negative integer")
        self.visit(items, _join(path, "items"), depth + 1)

    def _string(self, schema: Mapping[str, Any], keys: set[str], path: str) -> None:
        self._refuse_extra(keys - {"type", "format", "minLength", "maxLength"}, path)
        if "format" in keys:
            if not isinstance(schema["format"], str) or schema["format"] not in _FORMATS:
                raise _Refusal(
                    path, f"format {schema['format']!r} is not supported; supported: {sorted(_FORMATS)}"
                )
            if keys & {"minLength", "maxLength"}:
                raise _Refusal(path, "'minLength'/'maxLength' beside 'format' is not supported")
        for bound in ("minLength", "maxLength"):
            if bound in keys and (not isinstance(schema[bound], int) or schema[bound] < 0):
                raise _Refusal(path, f"'{bound}' must be a non-negative integer")

    @staticmethod
    def _refuse_extra(keys: set[str], path: str) -> None:
        if keys:
            first = sorted(keys)[0]
            raise _Refusal(path, f"{first!r} is not supported")


def _names(keys: set[str]) -> str:
    return ", ".join(repr(k) for k in sorted(keys))


def _is_type(value: Any, kind: Any) -> bool:
    checks: dict[str, Any] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    check = checks.get(kind) if isinstance(kind, str) else None
    return bool(check(value)) if check else False
