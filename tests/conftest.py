"""Fixtures for every level: the fake Hugging Face hub, PostgreSQL and hermetic environment variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devkit.fake_hub import FakeHub

pytest_plugins = ("tests.fixtures.fake_hub", "tests.fixtures.models", "tests.fixtures.postgres")


def hermetic(env: pytest.MonkeyPatch, home: Path) -> None:
    """Environment variables that keep the processes a test starts off the real hub, the developer's own
    tokens and state, and the fixed default ports; for module-scoped fixtures, which start before (and
    outside) the per-test environment below."""
    for name in list(os.environ):
        if name.startswith(("LLMLB_", "XLLM_", "HF_", "HUGGING_FACE")) or name == "LLM_MODELS_DIR":
            env.delenv(name, raising=False)
    env.setenv("HOME", str(home))
    env.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: never the real hub
    # Many balancers and nodes run on this one host at once: their bulk ports are any free ones, not
    # the fixed defaults (a test of the defaults sets these itself). A fixed port can also be taken as
    # the local port of one of this host's outgoing connections.
    env.setenv("LLMLB_BULK_PORT", "0")
    env.setenv("XLLM_BULK_PORT", "0")


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # No test may reach a real hub or read the developer's own tokens and state. These variables
    # reach the processes tests start; in-process huggingface_hub use needs `fake_hub_env` too.
    hermetic(monkeypatch, tmp_path_factory.mktemp("home"))


@pytest.fixture
def hub(fake_hub: FakeHub) -> FakeHub:
    """A started fake hub on 127.0.0.1 (the short name integration tests use)."""
    return fake_hub
