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


def loud_seconds(pcm: bytes, rate: int, threshold: float = 300.0) -> float:
    """Seconds of 20 ms windows whose RMS is above `threshold` (as the fake Meta edge counts)."""
    import array
    import math

    samples = array.array("h", pcm)
    size = rate // 50
    loud = 0
    for start in range(0, len(samples) - size + 1, size):
        window = samples[start : start + size]
        if math.sqrt(sum(s * s for s in window) / size) > threshold:
            loud += 1
    return loud * 0.02
