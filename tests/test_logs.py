"""LOG_FORMAT=json: every line `python -m bot` logs is one JSON object naming its replica."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import sys
from datetime import datetime, timedelta
from pathlib import Path

from tests.conftest import API_KEY, OPERATOR, TOKEN
from tests.fakes.pilot_status import FakePilotStatus
from tests.fakes.telegram import FakeTelegram

ROOT = Path(__file__).resolve().parent.parent
PHONE = "+5511999999999"
NOTE = "boiler room 7781 flooding"
KEYS = {"time", "level", "logger", "message", "instance"}


async def test_json_logs_of_a_real_run_name_the_replica_and_hide_secrets(
    tmp_path: Path, telegram: FakeTelegram, pilot: FakePilotStatus
) -> None:
    (tmp_path / ".env").write_text(
        f"BOT_TOKEN={TOKEN}\n"
        f"TELEGRAM_API_URL={telegram.url}\n"
        f"PILOT_STATUS_API_KEY={API_KEY}\n"
        f"PILOT_STATUS_BASE_URL={pilot.url}\n"
        f"OPERATOR_IDS={OPERATOR}\n"
        "WEB_PORT=0\n"
        "LOG_LEVEL=DEBUG\n"
        "LOG_FORMAT=json\n"
        "INSTANCE_NAME=replica-a\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        mark = telegram.mark()
        telegram.send_command(f"/call {PHONE} {NOTE}", user_id=OPERATOR)
        reply = await telegram.wait_for_message(chat_id=OPERATOR, after=mark, timeout=15)
        assert "Call to" in reply.plain
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0

    lines = (stdout + stderr).decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert records
    for record in records:
        assert KEYS <= record.keys() <= KEYS | {"exc_info", "stack_info"}, record
        assert record["instance"] == "replica-a"
        assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0)
    assert any(
        r["message"].startswith("callbot started as @") and r["level"] == "INFO" for r in records
    )
    assert any(r["level"] == "DEBUG" for r in records)  # the run logged more than start-up
    for line in lines:
        assert TOKEN not in line and API_KEY not in line and TOKEN.split(":")[1] not in line
        assert "5511999999999" not in line and "99999-9999" not in line
        assert NOTE not in line


def test_a_traceback_stays_inside_one_json_line() -> None:
    from bot.ops.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("replica-b"))
    logger = logging.getLogger("callbot.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            logger.exception("step %s failed", 3)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "step 3 failed"
    assert record["level"] == "ERROR" and record["logger"] == "callbot.test_logs"
    assert record["instance"] == "replica-b"
    assert record["exc_info"].startswith("Traceback (most recent call last):")
    assert record["exc_info"].endswith("RuntimeError: boom\nsecond line")
