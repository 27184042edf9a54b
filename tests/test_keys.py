"""The key rule: how audience and trait names become trait keys."""

from __future__ import annotations

import pytest

from audience_sync.keys import is_valid_key, snake_case


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30days", "order_completed_last_30days"),
        ("Order Completed Last 30 Days", "order_completed_last_30_days"),
        ("VIP Customers", "vip_customers"),
        ("B2B Leads", "b2b_leads"),
        ("highValueUsers", "high_value_users"),
        ("HTTPSUsers", "https_users"),
        ("Café  Lovers!!", "cafe_lovers"),
        ("30 Day Actives", "30_day_actives"),
        ("Tier1 Users", "tier1_users"),
    ],
)
def test_pinned_examples(name: str, key: str) -> None:
    """Each pinned name gives exactly its pinned key."""
    assert snake_case(name) == key


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("  --Churn   Risk--  ", "churn_risk"),
        ("already_snake_case", "already_snake_case"),
        ("Crème Brûlée Fans", "creme_brulee_fans"),
        ("getHTTPResponseCode", "get_http_response_code"),
        ("a__b", "a_b"),
    ],
)
def test_separators_collapse_and_accents_fold(name: str, key: str) -> None:
    """Runs of other characters become one underscore; accents fold to ASCII."""
    assert snake_case(name) == key


@pytest.mark.parametrize("name", ["!!!", "   ", "日本語", "—"])
def test_names_with_nothing_usable_give_an_empty_key(name: str) -> None:
    """A name with no ASCII letter or digit yields the empty key."""
    assert snake_case(name) == ""


@pytest.mark.parametrize("key", ["vip", "order_completed_last_30days", "30_day", "a"])
def test_valid_explicit_keys(key: str) -> None:
    """Lower-case letters, digits and underscores, starting with a letter or digit."""
    assert is_valid_key(key)


@pytest.mark.parametrize("key", ["", "_vip", "VIP", "vip-customers", "vip customers"])
def test_invalid_explicit_keys(key: str) -> None:
    """Capitals, dashes, spaces and a leading underscore are refused."""
    assert not is_valid_key(key)
