"""How the client commands print: JSON for scripts; tables, states and words for people (drawn by
``common.console_output``, shared with ``xllm``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any

from google.protobuf.json_format import MessageToDict

from common.pb.llmlb.v1 import types_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.message import Message


def as_dict(message: Message) -> dict[str, Any]:
    """A reply as JSON-ready data, with the .proto field names."""
    return MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def enum_name(enum_type: Any, value: int, prefix: str) -> str:
    """``(pb.NodeState, NODE_STATE_ONLINE, "NODE_STATE_")`` -> ``online``."""
    return str(enum_type.Name(value)).removeprefix(prefix).lower()


def state_name(value: int) -> str:
    """``MODEL_STATE_READY`` -> ``ready``."""
    return enum_name(pb.ModelState, value, "MODEL_STATE_")


def capability_names(values: Sequence[int]) -> str:
    return ",".join(enum_name(pb.Capability, v, "CAPABILITY_") for v in values) or "-"


def scope_names(values: Sequence[int]) -> str:
    return ",".join(enum_name(pb.Scope, v, "SCOPE_") for v in values)


def when(message: Any, name: str) -> str:
    """A timestamp field to the minute, or ``-`` when unset."""
    if not message.HasField(name):
        return "-"
    return str(getattr(message, name).ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M"))


def node_bytes(status: pb.ModelNodeStatus, model_bytes: int) -> tuple[int, int]:
    """(bytes held, bytes needed) of a model on a node; ``model_bytes`` when the node sent no total."""
    total = status.total_bytes or model_bytes
    # Files in place (a shared dir) or fetched: every byte is there even if the node sent no count.
    held = status.state in (pb.MODEL_STATE_PRESENT, pb.MODEL_STATE_LOADING, pb.MODEL_STATE_READY)
    return status.downloaded_bytes or (total if held else 0), total
