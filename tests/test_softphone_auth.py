"""The Mini App's initData check: signature (aiogram), age (ours) and who may join a call."""

from __future__ import annotations

import pytest

from bot.access import AccessPolicy, Role
from bot.errors import NotAllowed
from bot.softphone.auth import InitDataCheck, require_joiner
from tests.miniapp import init_data

TOKEN = "123456:" + "A" * 35
NOW = 1_800_000_000.0


def check(max_age: float = 3600) -> InitDataCheck:
    return InitDataCheck(TOKEN, max_age, clock=lambda: NOW)


def refusal(init: str | None, max_age: float = 3600) -> tuple[str, int]:
    with pytest.raises(NotAllowed) as caught:
        check(max_age).user(init)
    return caught.value.code, caught.value.status


def test_a_fresh_signed_init_data_names_the_user_and_language() -> None:
    user = check().user(
        init_data(TOKEN, 42, auth_date=NOW - 10, language_code="pt-br", start_param="cb_1")
    )
    assert (user.id, user.language, user.start_param) == (42, "pt_BR", "cb_1")
    assert check().user(init_data(TOKEN, 42, auth_date=NOW, language_code="de")).language == "en"


def test_the_header_carries_it_after_tma() -> None:
    header = "tma " + init_data(TOKEN, 42, auth_date=NOW)
    assert check().from_header(header).id == 42
    with pytest.raises(NotAllowed):
        check().from_header("Bearer " + init_data(TOKEN, 42, auth_date=NOW))
    with pytest.raises(NotAllowed):
        check().from_header(None)


def test_forged_tampered_or_missing_init_data_is_401() -> None:
    assert refusal(init_data(TOKEN, 42, auth_date=NOW, forge=True)) == (
        "miniapp_bad_init_data",
        401,
    )
    tampered = init_data(TOKEN, 42, auth_date=NOW).replace("%22id%22%3A42", "%22id%22%3A43")
    assert refusal(tampered)[1] == 401
    assert refusal("not init data")[1] == 401
    assert refusal("") == ("miniapp_no_init_data", 401)


def test_init_data_older_than_the_max_age_is_401_though_signed() -> None:
    # aiogram checks only the signature: this one is valid, just an hour and a second old
    assert refusal(init_data(TOKEN, 42, auth_date=NOW - 3601)) == (
        "miniapp_init_data_expired",
        401,
    )
    assert check(7200).user(init_data(TOKEN, 42, auth_date=NOW - 3601)).id == 42
    assert refusal(init_data(TOKEN, 42, auth_date=NOW + 3600))[1] == 401  # from the future


def test_only_the_caller_or_an_admin_may_join() -> None:
    policy = AccessPolicy(operator_ids=frozenset({1, 2}), admin_ids=frozenset({9}))
    assert require_joiner(policy, 1, caller_id=1) is Role.OPERATOR
    assert require_joiner(policy, 9, caller_id=1) is Role.ADMIN
    for stranger in (2, 77):  # another operator; someone who is not an operator at all
        with pytest.raises(NotAllowed) as caught:
            require_joiner(policy, stranger, caller_id=1)
        assert caught.value.status == 403
