"""Node-id rules: what a valid node id is.

A node id is at most 128 characters of ASCII letters (either case), digits, ``-``, ``_`` and ``.``:
the model-id alphabet without ``/``, since a node id is never a path. It goes into the
``x-llmlb-node`` header and into logs, so a control character or a non-Latin-1 one must never get
in. Checked wherever an id enters (registration, a key bound to a node id).
"""

from __future__ import annotations

import re

from common.errors import ErrorCode, LlmlbError

MAX_NODE_ID_LENGTH = 128
_NODE_ID = re.compile(r"[A-Za-z0-9._-]+")


def check_node_id(node_id: str) -> str:
    """``node_id`` unchanged, or ``invalid_request`` when it is too long or has other characters."""
    if len(node_id) > MAX_NODE_ID_LENGTH or not _NODE_ID.fullmatch(node_id):
        raise LlmlbError(
            ErrorCode.INVALID_REQUEST,
            f"node_id {node_id[:80]!r}: at most {MAX_NODE_ID_LENGTH} ASCII letters, digits, '-', '_' or '.'",
        )
    return node_id
