"""``xllm``'s command line: no command serves, and node options work before the command too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli import _parser, main


def shown(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_plain_xllm_serves_with_the_options_given(tmp_path: Path) -> None:
    args = _parser().parse_args(["--models-dir", str(tmp_path / "m"), "--grpc-listen", "127.0.0.1:5"])
    assert args.command is None  # main() runs `serve` then
    assert (args.models_dir, args.grpc_listen) == (tmp_path / "m", "127.0.0.1:5")


def test_node_options_work_before_and_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    custom = tmp_path / "custom" / "path" / "models"
    before = shown(capsys, "--home", str(tmp_path), "--models-dir", str(custom), "config", "--json")
    after = shown(capsys, "config", "--home", str(tmp_path), "--models-dir", str(custom), "--json")
    assert before["models_dir"] == after["models_dir"] == str(custom)
    both = shown(
        capsys, "--models-dir", "/a", "config", "--home", str(tmp_path), "--models-dir", "/b", "--json"
    )
    assert both["models_dir"] == "/b"  # the command's own option wins
    assert _parser().parse_args(["--no-peer-fetch", "serve"]).peer_fetch is False
    assert _parser().parse_args(["serve"]).peer_fetch is None


def test_the_top_level_help_lists_the_node_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--models-dir" in out and "--grpc-listen" in out and "serve" in out
