"""Where the 🎧 Talk button of a live call's message opens the Mini App.

Telegram allows `web_app` buttons only in private chats. There the button opens
PUBLIC_BASE_URL/app/?call=<id> as a Mini App. In groups it is a plain link to the bot's Mini
App registered with BotFather, `https://t.me/<bot>/<MINIAPP_SHORT_NAME>?startapp=<id>`: the
client opens it as a Mini App too, and the call's id comes back in initData's `start_param`
(signed by Telegram). Without MINIAPP_SHORT_NAME a group's call has no Talk button.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiogram.types import InlineKeyboardButton, WebAppInfo

from bot.storage.store import CallRecord


@dataclass
class TalkLinks:
    base_url: str  # PUBLIC_BASE_URL, https
    short_name: str | None = None  # MINIAPP_SHORT_NAME
    bot_username: str | None = None  # known once the bot asked Telegram who it is (getMe)

    def page(self, record: CallRecord) -> str:
        return f"{self.base_url.rstrip('/')}/app/?call={record.id}"

    def available(self, *, private: bool) -> bool:
        return private or (self.short_name is not None and self.bot_username is not None)

    def button(self, record: CallRecord, text: str) -> InlineKeyboardButton | None:
        if record.chat_id == record.operator_id:  # a private chat's id is its user's
            return InlineKeyboardButton(text=text, web_app=WebAppInfo(url=self.page(record)))
        if not self.available(private=False):
            return None
        link = f"https://t.me/{self.bot_username}/{self.short_name}?startapp={record.id}"
        return InlineKeyboardButton(text=text, url=link)
