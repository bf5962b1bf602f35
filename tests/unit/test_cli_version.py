"""``llmlb --version`` and ``xllm --version``: the installed package's version, exit 0, nothing else."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("program", "module"), [("llmlb", "balancer.cli"), ("xllm", "node.cli")])
def test_version_prints_the_package_version_and_exits_0(program: str, module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    version = re.escape(importlib.metadata.version("llmlb"))
    # From a checkout the commit follows: ``llmlb 0.1.0 (commit 994aab1)``.
    assert re.fullmatch(rf"{program} {version}( \(commit [0-9a-f]{{7,}}\))?\n", done.stdout), done.stdout
