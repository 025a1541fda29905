"""The error catalogue and the translations: every code has text in English and pt-BR."""

from pathlib import Path

import pytest
from aiogram.utils.i18n import I18n
from babel.messages.extract import extract_from_file
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po

from bot import errors
from bot.errors import CallbotError, describe
from bot.i18n import LOCALES_DIR, build_i18n, pick_locale
from bot.phones import PhoneProblem
from bot.pilot_status.errors import status_error
from bot.texts import ERRORS, error_text

ROOT = Path(__file__).resolve().parent.parent
PO = LOCALES_DIR / "pt_BR" / "LC_MESSAGES" / "messages.po"


def source_msgids() -> set[str]:
    found = set()
    for path in [*ROOT.glob("bot/**/*.py"), *ROOT.glob("handlers/*.py")]:
        for _line, msgid, _comments, _ctx in extract_from_file(
            "python", str(path), keywords={"_": None, "__": None}
        ):
            found.add(msgid)
    return found


def test_every_string_the_bot_says_is_translated_to_pt_br() -> None:
    with PO.open("rb") as fp:
        catalog = read_po(fp)
    translated = {m.id for m in catalog if m.id and m.string and not m.fuzzy}
    assert source_msgids() - translated == set()


def test_compiled_catalogue_matches_the_po_file() -> None:
    with PO.open("rb") as fp:
        po = {m.id: m.string for m in read_po(fp) if m.id}
    with PO.with_suffix(".mo").open("rb") as fp:
        mo = {m.id: m.string for m in read_mo(fp) if m.id}
    assert mo == po, "run: pybabel compile -d bot/locales -D messages"


def all_codes() -> set[str]:
    codes = set(errors._BY_PILOT_CODE.values()) | set(errors._BY_META_CODE.values())
    codes |= set(errors._BY_STATUS.values()) | {p.value for p in PhoneProblem}
    return (
        codes
        | {"api_server_error", "api_bad_response", "api_timeout_maybe_sent"}
        | {
            "api_dropped",
            "api_unreachable",
            "api_unknown_code",
            "internal",
        }
    )


@pytest.fixture(scope="module")
def i18n() -> I18n:
    return build_i18n()


@pytest.mark.parametrize("code", sorted(all_codes()))
def test_every_code_has_distinct_english_and_portuguese_text(code: str, i18n: I18n) -> None:
    assert code in ERRORS
    texts = {}
    for locale in ("en", "pt_BR"):
        with i18n.context(), i18n.use_locale(locale):
            texts[locale] = error_text(CallbotError(code, {"status": "400", "text": "x"}))
    assert texts["en"] and texts["pt_BR"]
    assert texts["en"] != texts["pt_BR"]
    assert "{" not in texts["en"] and "{" not in texts["pt_BR"]


def test_unknown_api_code_shows_code_and_message_escaped(i18n: I18n) -> None:
    error = status_error(418, {"error": "<b>teapot</b> & co", "code": "NEW_<CODE>"})
    with i18n.context(), i18n.use_locale("en"):
        text = error_text(describe(error))
    assert "NEW_&lt;CODE&gt;" in text
    assert "&lt;b&gt;teapot&lt;/b&gt; &amp; co" in text
    assert "418" in text


@pytest.mark.parametrize(
    ("language_code", "expected"),
    [("pt-br", "pt_BR"), ("pt", "pt_BR"), ("en", "en"), ("de", "en"), (None, "en")],
)
def test_locale_from_telegram_language_code(language_code: str | None, expected: str) -> None:
    assert pick_locale(language_code, "en") == expected


def test_default_locale_applies_to_unknown_languages() -> None:
    assert pick_locale("de", "pt_BR") == "pt_BR"
    assert pick_locale("en-US", "pt_BR") == "en"
