"""Configuration precedence: flags > environment > ~/.llmlb/.env > defaults."""

from pathlib import Path

import pytest

from common.config import (
    HttpLimits,
    load_balancer_config,
    load_node_config,
    normalize_origin,
    read_env_file,
    resolve_models_dir,
)
from common.rpc import server_options
from common.secret import Secret


def test_defaults_live_under_home(tmp_path: Path) -> None:
    cfg = load_balancer_config(env={"LLMLB_HOME": str(tmp_path)})
    assert cfg.home == tmp_path
    assert cfg.database_url == f"sqlite+aiosqlite:///{tmp_path / 'llmlb.db'}"
    assert cfg.grpc_listen == "127.0.0.1:50051"
    assert cfg.hf_endpoint == "https://huggingface.co"
    assert cfg.allowed_origins == ("https://huggingface.co",)
    assert cfg.hf_token is None


def test_flag_beats_env_beats_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comment\nexport LLMLB_GRPC_LISTEN=127.0.0.1:1111\nHF_TOKEN='from-file'\nLLMLB_LOG_LEVEL=debug\n"
    )
    env = {"LLMLB_HOME": str(tmp_path), "LLMLB_GRPC_LISTEN": "127.0.0.1:2222"}
    assert load_balancer_config(env=env).grpc_listen == "127.0.0.1:2222"
    assert load_balancer_config(env=env, grpc_listen="127.0.0.1:3333").grpc_listen == "127.0.0.1:3333"
    cfg = load_balancer_config(env={"LLMLB_HOME": str(tmp_path)})
    assert cfg.grpc_listen == "127.0.0.1:1111"
    assert cfg.hf_token == Secret("from-file")
    assert cfg.log_level == "debug"


def test_allowlist_defaults_to_the_hf_endpoint(tmp_path: Path) -> None:
    cfg = load_balancer_config(env={"LLMLB_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9/"})
    assert cfg.hf_endpoint == "http://127.0.0.1:9"
    assert cfg.origin_allowed("http://127.0.0.1:9")
    assert not cfg.origin_allowed("https://huggingface.co")


def test_bad_values_fail_at_start_with_the_variable_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LLMLB_GRPC_LISTEN"):
        load_balancer_config(env={"LLMLB_HOME": str(tmp_path), "LLMLB_GRPC_LISTEN": "nope"})
    with pytest.raises(ValueError, match="not an http"):
        load_balancer_config(env={"LLMLB_HOME": str(tmp_path), "LLMLB_ALLOWED_ORIGINS": "ftp://x"})


def test_origins_compare_in_normal_form() -> None:
    assert normalize_origin("HTTPS://HuggingFace.co:443/") == "https://huggingface.co"
    assert normalize_origin("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"


def test_models_dir_precedence(tmp_path: Path) -> None:
    env = {"LLMLB_HOME": str(tmp_path / "home")}
    assert resolve_models_dir(env=env) == tmp_path / "home" / "models"
    env["LLM_MODELS_DIR"] = str(tmp_path / "compat")
    assert resolve_models_dir(env=env) == tmp_path / "compat"
    env["XLLM_MODELS_DIR"] = str(tmp_path / "xllm")
    assert resolve_models_dir(env=env) == tmp_path / "xllm"
    assert resolve_models_dir(tmp_path / "flag", env=env) == tmp_path / "flag"


def test_a_nodes_home_gives_its_models_dir_and_the_env_file_naming_one(tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    assert load_node_config(home=home, env={}).models_dir == home / "models"
    home.mkdir()
    (home / ".env").write_text(f"XLLM_MODELS_DIR={tmp_path / 'from-file'}\n")
    assert load_node_config(home=home, env={}).models_dir == tmp_path / "from-file"
    env = {"XLLM_MODELS_DIR": str(tmp_path / "from-env")}
    assert load_node_config(home=home, env=env).models_dir == tmp_path / "from-env"


def test_env_file_parsing(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text('A=1\nB="two words"\nC=3 # trailing\n=skip\nnoequals\n')
    assert read_env_file(path) == {"A": "1", "B": "two words", "C": "3"}
    assert read_env_file(tmp_path / "missing") == {}


def test_database_pool_size_comes_from_the_environment_and_must_be_positive(tmp_path: Path) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    assert load_balancer_config(env=home).database_pool_size == 5
    assert load_balancer_config(env=home | {"LLMLB_DATABASE_POOL_SIZE": "12"}).database_pool_size == 12
    with pytest.raises(ValueError):
        load_balancer_config(env=home | {"LLMLB_DATABASE_POOL_SIZE": "0"})


def test_the_unknown_key_limits_come_from_the_environment_and_must_be_positive(tmp_path: Path) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    config = load_balancer_config(env=home)
    assert (config.unknown_key_cache, config.unknown_key_ttl_s, config.unknown_key_rate) == (
        10_000,
        30.0,
        5.0,
    )
    config = load_balancer_config(
        env=home
        | {"LLMLB_UNKNOWN_KEY_CACHE": "500", "LLMLB_UNKNOWN_KEY_TTL": "2.5", "LLMLB_UNKNOWN_KEY_RATE": "0.5"}
    )
    assert (config.unknown_key_cache, config.unknown_key_ttl_s, config.unknown_key_rate) == (500, 2.5, 0.5)
    for name in ("LLMLB_UNKNOWN_KEY_CACHE", "LLMLB_UNKNOWN_KEY_TTL", "LLMLB_UNKNOWN_KEY_RATE"):
        with pytest.raises(ValueError, match=name):
            load_balancer_config(env=home | {name: "0"})


def test_a_node_takes_one_balancer_or_several_in_the_order_given(tmp_path: Path) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    assert load_node_config(env=home).balancers == ("127.0.0.1:50051",)
    listed = load_node_config(env=home | {"XLLM_BALANCER": " 10.0.0.1:50051, lb-b.internal:50051 "})
    assert listed.balancers == ("10.0.0.1:50051", "lb-b.internal:50051")
    assert listed.balancer == "10.0.0.1:50051,lb-b.internal:50051"
    assert load_node_config(env=home | {"LLMLB_ADDR": "a:1,b:2"}).balancers == ("a:1", "b:2")
    flagged = load_node_config(env=home | {"XLLM_BALANCER": "a:1"}, balancer="[::1]:7,c:3")
    assert flagged.balancers == ("[::1]:7", "c:3")


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("a:1,,b:2", "an empty entry"),
        ("a:1,", "an empty entry"),
        ("a:1,b", "'b' is not host:port"),
        ("a:1,b:port", "'b:port' is not host:port"),
        (":50051", "':50051' is not host:port"),
        ("a:70000", "'a:70000' is not host:port"),
    ],
)
def test_a_malformed_balancer_list_is_refused_at_start_naming_its_source(
    tmp_path: Path, value: str, complaint: str
) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    with pytest.raises(ValueError, match=f"^XLLM_BALANCER={value!r}: .*{complaint}"):
        load_node_config(env=home | {"XLLM_BALANCER": value})
    with pytest.raises(ValueError, match=f"^--balancer={value!r}: .*{complaint}"):
        load_node_config(env=home, balancer=value)


def test_download_ranges_and_the_bulk_ports_come_from_the_environment(tmp_path: Path) -> None:
    home = {"LLMLB_HOME": str(tmp_path)}
    node = load_node_config(home=tmp_path, env=home, grpc_listen="10.0.0.5:50061")
    assert (node.download_connections, node.download_piece_mb) == (4, 32)
    assert node.bulk_listen == "10.0.0.5:50062"  # beside the gRPC port, on the fixed default port
    tuned = load_node_config(
        home=tmp_path,
        env=home
        | {"XLLM_DOWNLOAD_CONNECTIONS": "8", "XLLM_DOWNLOAD_PIECE_MB": "16", "XLLM_BULK_LISTEN": "off"},
    )
    assert (tuned.download_connections, tuned.download_piece_mb, tuned.bulk_listen) == (8, 16, "")
    with pytest.raises(ValueError):
        load_node_config(home=tmp_path, env=home | {"XLLM_DOWNLOAD_CONNECTIONS": "0"})
    assert load_balancer_config(env=home, grpc_listen="0.0.0.0:50051").bulk_listen == "0.0.0.0:50052"
    assert load_balancer_config(env=home | {"LLMLB_BULK_LISTEN": "off"}).bulk_listen == ""


def test_transport_limits_come_from_the_environment_and_a_node_falls_back_to_the_balancers_names(
    tmp_path: Path,
) -> None:
    balancer = load_balancer_config(env={"LLMLB_HOME": str(tmp_path)})
    assert balancer.http_limits == HttpLimits(64 * 1024, 10.0, 5.0, 1024)
    assert balancer.max_body_mb == 64
    env = {
        "LLMLB_HOME": str(tmp_path),
        "LLMLB_MAX_HEADER_KB": "8",
        "LLMLB_HEADER_TIMEOUT": "2.5",
        "LLMLB_KEEPALIVE_TIMEOUT": "1",
        "LLMLB_MAX_CONNECTIONS": "20",
        "LLMLB_MAX_BODY_MB": "16",
    }
    assert load_balancer_config(env=env).http_limits == HttpLimits(8 * 1024, 2.5, 1.0, 20)
    node = load_node_config(env=env | {"XLLM_MAX_CONNECTIONS": "30", "XLLM_MAX_BODY_MB": "32"})
    assert node.http_limits == HttpLimits(8 * 1024, 2.5, 1.0, 30)
    assert node.max_body_mb == 32
    assert load_node_config(env=env).max_body_mb == 16


@pytest.mark.parametrize(
    "name",
    ["LLMLB_MAX_HEADER_KB", "LLMLB_HEADER_TIMEOUT", "LLMLB_KEEPALIVE_TIMEOUT", "LLMLB_MAX_CONNECTIONS"],
)
def test_a_transport_limit_of_zero_is_refused_at_start(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        load_balancer_config(env={"LLMLB_HOME": str(tmp_path), name: "0"})


def test_the_grpc_receive_limit_is_the_body_limit_and_room_for_the_fields_beside_it() -> None:
    options = dict(server_options(16))
    assert options["grpc.max_receive_message_length"] == 17 * 1024 * 1024


def test_the_autoscaler_settings_come_from_the_environment_with_documented_defaults(tmp_path: Path) -> None:
    default = load_balancer_config(home=tmp_path, env={})
    assert (
        default.scale_up_queue_wait_s,
        default.scale_up_inflight,
        default.scale_up_window_s,
        default.scale_down_idle_s,
        default.scale_down_window_s,
    ) == (2.0, 4, 10.0, 300.0, 300.0)
    set_ = load_balancer_config(
        home=tmp_path,
        env={
            "LLMLB_SCALE_UP_QUEUE_WAIT": "0.5",
            "LLMLB_SCALE_UP_INFLIGHT": "2",
            "LLMLB_SCALE_UP_WINDOW": "1",
            "LLMLB_SCALE_DOWN_IDLE": "3",
            "LLMLB_SCALE_DOWN_WINDOW": "30",
        },
    )
    assert (
        set_.scale_up_queue_wait_s,
        set_.scale_up_inflight,
        set_.scale_up_window_s,
        set_.scale_down_idle_s,
        set_.scale_down_window_s,
    ) == (0.5, 2, 1.0, 3.0, 30.0)
    with pytest.raises(ValueError):
        load_balancer_config(home=tmp_path, env={"LLMLB_SCALE_DOWN_IDLE": "0"})


def test_a_nodes_drain_ends_before_kubernetes_default_grace_period_kills_it(tmp_path: Path) -> None:
    kubernetes_grace_s = 30.0  # terminationGracePeriodSeconds when a pod does not set it
    cfg = load_node_config(env={"LLMLB_HOME": str(tmp_path)})
    assert cfg.drain_timeout_s == 25.0
    assert cfg.drain_timeout_s + 5.0 <= kubernetes_grace_s  # room to close ports and exit after it
    assert (
        load_node_config(env={"LLMLB_HOME": str(tmp_path), "XLLM_DRAIN_TIMEOUT": "100"}).drain_timeout_s
        == 100
    )


def test_the_admin_key_setting_is_held_as_a_secret_and_a_malformed_one_is_refused_unshown(
    tmp_path: Path,
) -> None:
    good = "llmlb-" + "a1B2_-" * 6
    cfg = load_balancer_config(env={"LLMLB_HOME": str(tmp_path), "LLMLB_ADMIN_KEY": good})
    assert cfg.admin_key == Secret(good)
    assert good not in repr(cfg)
    assert load_balancer_config(env={"LLMLB_HOME": str(tmp_path)}).admin_key is None
    for bad in ("hunter2-not-a-key", "llmlb-short", "llmlb-" + "x" * 31, "llmlb-" + "é" * 40, " " + good):
        with pytest.raises(ValueError) as info:
            load_balancer_config(env={"LLMLB_HOME": str(tmp_path), "LLMLB_ADMIN_KEY": bad})
        message = str(info.value)
        assert message.startswith("LLMLB_ADMIN_KEY is malformed") and "\n" not in message
        assert bad.strip() not in message
