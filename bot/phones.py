"""Phone numbers as people type them → E.164 mobiles, with phonenumbers doing the parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType

_MOBILE_TYPES = {PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE}
_ALLOWED = re.compile(r"^[\d\s+().\-/]+$")


class PhoneProblem(StrEnum):
    EMPTY = "phone_empty"
    NOT_A_NUMBER = "phone_not_a_number"
    INVALID = "phone_invalid"
    NOT_MOBILE = "phone_not_mobile"


class PhoneError(ValueError):
    def __init__(self, problem: PhoneProblem, text: str, region: str) -> None:
        super().__init__(problem.value)
        self.problem = problem
        self.text = text
        self.region = region


@dataclass(frozen=True)
class Phone:
    e164: str  # "+5511999999999"
    display: str  # "+55 11 99999-9999"

    @property
    def digits(self) -> str:
        return self.e164.removeprefix("+")

    @property
    def masked(self) -> str:
        return mask(self.display)


def parse_phone(text: str, region: str = "BR") -> Phone:
    """Normalize what an operator typed to an E.164 mobile, or raise PhoneError saying why."""
    raw = text.strip()
    if not raw:
        raise PhoneError(PhoneProblem.EMPTY, text, region)
    if not _ALLOWED.match(raw) or not any(c.isdigit() for c in raw):
        raise PhoneError(PhoneProblem.NOT_A_NUMBER, text, region)
    if sum(c.isdigit() for c in raw) < 8:
        raise PhoneError(PhoneProblem.INVALID, text, region)
    try:
        number = phonenumbers.parse(raw, region)
    except NumberParseException:
        raise PhoneError(PhoneProblem.NOT_A_NUMBER, text, region) from None
    if not phonenumbers.is_valid_number(number):
        legacy = _brazil_without_ninth_digit(number)
        if legacy is None:
            raise PhoneError(PhoneProblem.INVALID, text, region)
        return legacy
    if phonenumbers.number_type(number) not in _MOBILE_TYPES:
        raise PhoneError(PhoneProblem.NOT_MOBILE, text, region)
    return Phone(
        e164=phonenumbers.format_number(number, PhoneNumberFormat.E164),
        display=phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL),
    )


def _brazil_without_ninth_digit(number: phonenumbers.PhoneNumber) -> Phone | None:
    """A Brazilian mobile written without its 9th digit, kept as written.

    Many WhatsApp accounts of older Brazilian numbers are registered without the extra 9
    (API.md §7.2), so an operator who writes it that way means that account.
    """
    national = str(number.national_number)
    if number.country_code != 55 or len(national) != 10 or national[2] not in "6789":
        return None
    with_nine = phonenumbers.PhoneNumber(
        country_code=55, national_number=int(national[:2] + "9" + national[2:])
    )
    if phonenumbers.number_type(with_nine) is not PhoneNumberType.MOBILE:
        return None
    return Phone(
        e164=f"+55{national}", display=f"+55 {national[:2]} {national[2:6]}-{national[6:]}"
    )


def split_phone_and_note(text: str, region: str = "BR") -> tuple[Phone, str | None]:
    """'+55 11 99999-9999 server down' → (phone, 'server down').

    The phone is the longest run of leading words that parses, so a note may start with digits.
    """
    words = text.split()
    lead = 0
    while lead < len(words) and _ALLOWED.match(words[lead]):
        lead += 1
    if lead == 0:
        return parse_phone(words[0] if words else "", region), None
    first_error: PhoneError | None = None
    for end in range(lead, 0, -1):
        try:
            phone = parse_phone(" ".join(words[:end]), region)
        except PhoneError as err:
            first_error = first_error or err
            continue
        note = " ".join(words[end:]).strip()
        return phone, note or None
    assert first_error is not None
    raise first_error


def mask(display: str) -> str:
    """'+55 11 99999-9999' → '+55 11 9****-9999': country and area kept, then first and last 4."""
    head, _, rest = display.partition(" ")
    area, _, rest = rest.partition(" ")
    if not rest:  # no separate area group: mask inside the only group
        area, rest = "", area
    digits = [i for i, c in enumerate(rest) if c.isdigit()]
    keep_first = 1 if len(digits) >= 8 else 0
    hidden = set(digits[keep_first:-4]) if len(digits) > 5 else set(digits[:-2])
    body = "".join("*" if i in hidden else c for i, c in enumerate(rest))
    return " ".join(part for part in (head, area, body) if part)
