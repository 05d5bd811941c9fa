"""Dollar budgets below the daemon: the rule for an amount, UTC months, the spend kept in
memory and loaded from the registry's usage table at start, and the config keys."""

from __future__ import annotations

import calendar
from pathlib import Path
from typing import Any

import pytest

from vibectl.util.limits import check_usd, format_usd
from vibectld.config import ConfigError, unpriced_budget_warnings
from vibectld.config_file import parse_config
from vibectld.store import spend
from vibectld.store.registry import UNSET, InvalidRecord, Registry
from vibectld.store.spend import SpendBook

ADMIN = "root(0)"
DAY = 86400
# 2027-01-31 12:00:00 UTC: the last day of a month.
JAN_31 = calendar.timegm((2027, 1, 31, 12, 0, 0, 0, 0, 0))
FEB_1 = calendar.timegm((2027, 2, 1, 0, 0, 0, 0, 0, 0))
DEC_15 = calendar.timegm((2026, 12, 15, 8, 30, 0, 0, 0, 0))


@pytest.mark.parametrize("value", [0.01, 1, 20, 0.5, 1_000_000])
def test_a_budget_is_a_number_of_dollars_from_a_cent_to_a_million(value: float) -> None:
    assert check_usd(value) == float(value)


@pytest.mark.parametrize(
    "value", [0, -1, 0.001, 1_000_000.01, 10**400, float("nan"), float("inf"), True, "20", [1]]
)
def test_anything_else_is_refused_with_the_label(value: object) -> None:
    with pytest.raises(ValueError, match=r"^--usd-per-month must be a number of US dollars"):
        check_usd(value, "--usd-per-month")


def test_dollars_read_as_money() -> None:
    assert format_usd(3.2) == "$3.20"
    assert format_usd(1234.5) == "$1,234.50"
    assert format_usd(0.008) == "$0.0080"
    assert format_usd(0.5) == "$0.50"
    assert format_usd(0) == "$0.00"


def test_months_and_days_are_utc_calendar_periods() -> None:
    assert spend.next_month_start(JAN_31) == FEB_1
    assert spend.next_month_start(FEB_1) == calendar.timegm((2027, 3, 1, 0, 0, 0, 0, 0, 0))
    # December rolls over into the next year.
    assert spend.next_month_start(DEC_15) == calendar.timegm((2027, 1, 1, 0, 0, 0, 0, 0, 0))
    assert spend.next_day_start(JAN_31) == FEB_1
    assert spend.next_day_start(FEB_1) == FEB_1 + DAY
    assert spend.month_days(JAN_31) == ("2027-01-01", "2027-02-01")
    assert spend.month_days(DEC_15) == ("2026-12-01", "2027-01-01")
    assert spend.month_number(FEB_1) == spend.month_number(JAN_31) + 1


def test_spend_is_summed_per_client_month_and_per_server_day() -> None:
    book = SpendBook()
    book.record("a", JAN_31, 1.5)
    book.record("a", JAN_31 - 20 * DAY, 0.5)
    book.record("b", JAN_31, 2.0)
    book.record("b", JAN_31, 0.0)  # unpriced or free: nothing
    assert book.month_spent("a", JAN_31) == 2.0
    assert book.month_spent("b", JAN_31) == 2.0
    assert book.day_spent(JAN_31) == 3.5
    # A new month starts from nothing; the server's new day too.
    assert book.month_spent("a", FEB_1) == 0.0 and book.day_spent(FEB_1) == 0.0
    book.record("a", FEB_1, 0.25)
    assert book.month_spent("a", FEB_1) == 0.25
    assert book.month_spent("a", JAN_31) == 2.0  # the last month is still readable


def test_the_month_s_spend_is_loaded_from_the_usage_table(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.db"
    reg = Registry.open(path, now=JAN_31 - 40 * DAY)
    alice = reg.issue(name="alice", expires_at=FEB_1 + 90 * DAY, issued_by=ADMIN, now=DEC_15)
    bob = reg.issue(name="bob", expires_at=FEB_1 + 90 * DAY, issued_by=ADMIN, now=DEC_15)
    for when, client, cost in [
        (DEC_15, alice.id, 7.0),  # last month: not this month's spend
        (JAN_31 - 30 * DAY, alice.id, 1.0),  # 2027-01-01
        (JAN_31 - DAY, alice.id, 2.0),
        (JAN_31, alice.id, 0.25),
        (JAN_31, bob.id, 0.5),
    ]:
        reg.record_call(
            client, now=when, error=False, input_tokens=1, output_tokens=1, cost_usd=cost
        )
    reg.close()
    again = Registry.open(path, now=JAN_31)
    try:
        assert again.usd_spent_month(alice.id, JAN_31) == pytest.approx(3.25)
        assert again.usd_spent_month(bob.id, JAN_31) == pytest.approx(0.5)
        assert again.usd_spent_day(JAN_31) == pytest.approx(0.75)
        assert again.usd_spent_month(alice.id, FEB_1) == 0.0
    finally:
        again.close()


def test_a_client_s_own_budget_is_kept_updated_and_cleared(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.db"
    reg = Registry.open(path, now=JAN_31)
    rec = reg.issue(
        name="carol", expires_at=FEB_1 + DAY, issued_by=ADMIN, usd_per_month=20, now=JAN_31
    )
    assert rec.usd_per_month == 20.0
    assert reg.update("carol", by=ADMIN, usd_per_month=0.5, now=JAN_31).usd_per_month == 0.5
    assert reg.update("carol", by=ADMIN, rpm=3, usd_per_month=UNSET, now=JAN_31).usd_per_month
    with pytest.raises(InvalidRecord, match="usd_per_month must be a number of US dollars"):
        reg.update("carol", by=ADMIN, usd_per_month=-2, now=JAN_31)
    with pytest.raises(InvalidRecord, match="usd_per_month"):
        reg.issue(name="dan", expires_at=FEB_1, issued_by=ADMIN, usd_per_month=1e9, now=JAN_31)
    reg.close()
    again = Registry.open(path, now=JAN_31)
    try:
        kept = again.find("carol", JAN_31)
        assert (kept.usd_per_month, kept.rpm) == (0.5, 3)
        assert again.update("carol", by=ADMIN, usd_per_month=None, now=JAN_31).usd_per_month is None
    finally:
        again.close()


def _limits(**values: Any) -> Any:
    return parse_config({"limits": values}).limits


def test_config_budgets_default_to_none_and_take_dollars() -> None:
    assert (_limits().usd_per_month, _limits().server_usd_per_day) == (None, None)
    limits = _limits(usd_per_month=20, server_usd_per_day=0.5)
    assert (limits.usd_per_month, limits.server_usd_per_day) == (20.0, 0.5)


@pytest.mark.parametrize("key", ["usd_per_month", "server_usd_per_day"])
@pytest.mark.parametrize("value", [-1, 0, 5_000_000, "20", True, float("nan")])
def test_config_refuses_bad_budgets_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^limits\.{key}: must be a number of US dollars"):
        _limits(**{key: value})


def test_warnings_name_unpriced_models_only_when_a_budget_is_set() -> None:
    models = {
        "default": "a",
        "allowed": ["a", "b"],
        "aliases": {"quick": "c"},
        "prices": {"a": {"input": 1, "output": 1}},
    }
    assert unpriced_budget_warnings(parse_config({"models": models})) == []
    config = parse_config({"models": models, "limits": {"usd_per_month": 5}})
    [warning] = unpriced_budget_warnings(config)
    assert "no price for b, c" in warning and "limits.usd_per_month" in warning
    assert "clients with a dollar budget" in warning
    config = parse_config({"models": models, "limits": {"server_usd_per_day": 5}})
    assert "every client" in unpriced_budget_warnings(config)[0]
    # With the catalogue's models (start and reload), those are the ones checked.
    assert unpriced_budget_warnings(config, ["a"]) == []
    # An empty allow-list: the file cannot say which models are offered.
    del models["allowed"]
    warnings = unpriced_budget_warnings(
        parse_config({"models": models, "limits": {"usd_per_month": 5}})
    )
    assert any("models.allowed is empty" in w for w in warnings)
