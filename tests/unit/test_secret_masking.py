"""Secrets stay out of printed objects and log lines: the ``Secret`` type, URL masking, both log formats."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from pydantic import BaseModel, SecretStr

from common.config import load_node_config
from common.logs import configure_logging, mask_text
from common.secret import Secret, masked_url

KEY = "llmlb_sk_4f9c0e7d2b1a8c3e5f6a7b8c9d0e1f2a"


def test_a_secret_prints_masked_wherever_it_is_held() -> None:
    @dataclass
    class Holder:
        token: Secret

    secret = Secret(KEY)
    for shown in (repr(secret), str(secret), f"{secret}", repr(Holder(secret)), repr([secret])):
        assert KEY not in shown and "*" in shown
    assert secret.reveal() == KEY
    assert secret.matches(KEY) and not secret.matches("guess") and not secret.matches(None)
    assert not Secret().matches("") and not Secret()
    assert secret == Secret(KEY) and secret != Secret("other")


def test_a_secret_is_pydantics_secret_str_and_validates_and_dumps_masked() -> None:
    class Holder(BaseModel):
        token: Secret | None = None

    held = Holder.model_validate({"token": KEY})
    assert isinstance(held.token, Secret) and isinstance(held.token, SecretStr)
    assert held.token.reveal() == KEY == held.token.get_secret_value()
    assert KEY not in repr(held) and KEY not in held.model_dump_json()
    assert held.token == SecretStr(KEY) and held.token != SecretStr("other")
    assert {held.token, SecretStr(KEY)} == {SecretStr(KEY)}  # equal values hash alike


def test_a_node_config_prints_without_its_tokens(tmp_path: Path) -> None:
    env = {"XLLM_API_KEY": KEY, "XLLM_AUTH_TOKEN": KEY + "own", "HF_TOKEN": KEY + "hf"}
    config = load_node_config(models_dir=tmp_path, home=tmp_path, env=env)
    assert KEY not in repr(config)
    assert config.api_key.reveal() == KEY and config.hf_token is not None


def test_a_url_password_is_masked_and_the_rest_kept() -> None:
    url = f"postgresql+asyncpg://llmlb:{KEY}@db.internal:5432/llmlb"
    assert masked_url(url) == "postgresql+asyncpg://llmlb:***@db.internal:5432/llmlb"
    assert masked_url("sqlite+aiosqlite:////var/lib/llmlb.db") == "sqlite+aiosqlite:////var/lib/llmlb.db"
    assert KEY not in mask_text(f"cannot reach {url}: refused")
    assert KEY not in mask_text(f"headers {{'authorization': 'Bearer {KEY}'}}")
    assert (
        mask_text("send 'Authorization: Bearer <fleet token>'")
        == "send 'Authorization: Bearer <fleet token>'"
    )


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**saved)


def _fail_holding_a_key() -> None:
    node_key = KEY  # a local variable, as the bulk server's request parsing holds the header
    raise ValueError(f"a fault unrelated to the key of length {len(node_key)}")


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_no_log_line_carries_a_key_in_either_format(
    fmt: str, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(fmt, "debug")
    # The standard library's path: how asyncio reports an unhandled error in a connection callback.
    try:
        _fail_holding_a_key()
    except ValueError:
        logging.getLogger("asyncio").error("Unhandled exception in client_connected_cb", exc_info=True)
    # structlog's own path.
    log = structlog.get_logger("test")
    try:
        _fail_holding_a_key()
    except ValueError:
        log.exception("bulk_failed")
    log.info("call", authorization=f"Bearer {KEY}", database=f"postgresql://u:{KEY}@h/db")
    log.warning(f"refused a call with Bearer {KEY}")
    logging.getLogger("uvicorn").info("header authorization: Bearer %s", KEY)

    out = capsys.readouterr().err
    assert KEY not in out
    assert out.count("ValueError") >= 2  # the tracebacks are there, only without values
    assert "_fail_holding_a_key" in out
    if fmt == "json":
        assert all(json.loads(line) for line in out.splitlines() if line.startswith("{"))
