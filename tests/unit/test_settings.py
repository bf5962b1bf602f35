"""The settings schemas: precedence, one-line errors with exit status 2 from both programs, generated
help and docs, and the node's pool settings shown by ``xllm config``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import BalancerSchema, ClientSchema, NodeSchema, load_balancer_config, load_node_config
from common.settings import rows
from common.settings_docs import PAGE, render

ROOT = Path(__file__).resolve().parents[2]


def run(
    program: str, *args: str, home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """One command of ``program`` (balancer.cli or node.cli) as its own process, with only ``env`` set
    among the suite's settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLMLB_", "XLLM_", "HF_"))}
    return subprocess.run(
        [sys.executable, "-m", program, *args],
        cwd=ROOT,
        env={**clean, "LLMLB_HOME": str(home), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_flag_beats_the_environment_beats_the_env_file_beats_the_default(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("XLLM_SLOTS_PER_MODEL=3\nLLMLB_QUEUE_SIZE=7\nXLLM_MAX_DOWNLOADS=2\n")
    home = {"LLMLB_HOME": str(tmp_path)}
    assert load_node_config(env=home).pool.slots_per_model == 3  # the file over the default
    assert load_node_config(env={**home, "XLLM_SLOTS_PER_MODEL": "5"}).pool.slots_per_model == 5
    assert load_balancer_config(env=home).queue_size == 7
    assert load_node_config(env={**home, "XLLM_MAX_DOWNLOADS": "4"}, max_downloads=6).max_downloads == 6
    assert load_node_config(env={"LLMLB_HOME": str(tmp_path / "empty")}).pool.slots_per_model == 4


def test_an_older_name_in_the_environment_beats_the_current_name_in_the_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("XLLM_BALANCER=127.0.0.1:1\n")
    env = {"LLMLB_HOME": str(tmp_path), "LLMLB_ADDR": "127.0.0.1:2", "XLLM_BALANCER": ""}
    assert load_node_config(env=env).balancer == "127.0.0.1:2"  # an empty variable counts as unset


def test_the_memory_budget_flag_reaches_the_pool(tmp_path: Path) -> None:
    cfg = load_node_config(
        env={"LLMLB_HOME": str(tmp_path), "XLLM_MEMORY_BUDGET_MB": "100"}, memory_budget_mb=200
    )
    assert cfg.memory_budget_mb == cfg.pool.memory_budget_mb == 200


@pytest.mark.parametrize(
    ("program", "args", "env", "line"),
    [
        (
            "node.cli",
            ["pull", "some-model"],
            {"XLLM_SLOTS_PER_MODEL": "0"},
            "XLLM_SLOTS_PER_MODEL='0': expected",
        ),
        (
            "balancer.cli",
            ["nodes", "list"],
            {"LLMLB_ADDR": "nope"},
            "LLMLB_ADDR='nope': 'nope' is not host:port",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_it_and_exit_status_2(
    tmp_path: Path, program: str, args: list[str], env: dict[str, str], line: str
) -> None:
    done = run(program, *args, home=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and line in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize(
    ("program", "args", "env", "line"),
    [
        (
            "node.cli",
            ["config"],
            {"XLLM_LABELS": "zone"},
            "XLLM_LABELS='zone': label 'zone' is not key=value",
        ),
        (
            "node.cli",
            ["models"],
            {"XLLM_ALLOWED_ORIGINS": "ftp://x"},
            "XLLM_ALLOWED_ORIGINS='ftp://x': origin",
        ),
        ("node.cli", ["serve", "--backend", "gpu"], {}, "--backend='gpu': expected auto, cuda, metal or cpu"),
        ("node.cli", ["config"], {"XLLM_BATCHING": "yes"}, "XLLM_BATCHING='yes': expected a whole number"),
        (
            "balancer.cli",
            ["config"],
            {"LLMLB_QUEUE_TIMEOUT": "-1"},
            "LLMLB_QUEUE_TIMEOUT='-1': expected a positive",
        ),
        (
            "balancer.cli",
            ["serve"],
            {"LLMLB_GRPC_LISTEN": "nope"},
            "LLMLB_GRPC_LISTEN='nope': expected host:port",
        ),
        ("balancer.cli", ["serve", "--workers", "x"], {}, "--workers='x': expected a whole number"),
        ("balancer.cli", ["serve", "--log-level", "loud"], {}, "--log-level='loud': expected debug, info"),
        (
            "node.cli",
            ["config"],
            {"XLLM_SLOTS_PER_MODEL": "abc"},
            "XLLM_SLOTS_PER_MODEL='abc': expected a whole",
        ),
        (
            "node.cli",
            ["config", "--balancer", "127.0.0.1:1,,127.0.0.1:2"],
            {},
            "--balancer='127.0.0.1:1,,127.0.0.1:2': an empty entry",
        ),
        ("balancer.cli", ["config"], {"LLMLB_AUTH": "maybe"}, "LLMLB_AUTH='maybe': expected true/false"),
    ],
)
def test_more_bad_values_the_same_way_in_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    program: str,
    args: list[str],
    env: dict[str, str],
    line: str,
) -> None:
    from balancer.cli.main import main as llmlb
    from node.cli import main as xllm

    for name in [k for k in os.environ if k.startswith(("LLMLB_", "XLLM_", "HF_"))]:
        monkeypatch.delenv(name)
    for name, value in {**env, "LLMLB_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    assert (xllm if program == "node.cli" else llmlb)(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and line in err, err


def test_a_secret_in_a_bad_value_is_not_repeated(tmp_path: Path) -> None:
    done = run("balancer.cli", "config", home=tmp_path, env={"LLMLB_ADMIN_KEY": "not-a-key-hunter2"})
    assert done.returncode == 2 and "LLMLB_ADMIN_KEY" in done.stderr
    assert "hunter2" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_xllm_config_shows_the_pool_settings(tmp_path: Path) -> None:
    done = run(
        "node.cli",
        "config",
        "--json",
        home=tmp_path,
        env={"XLLM_SLOTS_PER_MODEL": "2", "XLLM_GPU_LAYERS": "9"},
    )
    assert done.returncode == 0, done.stderr
    pool = json.loads(done.stdout)["pool"]
    assert (pool["slots_per_model"], pool["gpu_layers"], pool["queue_per_model"]) == (2, 9, 64)


def test_llmlb_config_shows_the_balancer_settings_with_secrets_masked(tmp_path: Path) -> None:
    env = {"LLMLB_DATABASE_URL": "postgresql+asyncpg://u:hunter2@db/x", "HF_TOKEN": "hf_hunter2"}
    done = run("balancer.cli", "config", "--json", "--grpc-listen", ":7", home=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["grpc_listen"], shown["hf_token"], shown["bulk_listen"]) == (
        "0.0.0.0:7",
        "set",
        "0.0.0.0:50052",
    )
    assert "hunter2" not in done.stdout


@pytest.mark.parametrize("schema", [BalancerSchema, NodeSchema, ClientSchema])
def test_every_setting_has_a_description_and_every_variable_one_home(schema: type[BalancerSchema]) -> None:
    names = [name for row in rows(schema) for name in row.env]
    assert len(names) == len(set(names))
    assert all(row.help for row in rows(schema))


def test_the_help_names_every_variable_and_every_flags_default(capsys: pytest.CaptureFixture[str]) -> None:
    from balancer.cli.main import main as llmlb
    from node.cli import main as xllm

    for main, argv, schema in ((llmlb, ["serve", "--help"], BalancerSchema), (xllm, ["--help"], NodeSchema)):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert [name for row in rows(schema) for name in row.env if name not in text] == []
        assert [row.flag for row in rows(schema) if row.flag and row.flag not in text] == []


def test_the_configuration_page_is_what_the_schemas_generate() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert page.count("<!-- settings:") == 3
    assert render(page) == page, "docs/configuration.md is out of date: run python -m common.settings_docs"
