"""aiogram's gettext i18n; catalogues live in bot/locales (compile with pybabel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiogram.types import TelegramObject, User
from aiogram.utils.i18n import I18n, I18nMiddleware

LOCALES_DIR = Path(__file__).parent / "locales"
LOCALES = ("en", "pt_BR")


def build_i18n(default_locale: str = "en") -> I18n:
    return I18n(path=LOCALES_DIR, default_locale=default_locale, domain="messages")


def pick_locale(language_code: str | None, default: str) -> str:
    """Telegram's language_code → our locale: pt* → pt_BR, en* → en, anything else → default."""
    code = (language_code or "").lower()
    if code.startswith("pt"):
        return "pt_BR"
    if code.startswith("en"):
        return "en"
    return default


class LocaleMiddleware(I18nMiddleware):
    async def get_locale(self, event: TelegramObject, data: dict[str, Any]) -> str:
        user: User | None = data.get("event_from_user")
        return pick_locale(user.language_code if user else None, self.i18n.default_locale)
