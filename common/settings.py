"""The settings machinery on ``pydantic-settings``: each setting declared once, layered, checked, described.

A program's schema (``common.config``) is a ``pydantic_settings.BaseSettings`` whose fields are made with
``setting()``: the environment variable names (the first is the main one, the rest older or shared
names still honoured), the flag, the constraints and a one-line description. From that one declaration
come the value (flag > environment > ``$LLMLB_HOME/.env`` > default), the one-line error naming the
variable or flag, the ``--help`` text, ``config`` output and the tables in docs/configuration.md.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from common.completion import complete_path
from common.secret import Secret, masked_url

S = TypeVar("S", bound=BaseSettings)


@dataclass(frozen=True, slots=True)
class Spec:
    """What a setting's field says about itself beyond its type: names, flag, how help shows it."""

    env: tuple[str, ...]
    flag: str = ""  # e.g. "--grpc-listen"; empty: environment only
    shown_default: str = ""  # the default as help and docs show it, where it is computed
    secret: bool = False  # never printed: config output shows "set"
    group: str = ""  # a heading the docs table and help put it under
    repeatable: bool = False  # the flag may be given several times, one item each


def setting(
    default: Any,
    *env: str,
    help: str,
    flag: str = "",
    shown_default: str = "",
    secret: bool = False,
    group: str = "",
    repeatable: bool = False,
) -> Any:
    """A schema field: its default, its environment names (main name first), flag and description."""
    spec = Spec(env, flag, shown_default, secret, group, repeatable)
    return Field(default, description=help, json_schema_extra={"spec": spec})  # type: ignore[dict-item]


def spec_of(info: FieldInfo) -> Spec:
    extra = info.json_schema_extra
    assert isinstance(extra, dict), "every schema field is made with setting()"
    found = extra["spec"]
    assert isinstance(found, Spec)
    return found


def parsed(parse: Callable[[str], Any]) -> BeforeValidator:
    """A validator that reads text (the environment, the .env file, a flag) with ``parse``.

    Numbers given in code go through the same parser, so a flag's range is checked as its variable's.
    """

    def validate(value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)):
            return parse(str(value))
        return value

    return BeforeValidator(validate)


def read_env_file(path: Path) -> dict[str, str]:
    """Parses a dotenv file: ``KEY=value`` lines, ``#`` comments, optional ``export`` and quotes."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        if key:
            values[key] = value
    return values


@dataclass(frozen=True, slots=True)
class Layers:
    """Where text values come from, in order: the process environment, then the .env file."""

    env: Mapping[str, str]
    file_values: Mapping[str, str]

    @classmethod
    def read(cls, env: Mapping[str, str] | None, env_file: Path) -> Layers:
        return cls(dict(os.environ if env is None else env), read_env_file(env_file))

    def lookup(self, names: tuple[str, ...]) -> tuple[str, str] | None:
        """The first of ``names`` set (non-empty) in the environment, else in the file: (name, value)."""
        for source in (self.env, self.file_values):
            for name in names:
                value = source.get(name)
                if value not in (None, ""):
                    return name, value
        return None

    def raw(self, *names: str) -> str | None:
        found = self.lookup(names)
        return None if found is None else found[1]


# The layers and flags of the load in progress: pydantic-settings builds a source from the class alone,
# so what one load reads is handed to its source here (a context variable: loads never interleave).
_LOAD: ContextVar[tuple[Layers, dict[str, str]]] = ContextVar("settings_load")


class LayeredSource(PydanticBaseSettingsSource):
    """The environment over the .env file, each field under its own names, the first set winning.

    Names are looked up in the environment first, all of them, then in the file: a deprecated name in
    the environment wins over the current name in the file, as an operator's shell wins over the file.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        layers, origins = _LOAD.get()
        found = layers.lookup(spec_of(field).env)
        if found is None:
            return None, field_name, False
        origins[field_name] = f"{found[0]}={found[1]!r}"
        return found[1], field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(info, name)
            if value is not None:
                values[name] = value
        return values


class SettingError(ValueError):
    """A bad value: one line naming the variable or flag, the value and what is expected."""


@contextmanager
def _loading(layers: Layers, origins: dict[str, str]) -> Iterator[None]:
    token = _LOAD.set((layers, origins))
    try:
        yield
    finally:
        _LOAD.reset(token)


def load(schema: type[S], layers: Layers, flags: Mapping[str, Any]) -> S:
    """``schema`` from ``flags`` (field name -> value; None: not given) over ``layers`` over defaults.

    Raises ``SettingError`` for the first bad value, naming where it came from; a secret's value is
    never repeated.
    """
    given = {name: value for name, value in flags.items() if value is not None}
    origins: dict[str, str] = {}
    for name, value in given.items():
        spec = spec_of(schema.model_fields[name])
        where = spec.flag or spec.env[0]
        origins[name] = f"{where}={value!r}" if isinstance(value, str) else f"{where}={value}"
    try:
        with _loading(layers, origins):
            return schema(**given)
    except ValidationError as exc:
        raise SettingError(describe_error(schema, exc, origins)) from None


def describe_error(schema: type[BaseSettings], exc: ValidationError, origins: Mapping[str, str]) -> str:
    error = exc.errors(include_url=False)[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if name not in schema.model_fields:
        return message
    spec = spec_of(schema.model_fields[name])
    where = origins.get(name, spec.env[0] if spec.env else name)
    if spec.secret:  # the name only: the value is a secret
        where = where.partition("=")[0]
    return f"{where}: {expected(message)}"


def expected(message: str) -> str:
    """Pydantic's wording for a type error, said as what is expected."""
    replacements = {
        "Input should be a valid integer, unable to parse string as an integer": "expected a whole number",
        "Input should be a valid number, unable to parse string as a number": "expected a number",
        "Input should be a valid integer": "expected a whole number",
        "Input should be a valid number": "expected a number",
    }
    return replacements.get(message, message)


def layered_sources(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Flags (the init arguments) over ``LayeredSource``; pydantic-settings' own env and dotenv
    sources are left out, so each name is read exactly as documented."""
    return init_settings, LayeredSource(settings_cls)


@dataclass(frozen=True, slots=True)
class Row:
    """One setting as help text and docs show it."""

    name: str
    env: tuple[str, ...]
    flag: str
    default: str
    help: str
    group: str


INTERNAL = "internal"  # the group of settings one process sets for another: neither in help nor docs


def rows(schema: type[BaseSettings]) -> list[Row]:
    """Every setting of ``schema`` as people see it: declaration order, grouped settings after the rest."""
    out = []
    for name, info in schema.model_fields.items():
        spec = spec_of(info)
        if spec.group == INTERNAL:
            continue
        default = spec.shown_default or show_default(info.default)
        out.append(Row(name, spec.env, spec.flag, default, info.description or "", spec.group))
    return sorted(out, key=lambda row: row.group != "")


def show_default(value: Any) -> str:
    if value is None or value == "" or value == ():
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def env_help(schema: type[BaseSettings], title: str, width: int = 29, line: int = 104) -> str:
    """The environment section of a ``--help``: every variable, its default and meaning."""
    lines = [title]
    for row in rows(schema):
        default = f" (default {row.default})" if row.default != "unset" else ""
        text = textwrap.wrap(f"{row.help}{default}", line - width - 2, break_on_hyphens=False) or [""]
        names = " / ".join(row.env)
        if len(names) >= width:
            lines.append(f"  {names}")
            text = ["", *text]
        lines.append(f"  {names if len(names) < width else '':{width}}{text[0]}".rstrip())
        lines.extend(f"  {'':{width}}{more}" for more in text[1:])
    return "\n".join(line for line in lines if line.strip() or line == title) + "\n"


def flag_help(schema: type[BaseSettings], name: str) -> str:
    """A flag's help: the setting's description, its default and its variable."""
    info = schema.model_fields[name]
    spec = spec_of(info)
    default = spec.shown_default or show_default(info.default)
    return f"{info.description} ({spec.env[0]}; default {default})".replace("%", "%%")


def shown(value: Any, secret: bool = False) -> Any:
    """A value as ``config`` prints it (JSON-ready); secrets as "set" or empty, URLs' passwords masked."""
    if secret or isinstance(value, Secret):
        return "set" if value else None
    if isinstance(value, str) and "://" in value and "@" in value:
        return masked_url(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [shown(v) for v in value]
    return value


def add_flags(
    parser: argparse.ArgumentParser, schema: type[BaseSettings], names: Iterable[str], default: Any
) -> None:
    """Adds the flags of ``names`` to ``parser``, their help drawn from the schema.

    Values stay text: the schema reads them as it reads the variable, so a bad one is the same one-line
    error, naming the flag. ``default`` is what an absent flag leaves (None, or ``argparse.SUPPRESS``).
    """
    for name in names:
        info = schema.model_fields[name]
        spec = spec_of(info)
        kwargs: dict[str, Any] = {"dest": name, "default": default, "help": flag_help(schema, name)}
        is_path = info.annotation is Path or Path in get_args(info.annotation)
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.repeatable:
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif is_path:
            kwargs.update(type=Path, metavar=name.removesuffix("_path").upper())  # any text is a path
        else:
            kwargs["metavar"] = name.removesuffix("_s").removesuffix("_path").upper()
        action = parser.add_argument(spec.flag, **kwargs)
        if is_path:
            complete_path(action, directory=name.endswith(("_dir", "home")))


def flagged(schema: type[BaseSettings]) -> list[str]:
    """The fields of ``schema`` that have a flag, in declaration order."""
    return [name for name, info in schema.model_fields.items() if spec_of(info).flag]
