"""A worker's view of the main process's state: client records, signing keys, limits.

The worker holds no database. Its client records are a read-only copy the main process
keeps current (a snapshot at start, then every change, each acknowledged before the
admin operation answers); its signing keys are the main process's, pushed the same way.
Every call that is limited or budgeted asks the main process in one round trip on the
channel (`WorkerAdmission.admit`, the shape of the cluster limiter's, so the servicer's
shared path serves both): the main process decides rpm, budgets and concurrency with
its own limiter and store, and checks there that the client is still active, so a
revocation is refused on the next request whatever this copy says. Usage goes to the
main process, which records it in its store, after this worker wrote it to a file of
its own (journal_files.py): totals equal calls served, even across a kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from vibectld.ops.metrics import Metrics
from vibectld.pki.kids import LoadedKeys
from vibectld.pki.tls import CertificateAuthority
from vibectld.runtime import Runtime
from vibectld.service.limits import EffectiveLimits
from vibectld.service.refusals import CallRefused, Unavailable
from vibectld.store import usage
from vibectld.store.base import StoreHealth
from vibectld.store.records import ClientRecord
from vibectld.workers.channel import Channel, ChannelClosed
from vibectld.workers.journal_files import WorkerJournal

# How long a call waits for the main process to admit it before it is refused as
# UNAVAILABLE (retryable): the main process answers in well under a millisecond.
ADMIT_TIMEOUT_SECONDS = 10.0


# -- signing keys -----------------------------------------------------------------------


def keys_to_wire(loaded: LoadedKeys) -> tuple[dict[str, bytes], frozenset[str]]:
    """Raw key bytes, to cross the private channel (key objects do not pickle)."""
    raw = {
        kid: key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        for kid, key in loaded.keys.items()
    }
    return raw, loaded.retired


def ca_to_wire(ca: CertificateAuthority | None) -> tuple[bytes, bytes, str] | None:
    """The main process's CA, if its generation holds one (certificate and key, DER),
    so a worker's generation is built with the same one."""
    if ca is None:
        return None
    key = ca.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    return ca.cert.public_bytes(Encoding.DER), key, ca.where


class PushedKeys:
    """A KeyBacking holding what the main process last pushed; a worker never writes keys."""

    shared = True  # changed by another process: refresh() takes the latest push

    def __init__(self, wire: tuple[dict[str, bytes], frozenset[str]]) -> None:
        self._wire = wire

    def __repr__(self) -> str:
        return "PushedKeys()"

    def replace(self, wire: tuple[dict[str, bytes], frozenset[str]]) -> None:
        self._wire = wire

    def load(self) -> LoadedKeys:
        raw, retired = self._wire
        keys = {kid: Ed25519PrivateKey.from_private_bytes(b) for kid, b in raw.items()}
        return LoadedKeys(keys, retired)

    def add(self, latest: str | None) -> tuple[str, Ed25519PrivateKey]:
        raise RuntimeError("a worker process does not rotate signing keys")

    def retire(self, kid: str) -> None:
        raise RuntimeError("a worker process does not retire signing keys")


# -- client records ---------------------------------------------------------------------


class WorkerStore:
    """The part of the Store a worker's request path reads, and its usage, forwarded.

    Budgets are decided by the main process at admission (its store has every worker's
    usage), so the budget reads here answer zero: the servicer's own budget check in a
    worker then never refuses, and the main process's answer is the one that counts.
    """

    backend = "worker"
    shared = False

    def __init__(self, records: list[ClientRecord]) -> None:
        self._records = {r.id: r for r in records}
        self.channel: Channel | None = None
        # This worker's own usage files: each record is written there before it is sent.
        self.journal: WorkerJournal | None = None
        # Usd spent this month per client, as the main process said at the last
        # admission: GetServerInfo's usd_left (informational; admission decides).
        self.usd_month: dict[str, float] = {}

    def put(self, record: ClientRecord) -> None:
        self._records[record.id] = record

    def get(self, jti: str) -> ClientRecord | None:
        return self._records.get(jti)

    def active_signed_by(self, kid: str, now: int | None = None) -> list[ClientRecord]:
        at = int(time.time()) if now is None else now
        return [r for r in self._records.values() if r.kid == kid and r.status(at) == "active"]

    def counts(self, now: int | None = None) -> dict[str, int]:
        at = int(time.time()) if now is None else now
        active = sum(1 for r in self._records.values() if r.status(at) == "active")
        return {"active": active, "total": len(self._records)}

    # Store.record_call's signature (store/base.py), restated: the servicer records a
    # worker's calls as it does the main process's, and this forwards them there.
    def record_call(
        self,
        client_id: str,
        *,
        now: int,
        error: bool,
        input_tokens: int | None,
        output_tokens: int | None,
        cost_usd: float | None,
    ) -> None:
        tag = None
        journal = self.journal
        if journal is not None and client_id in self._records:
            counts = usage.call_counts(error, input_tokens, output_tokens, cost_usd)
            tag = journal.call(client_id, now, counts)
        self._tell(
            "record_call", (tag, client_id, now, error, input_tokens, output_tokens, cost_usd)
        )

    def record_redactions(self, client_id: str, *, now: int, found: dict[str, int]) -> None:
        tag = None
        journal = self.journal
        if journal is not None and client_id in self._records:
            tag = journal.redactions(client_id, now, found)
        self._tell("record_redactions", (tag, client_id, now, dict(found)))

    def _tell(self, kind: str, body: Any) -> None:
        assert self.channel is not None
        # Lost here only if the main process is gone; the record is in this worker's
        # file, which the next start counts (journal_files.py).
        with contextlib.suppress(ChannelClosed):
            self.channel.tell(kind, body)

    def tokens_used(self, client_id: str, now: int) -> int:
        return 0

    def usd_spent_month(self, client_id: str, now: float) -> float:
        return self.usd_month.get(client_id, 0.0)

    def usd_spent_day(self, now: float) -> float:
        return 0.0

    def freshness(self, now: float | None = None) -> float | None:
        return None  # staleness is the main process's to judge, at admission

    def health(self) -> StoreHealth:
        return StoreHealth(degraded=False, reason=None, since=None)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# -- metrics ----------------------------------------------------------------------------


class ForwardedMetrics(Metrics):
    """A worker's metrics: what the main process's endpoint shows of each call (requests,
    durations, tokens, redactions, refusals) goes to it; the rest stays here, unexported
    (calls in flight: the main process has them from the pings)."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel
        # The servicer and the call gate count a refusal with .labels(reason).inc().
        self.refusals = _ForwardedRefusals(channel)  # type: ignore[assignment]

    # Metrics.observe_call's signature, restated by the override: the servicer calls
    # it the same way in a worker, and the call goes to the main process's metrics.
    def observe_call(
        self,
        client: str,
        model: str,
        outcome: str,
        seconds: float,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> None:
        with contextlib.suppress(ChannelClosed):
            self._channel.tell(
                "observe_call", (client, model, outcome, seconds, input_tokens, output_tokens)
            )

    def observe_redactions(self, found: Mapping[str, int], action: str) -> None:
        with contextlib.suppress(ChannelClosed):
            self._channel.tell("observe_redactions", (dict(found), action))


class _ForwardedRefusals:
    """`Metrics.refusals` in a worker: counted here and sent as one message per loop
    turn, however many refusals it saw (a flood of bad secrets is many)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._counts: Counter[str] = Counter()

    def labels(self, reason: str) -> _Refusal:
        return _Refusal(self, reason)

    def add(self, reason: str, n: float) -> None:
        if not self._counts:
            try:
                asyncio.get_running_loop().call_soon(self._send)
            except RuntimeError:
                # No loop: nothing to send it with. Not kept either: a count left here
                # would hold back every later one, each waiting for a send never scheduled.
                return
        self._counts[reason] += int(n)

    def _send(self) -> None:
        counts, self._counts = dict(self._counts), Counter()
        with contextlib.suppress(ChannelClosed):
            self._channel.tell("refusals", counts)


@dataclass(slots=True)
class _Refusal:
    owner: _ForwardedRefusals
    reason: str

    def inc(self, amount: float = 1) -> None:
        self.owner.add(self.reason, amount)


# -- admission --------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerLease:
    """One running call's slot, held by the main process until released."""

    client_id: str
    id: int


def refusal_to_wire(refusal: CallRefused) -> tuple[str, str, dict[str, Any]]:
    return type(refusal).__name__, refusal.message, dict(vars(refusal))


def refusal_from_wire(wire: tuple[str, str, dict[str, Any]]) -> CallRefused:
    """The same refusal the main process raised (class, message, trailers)."""
    name, message, attrs = wire
    cls = _refusal_class(name)
    refusal = cls.__new__(cls)
    Exception.__init__(refusal, message)
    refusal.__dict__.update(attrs)
    return refusal


def _refusal_class(name: str) -> type[CallRefused]:
    # The modules that define refusals, imported so that their classes are known.
    from vibectld.service import budgets, limits, staleness  # noqa: F401

    classes: list[type[CallRefused]] = [CallRefused]
    while classes:
        cls = classes.pop()
        if cls.__name__ == name:
            return cls
        classes.extend(cls.__subclasses__())
    return Unavailable


class WorkerAdmission:
    """rpm, budgets and concurrency, decided by the main process for every worker.

    A call with nothing to decide there (no rpm or concurrency limit, no token or dollar
    budget for the client or the server, and not refused while the store is stale) is
    admitted here with no round trip: whether its client is still active is this copy's
    to say, and a revocation reaches it before the admin command answers.
    """

    def __init__(self, channel: Channel, store: WorkerStore, rt: Runtime) -> None:
        self._channel = channel
        self._store = store
        self._rt = rt

    def _nothing_to_decide(self, client_id: str, rpm: int | None, concurrency: int | None) -> bool:
        if rpm is not None or concurrency is not None:
            return False
        config = self._rt.generation.config
        record = self._store.get(client_id)
        if (
            record is None
            or config.limits.server_usd_per_day is not None
            or config.storage.on_stale == "refuse"
        ):
            return False
        limits = EffectiveLimits.of(record, config.limits)
        return limits.tokens_per_day is None and limits.usd_per_month is None

    def __repr__(self) -> str:
        return "WorkerAdmission()"

    # runtime.Admission.admit's signature, restated: the servicer's shared path calls
    # this or the cluster limiter alike, and mypy checks both against the Protocol.
    async def admit(
        self,
        client_id: str,
        rpm: int | None,
        concurrency: int | None,
        *,
        slot: bool,
        model_id: str | None = None,
    ) -> WorkerLease | None:
        """One round trip: the main process counts the call (rpm), and with `slot`
        checks the budgets for `model_id` and takes a concurrent slot; raises the refusal
        it decided; the main process reads the client's limits from its own, current
        record. None (the servicer's path on one process) when nothing is to decide."""
        if self._channel.closed.is_set():
            raise Unavailable("this vibectld worker lost its main process; retry in a moment")
        if self._nothing_to_decide(client_id, rpm, concurrency):
            return None
        try:
            answer = await self._channel.ask(
                "admit", (client_id, slot, model_id), within=ADMIT_TIMEOUT_SECONDS
            )
        except (ChannelClosed, TimeoutError):
            raise Unavailable(
                "this vibectld worker lost its main process; retry in a moment"
            ) from None
        kind, body = answer
        if kind == "refused":
            raise refusal_from_wire(body)
        lease_id, usd_month = body
        self._store.usd_month[client_id] = usd_month
        return None if lease_id is None else WorkerLease(client_id, lease_id)

    async def usd_spent_month(self, client_id: str, now: float) -> float | None:
        """Asked of the main process, whose store has every worker's usage: the figure
        from this worker's last admission misses that call's own cost and every call
        another worker served. None (the last figure then) while the main is away."""
        try:
            spent = await self._channel.ask("spent", client_id, within=ADMIT_TIMEOUT_SECONDS)
        except (ChannelClosed, TimeoutError):
            return None
        self._store.usd_month[client_id] = spent
        return float(spent)

    def release(self, lease: WorkerLease) -> None:
        with contextlib.suppress(ChannelClosed):
            self._channel.tell("release", lease.id)

    @contextlib.contextmanager
    def holding(self, lease: WorkerLease) -> Iterator[None]:
        try:
            yield
        finally:
            self.release(lease)
