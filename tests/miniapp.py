"""Telegram Mini App initData as a Telegram client makes it (signed with the bot token), for
tests of the softphone's web API and of its pages in a browser."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from urllib.parse import urlencode


def init_data(
    bot_token: str,
    user_id: int,
    *,
    auth_date: float | None = None,
    language_code: str = "en",
    start_param: str | None = None,
    forge: bool = False,
) -> str:
    """initData for `user_id`, signed as Telegram does (core.telegram.org/bots/webapps);
    `forge` signs it with another token."""
    fields = {
        "auth_date": str(int(time.time() if auth_date is None else auth_date)),
        "query_id": "AAF-test",
        "user": json.dumps(
            {"id": user_id, "first_name": "Operator", "language_code": language_code},
            separators=(",", ":"),
        ),
    }
    if start_param is not None:
        fields["start_param"] = start_param
    check = "\n".join(f"{k}={v}" for k, v in sorted(fields.items()))
    token = bot_token + ("x" if forge else "")
    secret = hmac.new(b"WebAppData", token.encode(), hashlib.sha256).digest()
    fields["hash"] = hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()
    return urlencode(fields)
