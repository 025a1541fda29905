"""Who may place calls, and where."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bot.errors import CallbotError


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"


@dataclass(frozen=True)
class AccessPolicy:
    operator_ids: frozenset[int]
    admin_ids: frozenset[int]
    # Empty: any chat an operator is in. Private chats with an operator are always allowed.
    allowed_chat_ids: frozenset[int] = frozenset()

    def role(self, user_id: int | None) -> Role | None:
        if user_id in self.admin_ids:
            return Role.ADMIN
        if user_id in self.operator_ids:
            return Role.OPERATOR
        return None

    def require_caller(self, user_id: int | None, chat_id: int) -> Role:
        """The caller's role, or CallbotError saying why this user may not call from this chat."""
        role = self.role(user_id)
        if role is None:
            raise CallbotError("not_operator")
        private = chat_id == user_id
        if self.allowed_chat_ids and not private and chat_id not in self.allowed_chat_ids:
            raise CallbotError("chat_not_allowed")
        return role
