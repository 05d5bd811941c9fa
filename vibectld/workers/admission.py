"""The main process's half of a worker's admission: what it decides for every worker.

A worker asks here, in one round trip (view.py, `WorkerAdmission`), for each call with a
limit or a budget: is the client still active, rpm, budgets and a concurrent slot, in
the contract's order, decided with this process's limiter (or, on PostgreSQL, the
cluster limiter) and store, as on one process. A slot is held here as a lease named by
its worker, so a worker that dies gives back all of its slots at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from vibectld.providers.catalogue import UnknownModel
from vibectld.runtime import Runtime
from vibectld.service.auth import ASK_ADMIN, check_registered
from vibectld.service.budgets import check_dollar_budgets
from vibectld.service.limits import EffectiveLimits, check_token_budget
from vibectld.service.refusals import CallRefused, Unauthenticated, Unavailable
from vibectld.service.staleness import is_stale, stale_refusal
from vibectld.store.records import ClientRecord
from vibectld.workers.view import refusal_to_wire


class MainAdmission:
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._lease_ids = itertools.count(1)
        # lease id → (worker index, client id, the cluster limiter's lease or None)
        self._leases: dict[int, tuple[int, str, Any]] = {}

    def __repr__(self) -> str:
        return f"MainAdmission(leases={len(self._leases)})"

    async def admit(
        self,
        worker: int,
        still_serving: Callable[[], bool],
        client_id: str,
        runs: bool,
        model_id: str | None,
    ) -> tuple[str, Any]:
        """A call of worker `worker`: rpm, budgets, concurrency, in the contract's order.
        `still_serving` says whether the process that asked still runs (it may die while
        the cluster limiter answers)."""
        rt = self._rt
        gen = rt.generation
        now = time.time()
        try:
            storage = gen.config.storage
            if storage.on_stale == "refuse" and is_stale(
                rt.registry, storage.max_staleness_seconds, now
            ):
                raise stale_refusal(rt.registry)
            record = rt.registry.get(client_id)
            _still_active(rt, record, int(now))
            assert record is not None
            limits = EffectiveLimits.of(record, gen.config.limits)
            held: CallRefused | None = None
            if runs:
                try:
                    check_token_budget(
                        rt.registry.tokens_used(client_id, int(now)), limits.tokens_per_day, now
                    )
                    if model_id is not None:
                        entry = gen.catalogue.resolve(model_id)
                        assert entry is not None
                        check_dollar_budgets(rt.registry, gen, record, limits, entry, now)
                except CallRefused as refusal:
                    held = refusal
                except UnknownModel:
                    held = Unavailable("the server is reloading its models; retry in a moment")
            inner: Any = None
            if rt.cluster is not None:
                inner = await rt.cluster.admit(
                    client_id, limits.rpm, limits.concurrency, slot=runs and held is None
                )
            else:
                rt.limiter.count_request(client_id, limits.rpm)
            if held is not None:
                raise held
            lease_id = None
            if runs:
                if rt.cluster is None:
                    rt.limiter.take(client_id, limits.concurrency)
                lease_id = next(self._lease_ids)
                self._leases[lease_id] = (worker, client_id, inner)
                if not still_serving():
                    # Its slots were given back already; this one goes too.
                    self.release(lease_id)
                    raise Unavailable("this call's worker stopped; retry")
        except CallRefused as refusal:
            # Counted in the metrics by the worker, which ends the call with it (and
            # forwards its refusal counts here, with those it decided alone).
            return "refused", refusal_to_wire(refusal)
        return "ok", (lease_id, rt.registry.usd_spent_month(client_id, now))

    def release(self, lease_id: int) -> None:
        held = self._leases.pop(lease_id, None)
        if held is None:
            return  # given back already, when its worker died
        rt = self._rt
        _, client_id, inner = held
        if inner is not None:
            assert rt.cluster is not None
            rt.cluster.release(inner)
        else:
            rt.limiter.give_back(client_id)

    def release_worker(self, index: int) -> int:
        """Every slot the dead worker `index` held, given back."""
        mine = [lease for lease, (owner, _, _) in self._leases.items() if owner == index]
        for lease in mine:
            self.release(lease)
        return len(mine)


def _still_active(rt: Runtime, record: ClientRecord | None, now: int) -> None:
    """Refuse a call whose client was revoked (or expired, or its key retired) since the
    worker authenticated it: its copy may be a push behind; this store is not."""
    record = check_registered(record, now)
    if record.kid is not None and not rt.signing.verifies(record.kid):
        raise Unauthenticated(f"secret's signing key was retired — {ASK_ADMIN}")
