"""``llmlb keys create|update|list`` with limits, as real processes against a real balancer."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.integration.conftest import BalancerProcess, llmlb

pytestmark = pytest.mark.slow


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_keys_get_limits_on_create_change_and_clear_them_on_update_and_list_them(
    balancer: BalancerProcess,
) -> None:
    at = ("--balancer", balancer.address)
    home = balancer.home
    flags = ("--rpm", "60", "--tpm", "1000", "--max-parallel", "2", "--daily-tokens", "5000")
    made = as_json(
        llmlb(
            "keys",
            "create",
            "--name",
            "app",
            "--scope",
            "api",
            *flags,
            "--monthly-tokens",
            "90000",
            "--models",
            "Gemma-3-270m, whisper-base",
            "--json",
            *at,
            home=home,
        )
    )
    key = made["key"]
    assert key["limits"] == {
        "rpm": "60",  # int64 fields are strings in protobuf's JSON
        "tpm": "1000",
        "max_parallel": "2",
        "daily_tokens": "5000",
        "monthly_tokens": "90000",
        "models": ["gemma-3-270m", "whisper-base"],
    }

    # Only the limits named change; 0 clears one, and --models '' lets the key use every model.
    changed = as_json(
        llmlb(
            "keys", "update", key["id"], "--rpm", "0", "--tpm", "50", "--models", "", "--json", *at, home=home
        )
    )
    assert changed["limits"] == {
        "tpm": "50",
        "max_parallel": "2",
        "daily_tokens": "5000",
        "monthly_tokens": "90000",
    }
    human = llmlb("keys", "update", key["prefix"], "--max-parallel", "0", *at, home=home)
    assert human.returncode == 0, human.stderr
    assert (
        human.stdout.strip()
        == f"key {key['id']} (app) limits: tpm 50, daily-tokens 5000, monthly-tokens 90000"
    )

    table = llmlb("keys", "list", *at, home=home).stdout.splitlines()
    assert table[0].split()[:6] == ["KEY", "NAME", "PREFIX", "SCOPES", "NODE", "LIMITS"]
    row = next(line for line in table if line.startswith(key["id"]))
    assert "tpm 50, daily-tokens 5000, monthly-tokens 90000" in row
    admin_row = next(line for line in table[1:] if " admin " in line)
    assert " - " in admin_row  # no limits

    nothing = llmlb("keys", "update", key["id"], *at, home=home)
    assert nothing.returncode == 2 and "--rpm" in nothing.stdout
    missing = llmlb("keys", "update", "key-nosuchkey", "--rpm", "1", *at, home=home)
    assert missing.returncode == 1 and "key_not_found" in missing.stderr
    negative = llmlb("keys", "update", key["id"], "--rpm", "-1", *at, home=home)
    assert negative.returncode == 1 and "invalid_request" in negative.stderr
