"""Dollar budgets: a client's per UTC calendar month, the whole server's per UTC day.

Checked after the token budget and before the concurrency reservation, on the event
loop with no await between the check and the call's start, from totals kept in memory
(store/spend.py), so a check costs no SQL and sees every call counted so far.

The in-flight overrun rule, the same as for tokens per day: a call is admitted while
the spend counted so far is under the budget. A call's cost is known only when the
model reports its usage, so the calls admitted under the budget (one, or several
running at once) may finish over it; their cost is counted in full, and every call that
starts after the spend has reached the budget is refused until the period ends. The
overrun is therefore at most what the calls already running when the budget was
reached cost. A refused call costs nothing.

A dollar budget needs a price: a model without one in `models.prices` is refused
(PERMISSION_DENIED) to a client with a dollar budget, and to every client while
`limits.server_usd_per_day` is set, since its calls could not be counted against the
cap. A model that really is free is given a price of 0.
"""

from __future__ import annotations

from vibectl.util.limits import format_usd
from vibectld.generation import Generation
from vibectld.providers.catalogue import CatalogueEntry
from vibectld.service.limits import EffectiveLimits, retry_after_ms
from vibectld.service.refusals import LimitExceeded, PermissionDenied
from vibectld.store import spend
from vibectld.store.base import Store
from vibectld.store.registry import ClientRecord

# Spend is a sum of floats; a nano-dollar is far below any call's price, and keeps a
# sum that should equal the budget exactly from reading a hair under it.
_EPSILON = 1e-9


def check_dollar_budgets(
    registry: Store,
    gen: Generation,
    client: ClientRecord,
    limits: EffectiveLimits,
    entry: CatalogueEntry,
    now: float,
) -> None:
    """Refuse a call that cannot be priced, or that would start with a budget spent.

    Raises PermissionDenied (no price for the model) or LimitExceeded with limit-type
    `usd_per_month` or `server_usd_per_day` and retry-after-ms to the period's end.
    """
    budget = limits.usd_per_month
    cap = gen.config.limits.server_usd_per_day
    if budget is None and cap is None:
        return
    if entry.model_id not in gen.config.models.prices:
        raise _unpriced(gen, client, entry, budget)
    if budget is not None:
        spent = registry.usd_spent_month(client.id, now)
        if spent + _EPSILON >= budget:
            raise LimitExceeded(
                f"this client has spent {format_usd(spent)} of its {format_usd(budget)} "
                "budget for this month (UTC); it renews on the first of next month, "
                "00:00 UTC — ask your vibectld admin to raise it (update-client --usd-per-month)",
                "usd_per_month",
                retry_after_ms(spend.next_month_start(now), now),
            )
    if cap is not None:
        spent = registry.usd_spent_day(now)
        if spent + _EPSILON >= cap:
            raise LimitExceeded(
                f"this server has spent {format_usd(spent)} of its {format_usd(cap)} "
                "daily budget (limits.server_usd_per_day) for every client together; "
                "it renews at midnight UTC",
                "server_usd_per_day",
                retry_after_ms(spend.next_day_start(now), now),
            )


def usd_left(budget: float, spent: float) -> float:
    """What is left of a budget; 0 once it is spent (an overrun leaves nothing, not less)."""
    return max(0.0, budget - spent)


def _unpriced(
    gen: Generation, client: ClientRecord, entry: CatalogueEntry, budget: float | None
) -> PermissionDenied:
    prices = gen.config.models.prices
    allowed = client.models
    priced = [
        e.model_id
        for e in gen.catalogue.entries()
        if e.model_id in prices and (allowed is None or e.model_id in allowed)
    ]
    why = (
        f"this client has a dollar budget ({format_usd(budget)} per month)"
        if budget is not None
        else "this server caps its spend per day (limits.server_usd_per_day)"
    )
    return PermissionDenied(
        f"model '{entry.model_id}' has no price on this server (models.prices) and {why}, "
        "so its cost could not be counted; priced models you may use: "
        f"{', '.join(priced) or 'none'} — or ask your vibectld admin to add its price"
    )
