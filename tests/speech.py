"""Speech tests need espeak-ng: they skip where it is missing, except in CI
(`CALLBOT_REQUIRE_SPEECH=1`), where that is a failure."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        reason = "espeak-ng is not installed (sh scripts/install-espeak-ng.sh)"
        if os.environ.get("CALLBOT_REQUIRE_SPEECH") == "1":
            pytest.fail(f"{reason} (CALLBOT_REQUIRE_SPEECH=1)", pytrace=False)
        pytest.skip(reason)
    return path
