"""Phone parsing: what operators type → E.164 mobile or a reason."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.phones import PhoneError, PhoneProblem, mask, parse_phone, split_phone_and_note


@pytest.mark.parametrize(
    "typed",
    [
        "+55 11 99999-9999",
        "+55 (11) 99999-9999",
        "5511999999999",
        "11 99999-9999",
        "(11) 99999.9999",
        "011 99999-9999",
        "+5511999999999",
    ],
)
def test_common_ways_of_writing_a_brazilian_mobile(typed: str) -> None:
    assert parse_phone(typed, "BR").e164 == "+5511999999999"


def test_brazilian_mobile_without_ninth_digit_is_kept_as_written() -> None:
    phone = parse_phone("(11) 8765-4321", "BR")
    assert phone.e164 == "+551187654321"
    assert phone.masked == "+55 11 8***-4321"


def test_default_region_applies_to_numbers_without_plus() -> None:
    assert parse_phone("650 253 0000", "US").e164 == "+16502530000"
    assert parse_phone("+44 7911 123456", "US").e164 == "+447911123456"


@pytest.mark.parametrize(
    ("typed", "problem"),
    [
        ("", PhoneProblem.EMPTY),
        ("bob", PhoneProblem.NOT_A_NUMBER),
        ("1234", PhoneProblem.INVALID),
        ("+-()", PhoneProblem.NOT_A_NUMBER),
        ("+55 11 3333-4444", PhoneProblem.NOT_MOBILE),
        ("+55 11 99999-99999", PhoneProblem.INVALID),
        ("+999 1234 5678", PhoneProblem.NOT_A_NUMBER),
        ("+55 00 99999-9999", PhoneProblem.INVALID),
    ],
)
def test_refusals_say_why(typed: str, problem: PhoneProblem) -> None:
    with pytest.raises(PhoneError) as caught:
        parse_phone(typed, "BR")
    assert caught.value.problem is problem
    assert caught.value.text == typed


def test_note_is_what_follows_the_number_even_when_it_starts_with_digits() -> None:
    phone, note = split_phone_and_note("+55 11 99999-9999 500 errors on checkout", "BR")
    assert phone.e164 == "+5511999999999"
    assert note == "500 errors on checkout"
    assert split_phone_and_note("11999999999", "BR")[1] is None


def test_mask_keeps_country_area_first_and_last_four() -> None:
    assert parse_phone("+55 11 99999-9999").masked == "+55 11 9****-9999"
    assert mask("+1 650-253-0000") == "+1 6**-***-0000"
    assert "123456" not in parse_phone("+44 7911 123456").masked


@given(st.text(max_size=40))
def test_arbitrary_input_always_gets_a_verdict(text: str) -> None:
    try:
        phone = parse_phone(text, "BR")
    except PhoneError as err:
        assert err.problem in PhoneProblem
    else:
        assert phone.e164.startswith("+") and phone.e164[1:].isdigit()
        assert phone.masked.count("*") >= 2


@given(st.text(alphabet="0123456789 +-()", max_size=30), st.text(max_size=20))
def test_split_never_crashes(number: str, note: str) -> None:
    try:
        phone, rest = split_phone_and_note(f"{number} {note}", "BR")
    except PhoneError:
        return
    assert phone.e164.startswith("+")
    assert rest is None or rest.strip() == rest
