"""The bulk paths listen on fixed default ports an operator can open between hosts.

A node's bulk (peer file) server defaults to port 50062 and the balancer's bulk proxy to 50052, each
on its gRPC host; ``XLLM_BULK_PORT`` / ``LLMLB_BULK_PORT`` move them, 0 asks for any free port, and a
process whose gRPC port is 0 gets any free bulk port too. ``*_BULK_LISTEN`` still names the whole
address or turns the path off. ``llmlb serve --workers`` shares the proxy's one port among workers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.bulk_http import BulkListener
from common.config import (
    BALANCER_BULK_PORT,
    NODE_BULK_PORT,
    HttpLimits,
    load_balancer_config,
    load_node_config,
)
from devkit.ports import free_port


def test_the_bulk_ports_default_to_fixed_ports_beside_the_grpc_host(tmp_path: Path) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    assert (BALANCER_BULK_PORT, NODE_BULK_PORT) == (50052, 50062)
    assert load_node_config(home=tmp_path, env=home).bulk_listen == "127.0.0.1:50062"
    assert load_balancer_config(env=home).bulk_listen == "127.0.0.1:50052"
    node = load_node_config(home=tmp_path, env=home | {"XLLM_GRPC_LISTEN": "0.0.0.0:7000"})
    assert node.bulk_listen == "0.0.0.0:50062"  # the gRPC host, the bulk path's own port
    balancer = load_balancer_config(env=home, grpc_listen="10.1.2.3:7000")
    assert balancer.bulk_listen == "10.1.2.3:50052"


def test_a_setting_moves_each_bulk_port_and_zero_asks_for_any_free_one(tmp_path: Path) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}

    def node(port: str) -> str:
        return load_node_config(home=tmp_path, env=home | {"XLLM_BULK_PORT": port}).bulk_listen

    assert (node("9100"), node("0")) == ("127.0.0.1:9100", "127.0.0.1:0")
    assert load_balancer_config(env=home | {"LLMLB_BULK_PORT": "9200"}).bulk_listen == "127.0.0.1:9200"
    assert load_balancer_config(env=home | {"LLMLB_BULK_PORT": "0"}).bulk_listen == "127.0.0.1:0"
    # The same from the .env file, as every setting.
    (tmp_path / ".env").write_text("XLLM_BULK_PORT=9101\nLLMLB_BULK_PORT=9201\n")
    assert load_node_config(home=tmp_path, env=home).bulk_listen == "127.0.0.1:9101"
    assert load_balancer_config(env=home).bulk_listen == "127.0.0.1:9201"


def test_a_grpc_port_of_zero_gives_any_free_bulk_port_unless_one_is_set(tmp_path: Path) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    assert load_node_config(home=tmp_path, env=home, grpc_listen="127.0.0.1:0").bulk_listen == "127.0.0.1:0"
    assert load_balancer_config(env=home, grpc_listen="127.0.0.1:0").bulk_listen == "127.0.0.1:0"
    pinned = load_node_config(home=tmp_path, env=home | {"XLLM_BULK_PORT": "9100"}, grpc_listen="127.0.0.1:0")
    assert pinned.bulk_listen == "127.0.0.1:9100"


def test_the_whole_address_and_off_still_win_and_tls_still_turns_the_proxy_off(tmp_path: Path) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    both = {"XLLM_BULK_PORT": "9100", "XLLM_BULK_LISTEN": "10.0.0.9:9300"}
    assert load_node_config(home=tmp_path, env=home | both).bulk_listen == "10.0.0.9:9300"
    assert load_node_config(home=tmp_path, env=home | {"XLLM_BULK_LISTEN": "off"}).bulk_listen == ""
    off = {"LLMLB_BULK_LISTEN": "off", "LLMLB_BULK_PORT": "9200"}
    assert load_balancer_config(env=home | off).bulk_listen == ""
    tls = {"LLMLB_TLS_CERT": "/c.pem", "LLMLB_TLS_KEY": "/k.pem", "LLMLB_BULK_PORT": "9200"}
    assert load_balancer_config(env=home | tls).bulk_listen == ""


@pytest.mark.parametrize("value", ["65536", "-1", "port", "50 052"])
def test_a_bulk_port_out_of_range_is_refused_at_start_naming_the_variable(tmp_path: Path, value: str) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    with pytest.raises(ValueError, match=f"^XLLM_BULK_PORT={value!r}: expected a port from 0 to 65535"):
        load_node_config(home=tmp_path, env=home | {"XLLM_BULK_PORT": value})
    with pytest.raises(ValueError, match=f"^LLMLB_BULK_PORT={value!r}: expected a port from 0 to 65535"):
        load_balancer_config(env=home | {"LLMLB_BULK_PORT": value})


async def _noop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def test_workers_share_one_fixed_bulk_port_and_separate_balancers_cannot() -> None:
    port = free_port()
    first, second = BulkListener(_noop, HttpLimits()), BulkListener(_noop, HttpLimits())
    try:
        # As two workers of `llmlb serve --workers 2` do: both listen on the one port.
        assert await first.start(f"127.0.0.1:{port}", "test.bulk_listening", shared=True) == port
        assert await second.start(f"127.0.0.1:{port}", "test.bulk_listening", shared=True) == port
    finally:
        await first.stop()
        await second.stop()
    alone = BulkListener(_noop, HttpLimits())
    try:
        await alone.start(f"127.0.0.1:{port}", "test.bulk_listening")
        with pytest.raises(OSError):  # a second balancer started on a taken port fails, not shares
            await BulkListener(_noop, HttpLimits()).start(f"127.0.0.1:{port}", "test.bulk_listening")
    finally:
        await alone.stop()
