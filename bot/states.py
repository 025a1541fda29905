"""A call's lifecycle: statuses only move forward, and a terminal status is final.

Pilot's statuses (API.md §5.2) plus ours: PENDING (stored, `POST /v1/calls` not answered
yet), NOT_STARTED (the API refused, or the attempt never reached it) and LOST (its end is unknown).
"""

from __future__ import annotations

PENDING = "PENDING"
NOT_STARTED = "NOT_STARTED"
UNKNOWN_OUTCOME = "UNKNOWN"  # the POST may have reached the API but we never learnt its answer
# Started, but its end will never be learnt: Pilot Status no longer knows it (404 CALL_NOT_FOUND,
# confirmed), or it was not seen ending within CALL_POLL_TIMEOUT. `error_code` says which.
LOST = "LOST"
TERMINAL = frozenset({"REJECTED", "COMPLETED", "FAILED", "MISSED", NOT_STARTED, LOST})
_RANK = {PENDING: 0, UNKNOWN_OUTCOME: 1, "INITIATED": 2, "RINGING": 3, "ACCEPTED": 4}


def rank(status: str) -> int:
    return 5 if status in TERMINAL else _RANK.get(status, 0)


def advances(current: str, new: str) -> bool:
    """Whether `new` may replace `current` (an `ended` is never undone by a late `ringing`)."""
    if current in TERMINAL:
        return False
    return rank(new) > rank(current)


def is_terminal(status: str) -> bool:
    return status in TERMINAL
