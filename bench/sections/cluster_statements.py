"""The cluster section's third measurement: the database statements a call costs.

pg_stat_statements counts what the nodes send: a quiet stretch gives the background
rate (heartbeats, the change feed's catch-up reads), subtracted from a run of N calls of
one client and the flush after it; the rest, over N, is the statements per call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench import common as c
from bench.cluster_nodes import (
    AFTER_REPLY,
    AREA,
    BATCHED,
    BEFORE_REPLY,
    UNKNOWN,
    BenchDatabase,
    Statements,
    purpose,
)
from bench.common import Context, Section
from bench.servers import Vibectld, clean_env

# Calls per client kind, and quiet seconds for the background rate.
COUNT_CALLS, QUICK_COUNT_CALLS = 3000, 400
IDLE_S, QUICK_IDLE_S = 6.0, 3.0
# Usage reaches the database in batches (every 2 s): wait for the batch of the calls.
FLUSH_WAIT_S = 3.0
# A statement is named in a check's line when it runs at least once per 20 calls.
PER_CALL_MIN = 0.05
NOTE = """\
what a call costs in the database, and why. A client without limits costs no round
trip: its record, revocation and signing key are checked in memory, which the change feed
keeps fresh (LISTEN/NOTIFY plus a catch-up read every 0.5 s, whatever the call rate), and
its usage is added up in memory and written as increments once per flush (every 2 s) per
client and day. A client with rpm or concurrency limits costs one round trip before its
call runs: the count and the running calls must be exact across nodes, so one PL/pgSQL
function (vibectld_admit) counts the call in the 60 s window and takes a lease, under the
client's advisory locks, by the database's clock. Its lease's release needs no round trip
of its own under load: it rides on the node's next admit, and goes alone only when no
call comes soon after. (The limiter's session turns synchronous commit off: these round
trips do not wait for a WAL flush.) The rest is per node and per second, not per call:
heartbeats, the limiter's tick, the feed's catch-up reads, the re-read of today's
cluster-wide usage for the budgets."""


@dataclass
class Counted:
    """Statements by query: per second when quiet, per call for each kind of client."""

    idle_rate: dict[str, float]
    per_call: dict[str, dict[str, float]]
    served: dict[str, int]  # calls per kind of client
    whole: Statements  # everything since the quiet stretch began (for server ms)


def run(ctx: Context, section: Section, db: BenchDatabase, node: Vibectld, limited: str) -> None:
    report(section, measure(ctx, section, db, node, limited))


def measure(
    ctx: Context, section: Section, db: BenchDatabase, node: Vibectld, limited: str
) -> Counted:
    s = ctx.settings
    idle_s = QUICK_IDLE_S if s.quick else IDLE_S
    calls = QUICK_COUNT_CALLS if s.quick else COUNT_CALLS
    # A quiet stretch: what the nodes send with no calls (heartbeats, feed catch-up).
    time.sleep(FLUSH_WAIT_S)  # the warm-up's last batch lands first
    first = before = db.statements()
    t0 = time.monotonic()
    time.sleep(idle_s)
    idle = (db.statements() - before).calls
    idle_rate = {q: n / (time.monotonic() - t0) for q, n in idle.items()}
    per_call: dict[str, dict[str, float]] = {}
    served: dict[str, int] = {}
    for kind, secret in (("no limits", node.secret), ("rpm + concurrency", limited)):
        before, t0 = db.statements(), time.monotonic()
        args = c.target(kind.replace(" ", "-"), port=node.port, ca=node.ca_path)
        args += ["--callers", "16", "--max-requests", str(calls), "--duration", "120"]
        args += ["--warmup", "0"]
        (r,) = c.measure_load(args, env=clean_env(VIBECTLD_BENCH_SECRET=secret)).values()
        c.check_errors(section, f"statement count, client with {kind}", r)
        time.sleep(FLUSH_WAIT_S)
        elapsed = time.monotonic() - t0
        seen = (db.statements() - before).calls
        served[kind] = r.count + r.errors
        ctx.log(f"  {kind}: {r.count} calls, {seen.total()} statements in {elapsed:.1f} s")
        per_call[kind] = {
            q: (n - idle_rate.get(q, 0.0) * elapsed) / max(served[kind], 1) for q, n in seen.items()
        }
    return Counted(idle_rate, per_call, served, db.statements() - first)


def report(section: Section, got: Counted) -> None:
    idle_rate, per_call, whole = got.idle_rate, got.per_call, got.whole
    queries = sorted(
        set(idle_rate) | {q for d in per_call.values() for q in d},
        key=lambda q: (-max(d.get(q, 0.0) for d in per_call.values()), q),
    )
    header = ["statement", "why", "when", "quiet: per s"] + [f"per call, {k}" for k in per_call]
    header += ["server ms per execution"]
    rows = [
        [f"`{_short(q)}`", purpose(q).why, purpose(q).when, f"{idle_rate.get(q, 0.0):.2f}"]
        + [_per_call(per_call[k].get(q, 0.0)) for k in per_call]
        + [c.fmt(whole.ms[q] / whole.calls[q], ".3f") if whole.calls.get(q) else "-"]
        for q in queries
    ]
    section.tables.append(c.md_table(header, rows))
    for kind, counts in per_call.items():
        # The periodic statements (seen in the quiet stretch too) are per second, not per
        # call: left out here, so that the batched writes the calls cause are not netted
        # against the quiet stretch's sampling error.
        _per_call_check(section, kind, {q: n for q, n in counts.items() if q not in idle_rate},
                        counts, got.served[kind])  # fmt: skip
    by_purpose: dict[str, float] = {}
    for q, n in idle_rate.items():
        why = purpose(q).label if purpose(q).when != UNKNOWN else _short(q, 40)
        by_purpose[why] = by_purpose.get(why, 0.0) + n
    section.check(
        "database statements with no calls (one node)", None,
        f"{sum(by_purpose.values()):.2f} per s: " + ", ".join(
            f"{why} {n:.2f}/s" for why, n in sorted(by_purpose.items(), key=lambda x: -x[1])
        ),
    )  # fmt: skip
    section.notes.append(NOTE)


def _per_call_check(
    section: Section, kind: str, caused: dict[str, float], counts: dict[str, float], served: int
) -> None:
    """One kind of client's statements per call, summed by when they run, and named."""
    by_when = _by_when(caused)
    parts = [f"{by_when.get(BEFORE_REPLY, 0.0):.2f} before the reply"]
    parts += [f"{by_when.get(AFTER_REPLY, 0.0):.2f} after it"]
    parts += [f"{by_when.get(BATCHED, 0.0):.3f} in batched writes"]
    if by_when.get(UNKNOWN, 0.0) >= PER_CALL_MIN:
        parts += [f"{by_when[UNKNOWN]:.2f} unclassified (see the table)"]
    named = ", ".join(
        f"{purpose(q).label} {n:.2f}"
        for q, n in sorted(counts.items(), key=lambda x: -x[1])
        if n >= PER_CALL_MIN
    )
    detail = f"{', '.join(parts)} ({named or 'nothing per call'}); {served} calls"
    section.check(f"database statements per call, client with {kind}", None, detail)
    section.row(AREA, f"database statements per call, client with {kind}", ", ".join(parts))


def _by_when(got: dict[str, float]) -> dict[str, float]:
    """Statements per call summed by when they run."""
    sums: dict[str, float] = {}
    for q, n in got.items():
        when = purpose(q).when
        sums[when] = sums.get(when, 0.0) + n
    return sums


def _short(query: str, width: int = 90) -> str:
    text = query.replace("|", "\\|").replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"


def _per_call(n: float) -> str:
    return "0" if abs(n) < 0.0005 else f"{n:.3f}"
