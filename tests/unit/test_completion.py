"""Shell completion: each command line prints a bash script that really completes its commands, flags
and path values (run in bash, as a shell would call it on <TAB>)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from balancer.cli.main import main as llmlb_main
from node.cli import main as xllm_main

Main = Callable[[Sequence[str] | None], int]


def script(main: Main, shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["--print-completion", shell])
    assert exited.value.code in (0, None)
    return capsys.readouterr().out


def complete(script_path: Path, prog: str, words: list[str], cwd: Path) -> list[str]:
    """What bash offers for the last word of ``prog words...``."""
    line = " ".join([prog, *words])
    quoted = " ".join(f"'{w}'" for w in [prog, *words])
    probe = (
        f"source '{script_path}'; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
        f"COMP_LINE='{line}'; COMP_POINT={len(line)}; _shtab_{prog}; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run(
        [bash, "-c", probe], capture_output=True, text=True, cwd=cwd, check=True, timeout=30
    )
    return [w.strip() for w in done.stdout.splitlines() if w.strip()]


def test_llmlb_completes_its_commands_actions_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "llmlb.bash"
    path.write_text(script(llmlb_main, "bash", capsys))
    assert complete(path, "llmlb", ["mo"], tmp_path) == ["models"]
    assert "pull" in complete(path, "llmlb", ["models", "p"], tmp_path)
    assert "undrain" in complete(path, "llmlb", ["nodes", "u"], tmp_path)
    assert "--catalog" in complete(path, "llmlb", ["serve", "--cat"], tmp_path)


def test_xllm_completes_flags_and_a_directory_for_models_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "xllm.bash"
    path.write_text(script(xllm_main, "bash", capsys))
    (tmp_path / "weights-here").mkdir()
    (tmp_path / "weights-file").write_text("")
    assert complete(path, "xllm", ["--models-d"], tmp_path) == ["--models-dir"]
    offered = complete(path, "xllm", ["--models-dir", "weights-"], tmp_path)
    assert any(o.startswith("weights-here") for o in offered)
    assert not any(o.startswith("weights-file") for o in offered)  # a directory setting offers directories


@pytest.mark.parametrize("main", [llmlb_main, xllm_main])
def test_zsh_scripts_are_printed_too(main: Main, capsys: pytest.CaptureFixture[str]) -> None:
    assert script(main, "zsh", capsys).startswith("#compdef")
