"""Settings: a bad environment stops the start with a message naming each bad variable."""

import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import ConfigError, Settings, load_settings

TOKEN = "123456:" + "A" * 35
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env from the developer's checkout
    for name in (
        "BOT_TOKEN",
        "PILOT_STATUS_API_KEY",
        "PILOT_STATUS_API_KEY_ID",
        "OPERATOR_IDS",
        "ADMIN_IDS",
        "ALLOWED_CHAT_IDS",
        "DEFAULT_REGION",
        "DEFAULT_LOCALE",
        "PILOT_STATUS_NUMBER_TYPE",
        "TELEGRAM_API_URL",
        "PILOT_STATUS_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


def test_ids_are_read_from_comma_or_space_separated_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_TOKEN", TOKEN)
    monkeypatch.setenv("PILOT_STATUS_API_KEY", "ps_" + "b" * 48)
    monkeypatch.setenv("OPERATOR_IDS", "11, 22 33")
    monkeypatch.setenv("ADMIN_IDS", "44")
    monkeypatch.setenv("ALLOWED_CHAT_IDS", "-100123")
    monkeypatch.setenv("DEFAULT_LOCALE", "pt-BR")
    settings = load_settings()
    assert settings.operator_ids == {11, 22, 33}
    assert settings.caller_ids == {11, 22, 33, 44}
    assert settings.allowed_chat_ids == {-100123}
    assert settings.default_locale == "pt_BR"
    assert settings.pilot_status_number_type == "auto"
    assert str(settings.pilot_status_base_url) == "https://pilotstatus.com.br/"


def test_every_bad_variable_is_named_and_no_secret_is_echoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BOT_TOKEN", "not-a-token-SECRET")
    monkeypatch.setenv("OPERATOR_IDS", "12,abc")
    monkeypatch.setenv("PILOT_STATUS_NUMBER_TYPE", "sip")
    monkeypatch.setenv("DEFAULT_REGION", "ZZ")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    for name in ("BOT_TOKEN", "OPERATOR_IDS", "PILOT_STATUS_NUMBER_TYPE", "DEFAULT_REGION"):
        assert name in message
    assert "SECRET" not in message


def test_missing_key_and_operators_are_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_TOKEN", TOKEN)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "PILOT_STATUS_API_KEY" in str(caught.value)


def test_python_m_bot_exits_with_the_message(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "BOT_TOKEN": "nope"}
    done = subprocess.run(
        [sys.executable, "-m", "bot"],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "BOT_TOKEN" in done.stderr
    assert "PILOT_STATUS_API_KEY" in done.stderr
    assert "Traceback" not in done.stderr


def test_env_example_documents_every_setting() -> None:
    from bot.config import Settings

    example = (ROOT / ".env.example").read_text()
    names = {
        line.split("=", 1)[0] for line in example.splitlines() if "=" in line and line[0] != "#"
    }
    assert names == {name.upper() for name in Settings.model_fields}
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in names)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = (
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'"
        " && .venv/bin/python -m pytest"
    )
    assert command in readme and command in ci


def test_migrate_command_creates_the_schema(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "BOT_TOKEN": TOKEN,
        "PILOT_STATUS_API_KEY": "ps_" + "c" * 48,
        "OPERATOR_IDS": "1",
        "DATA_DIR": str(tmp_path / "data"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "bot", "migrate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "schema is up to date" in done.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "callbot.db") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert {"calls", "call_status", "audit", "permission_requests", "webhook_deliveries"} <= tables


def _webhook_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "_env_file": None,
        "bot_token": TOKEN,
        "pilot_status_api_key": "ps_" + "d" * 48,
        "operator_ids": "1",
    }
    return load_settings(**(base | overrides))


def test_webhook_mode_needs_an_https_url_and_a_secret_telegram_accepts() -> None:
    settings = _webhook_settings(
        telegram_webhook_url="https://bot.example.com/tg/hook",
        telegram_webhook_secret="s3cret_-X",
    )
    assert settings.webhook_mode
    assert settings.telegram_webhook_max_connections == 40
    assert not _webhook_settings().webhook_mode
    # plain http only on this machine (a local TLS terminator, tests)
    local = _webhook_settings(
        telegram_webhook_url="http://127.0.0.1:8080/hook", telegram_webhook_secret="x"
    )
    assert local.webhook_mode
    cases = {
        "TELEGRAM_WEBHOOK_URL": {
            "telegram_webhook_url": "http://bot.example.com/hook",
            "telegram_webhook_secret": "ok",
        },
        "TELEGRAM_WEBHOOK_SECRET": {"telegram_webhook_url": "https://bot.example.com/hook"},
        "TELEGRAM_WEBHOOK_MAX_CONNECTIONS": {"telegram_webhook_max_connections": 101},
    }
    for name, values in cases.items():
        with pytest.raises(ConfigError) as caught:
            _webhook_settings(**values)
        assert f"{name}:" in str(caught.value), caught.value
    with pytest.raises(ConfigError) as caught:
        _webhook_settings(
            telegram_webhook_url="https://bot.example.com/hook",
            telegram_webhook_secret="has space SECRET",
        )
    assert "TELEGRAM_WEBHOOK_SECRET" in str(caught.value)
    assert "SECRET" not in str(caught.value).replace("TELEGRAM_WEBHOOK_SECRET", "")
    with pytest.raises(ConfigError):
        _webhook_settings(telegram_webhook_max_connections=0)
