"""A real browser for the Mini App's tests: Debian's headless Chromium driven by Playwright
(PyPI `playwright`, the same Node driver as npm's playwright-core; no browser is downloaded,
`executable_path` is /usr/bin/chromium), with a fake microphone playing a WAV file.

Where chromium is missing the tests skip, unless CALLBOT_REQUIRE_BROWSER=1 (CI), which makes
that a failure. Nothing leaves the machine: every request to a host other than 127.0.0.1 is
refused, and Telegram's script (telegram-web-app.js) is replaced by a stand-in that exposes
`Telegram.WebApp` with the given initData, theme and platform, as a Telegram client would.

Usage::

    async with chromium(tone_wav(tmp_path / "mic.wav")) as browser:
        page = await open_miniapp(browser, url, init_data=..., theme=DARK)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

TELEGRAM_SCRIPT = "https://telegram.org/js/telegram-web-app.js"
# themeParams as Telegram's clients send them (the default light and night themes)
LIGHT = {
    "bg_color": "#ffffff",
    "text_color": "#000000",
    "hint_color": "#707579",
    "secondary_bg_color": "#f1f1f4",
    "button_color": "#3390ec",
    "button_text_color": "#ffffff",
    "destructive_text_color": "#e53935",
}
DARK = {
    "bg_color": "#212121",
    "text_color": "#ffffff",
    "hint_color": "#aaaaaa",
    "secondary_bg_color": "#181818",
    "button_color": "#8774e1",
    "button_text_color": "#ffffff",
    "destructive_text_color": "#ff595a",
}


def chromium_path() -> str:
    """Debian's chromium, or the test is skipped (failed under CALLBOT_REQUIRE_BROWSER=1)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "chromium is not installed (sh scripts/install-test-peers.sh)"
        if os.environ.get("CALLBOT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (CALLBOT_REQUIRE_BROWSER=1)", pytrace=False)
        pytest.skip(reason)
    return path


def tone_wav(
    path: Path, *, frequency: float = 440.0, seconds: float = 5.0, rate: int = 48_000
) -> Path:
    """A WAV of a steady tone for the fake microphone (Chromium loops it)."""
    frames = bytearray()
    for n in range(int(seconds * rate)):
        frames += struct.pack("<h", int(0.5 * 32767 * math.sin(2 * math.pi * frequency * n / rate)))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    return path


@asynccontextmanager
async def chromium(
    microphone: Path | None = None, *, allow_microphone: bool = True
) -> AsyncIterator[Any]:
    """A headless Chromium whose microphone plays `microphone` (silence when None), with
    autoplay allowed; the microphone permission is granted, or with `allow_microphone=False`
    denied as a user who pressed "Block" would."""
    from playwright.async_api import async_playwright

    executable = chromium_path()
    args = [
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        "--no-sandbox",  # CI runs as root
    ]
    if allow_microphone:
        args.append("--use-fake-ui-for-media-stream")
    if microphone is not None:
        args.append(f"--use-file-for-fake-audio-capture={microphone}")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=args)
        try:
            yield browser
        finally:
            await browser.close()


def telegram_stub(init_data: str, *, theme: dict[str, str], scheme: str, platform: str) -> str:
    """telegram-web-app.js as far as the Mini App uses it."""
    fields = dict(parse_qsl(init_data))
    unsafe: dict[str, Any] = {k: v for k, v in fields.items() if k != "user"}
    if "user" in fields:
        unsafe["user"] = json.loads(fields["user"])
    web_app = {
        "initData": init_data,
        "initDataUnsafe": unsafe,
        "themeParams": theme,
        "colorScheme": scheme,
        "platform": platform,
        "version": "8.0",
    }
    return (
        "window.Telegram = {WebApp: Object.assign(" + json.dumps(web_app) + ", {"
        "ready() {}, expand() {}, close() { window.closedByApp = true; },"
        "disableVerticalSwipes() {}, onEvent() {}, offEvent() {}})};"
    )


async def open_miniapp(
    browser: Any,
    url: str,
    *,
    init_data: str,
    theme: dict[str, str] = LIGHT,
    platform: str = "android",
    viewport: tuple[int, int] = (390, 360),
) -> Any:
    """A page at `url` as a Telegram client opens a Mini App (loopback only)."""
    context = await browser.new_context(
        viewport={"width": viewport[0], "height": viewport[1]}, device_scale_factor=2
    )
    stub = telegram_stub(
        init_data, theme=theme, scheme="dark" if theme is DARK else "light", platform=platform
    )

    async def route(request_route: Any) -> None:
        request = request_route.request
        if request.url == TELEGRAM_SCRIPT:
            await request_route.fulfill(body=stub, content_type="application/javascript")
        elif urlsplit(request.url).hostname in ("127.0.0.1", "localhost"):
            await request_route.continue_()
        else:
            await request_route.abort()

    await context.route("**/*", route)
    page = await context.new_page()
    page.on("pageerror", lambda error: print("page error:", error))
    await page.goto(url)
    return page
