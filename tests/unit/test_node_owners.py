"""Who may speak for a node id: the rules of ``balancer.fleet.owners``, without sockets."""

from __future__ import annotations

import pytest

from balancer.fleet.owners import check_session, owner_after_registration, requested_id
from common.errors import ErrorCode, LlmlbError
from common.types import ApiKey, Node, Scope


def key(key_id: str, *scopes: Scope, node_id: str = "") -> ApiKey:
    return ApiKey(key_id, key_id, "llmlb-x", "hash-" + key_id, scopes or (Scope.NODE,), node_id=node_id)


FIRST, SECOND = key("key-first"), key("key-second")
ADMIN = key("key-admin", Scope.ADMIN)
BOUND = key("key-bound", node_id="echo-1")


def stored(owner: str = "key-first", address: str = "10.0.0.1:50061") -> Node:
    return Node(id="echo-1", address=address, owner_key_id=owner)


def refused(call: object) -> LlmlbError:
    assert callable(call)
    with pytest.raises(LlmlbError) as caught:
        call()
    assert caught.value.code is ErrorCode.FORBIDDEN
    return caught.value


def test_a_new_node_id_belongs_to_the_key_that_registers_it() -> None:
    assert owner_after_registration(FIRST, None, "10.0.0.1:50061", online=False) == "key-first"


def test_the_owner_registers_again_at_any_address_while_the_node_is_offline() -> None:
    assert owner_after_registration(FIRST, stored(), "10.0.0.9:50061", online=False) == "key-first"
    assert owner_after_registration(FIRST, stored(), "10.0.0.1:50061", online=True) == "key-first"


def test_another_node_key_cannot_take_a_node_id_online_or_not() -> None:
    offline = refused(lambda: owner_after_registration(SECOND, stored(), "10.0.0.1:50061", online=False))
    online = refused(lambda: owner_after_registration(SECOND, stored(), "10.0.0.1:50061", online=True))
    assert "belongs to another key" in offline.message and "belongs to another key" in online.message


def test_an_online_node_keeps_its_address_whoever_asks() -> None:
    for caller in (FIRST, SECOND, ADMIN, BOUND, None):
        error = refused(lambda: owner_after_registration(caller, stored(), "10.6.6.6:1", online=True))  # noqa: B023
        assert "online at another address" in error.message


def test_an_admin_key_or_a_key_bound_to_the_id_reassigns_it() -> None:
    assert owner_after_registration(ADMIN, stored(), "10.0.0.2:1", online=False) == "key-admin"
    assert owner_after_registration(BOUND, stored(), "10.0.0.2:1", online=False) == "key-bound"


def test_a_key_bound_to_a_node_id_registers_that_id_only() -> None:
    assert requested_id(BOUND, "echo-1") == "echo-1"
    assert requested_id(BOUND, "") == "echo-1"  # asks for none: gets its own
    assert "bound to node 'echo-1'" in refused(lambda: requested_id(BOUND, "echo-2")).message
    assert requested_id(FIRST, "echo-2") == "echo-2" and requested_id(None, "") == ""


def test_with_keys_off_nobody_owns_a_node_and_the_address_rule_still_holds() -> None:
    assert owner_after_registration(None, None, "10.0.0.1:1", online=False) == ""
    assert owner_after_registration(None, stored(owner=""), "10.0.0.2:1", online=False) == ""
    refused(lambda: owner_after_registration(None, stored(owner=""), "10.0.0.2:1", online=True))


def test_only_the_owner_or_an_admin_key_opens_a_nodes_session() -> None:
    check_session(FIRST, stored())
    check_session(ADMIN, stored())
    check_session(None, stored())  # keys off
    refused(lambda: check_session(SECOND, stored()))
    refused(lambda: check_session(BOUND, stored()))  # bound to it, but not yet registered with it
