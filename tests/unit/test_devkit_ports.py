"""The test harness's ports stay out of the range outgoing connections use, and never repeat."""

from __future__ import annotations

import itertools
import socket

import pytest

from devkit import ports


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    floor = ports._ephemeral_floor()
    given = [ports.free_port() for _ in range(50)]
    assert len(set(given)) == len(given)
    if floor - ports._LOWEST >= 1_000:
        assert all(ports._LOWEST <= port < floor for port in given)
    with socket.socket() as s:
        s.bind(("127.0.0.1", given[-1]))  # nothing took it


def test_a_port_something_listens_on_is_never_given(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        # The first pick lands on the held port; later ones walk down from it.
        picks = itertools.chain([taken], range(taken - 1, 1024, -1))
        monkeypatch.setattr("devkit.ports.random.randrange", lambda a, b: next(picks))
        monkeypatch.setattr(ports, "_ephemeral_floor", lambda: 65_536)
        assert ports.free_port() != taken
