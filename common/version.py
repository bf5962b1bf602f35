"""What ``llmlb --version`` and ``xllm --version`` print: the installed package's version, and the git
commit when the code runs from a checkout."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PACKAGE = "llmlb"
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def git_commit(root: Path = _SOURCE_ROOT) -> str:
    """The checkout's short commit, "" when the code is not in one (an installed wheel) or git is absent."""
    if not (root / ".git").exists():
        return ""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def version_text(prog: str) -> str:
    """``llmlb 0.1.0`` or, from a checkout, ``llmlb 0.1.0 (commit 994aab1)``."""
    commit = git_commit()
    return f"{prog} {package_version()}" + (f" (commit {commit})" if commit else "")


class VersionAction(argparse.Action):
    """``--version``: prints the version and exits 0; the version is looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(version_text(parser.prog))
        parser.exit()
