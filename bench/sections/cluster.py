"""Several nodes on PostgreSQL: the provider and echo paths on `storage.backend:
postgresql`, the database statements a call costs, and revocation across nodes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from typing import Any

from bench import common as c
from bench.clients import MODEL_ID, MODEL_NAME
from bench.cluster_nodes import (
    AFTER_REPLY,
    BATCHED,
    BEFORE_REPLY,
    UNKNOWN,
    BenchDatabase,
    PgNode,
    generate_cluster_key,
    purpose,
)
from bench.common import Context, Section
from bench.result import Result, percentile
from bench.servers import REPO, BenchError, FakeProvider, Vibectld, clean_env

TITLE = "Several nodes on PostgreSQL"
AREA = "Cluster (PostgreSQL)"
LATENCY_MS = 20.0  # the fake provider's, as in the provider section
# The targets (issue 14): as the provider section's with SQLite, and against SQLite.
MAX_P50_OVER_RAW_MS = 2.0
MIN_PROVIDER_RPS_RATIO = 0.80
MIN_ECHO_RATIO = 0.70
MAX_PROPAGATION_P99_S = 1.0
ECHO_CALLERS = 16
# server.workers of every node: one serving process, so that the CPU per call read from
# its pid is the whole node's and the SQLite and PostgreSQL nodes are alike (a load
# generator's one connection reaches one worker anyway).
WORKERS = 1
# Revocation: trials, each revoking one client on node A and probing B and C, under an
# open-loop background load on every node (calls/s per node).
TRIALS, QUICK_TRIALS = 50, 8
BACKGROUND_RATE, QUICK_BACKGROUND_RATE = 100.0, 50.0
TRIAL_TIMEOUT_S = 5.0
# Statement counting: calls per client kind, and quiet seconds for the background rate.
COUNT_CALLS, QUICK_COUNT_CALLS = 3000, 400
IDLE_S, QUICK_IDLE_S = 6.0, 3.0
# Usage reaches the database in batches (every 2 s): wait for the batch of the calls.
FLUSH_WAIT_S = 3.0
# A limited client's limits: far above what the load reaches, so nothing is refused and
# the cost measured is the checks'.
LIMITED = {"rpm": 100_000_000, "concurrency": 10_000}
# The environment variables that carry the two nodes' secrets to bench.load.
PG_SECRET_ENV = "VIBECTLD_BENCH_SECRET_PG"  # noqa: S105 - a variable's name, not a secret
SQLITE_SECRET_ENV = "VIBECTLD_BENCH_SECRET_SQLITE"  # noqa: S105 - likewise
LIMITED_SECRET_ENV = "VIBECTLD_BENCH_SECRET_LIMITED"  # noqa: S105 - likewise
LIMITED_SQLITE_SECRET_ENV = "VIBECTLD_BENCH_SECRET_LIMITED_SQLITE"  # noqa: S105 - likewise
PROVIDER_PATHS = {
    "raw": "raw HTTP (aiohttp)",
    "postgresql": "vibectld on PostgreSQL",
    "limits": "vibectld on PostgreSQL, client with rpm + concurrency limits",
}
# A statement is named in a check's line when it runs at least once per 20 calls.
PER_CALL_MIN = 0.05
ROUND_TRIPS_NOTE = """\
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

INTRO = f"""\
vibectld on `storage.backend: postgresql` (PostgreSQL 15 started by the benchmark in a
temporary directory, durable as in production: fsync and synchronous commit on; the
connection string as the `postgresql-dsn` credential in `keys/`), every node with
`server.workers: 1` (one serving process: its CPU per call is the node's). Four
measurements:

1. The provider path (the fake {LATENCY_MS:g} ms OpenAI-compatible endpoint of the provider
   section) through a PostgreSQL node against a raw aiohttp client, measured as the
   provider section does: at 1 caller one process alternates calls between them
   (`--strategy paired`), at 16 callers each is driven closed-loop in turn. Graded: a
   client without limits, as in the provider section; shown beside it, a client with
   rpm and concurrency limits (set far above the load, so nothing is refused), which
   the node checks in the database on every call.
2. Echo at 1 and {ECHO_CALLERS} callers: the PostgreSQL node against an identical node on
   SQLite, the callers moving between the two every second (`--strategy sliced`); and
   the same at {ECHO_CALLERS} callers for a client with limits on each node.
3. The database's work per call: `pg_stat_statements` (preloaded in the benchmark's
   server) counts each top-level statement the nodes send; psycopg sends each one as its
   own round trip (a batch written with executemany is pipelined, so there round trips
   are fewer than statements). The statements of a quiet stretch (heartbeats, the
   change feed's catch-up reads) give a background rate, subtracted from a run of N calls
   of one client (16 callers) and the {FLUSH_WAIT_S:g} s after it (so the batched usage write
   of those calls is counted); the rest, over N, is the statements per call. Once for a
   client without limits, once for one with rpm and concurrency limits (set far above the
   load, so nothing is refused). "server ms per execution" is PostgreSQL's own time
   executing the statement (pg_stat_statements), over the whole measurement.
4. Revocation across nodes: nodes A, B and C on the one database; clients issued on A
   (before B and C start), each revoked through A's admin socket; from the moment the
   revoke request is sent, B and C are called with the revoked secret (one call at a time,
   1 ms apart) until each answers UNAUTHENTICATED, under an open-loop background load of
   calls on all three nodes (`bench/cluster_revoke.py`). The time therefore includes the
   admin call itself; the last column counts from A's reply instead (the revocation
   committed), the feed's own delay."""


def run(ctx: Context) -> Section:
    section = Section("cluster", TITLE, INTRO)
    db = BenchDatabase()
    try:
        db.start()
        key = generate_cluster_key()
        fake = FakeProvider(ctx.procs, LATENCY_MS)
        fake.start()
        endpoint = {"model_id": MODEL_ID, "model_name": MODEL_NAME, "api_base": fake.api_base}
        models = {"default": "echo", "openai_compatible": [endpoint]}
        a = PgNode(
            ctx.procs, ctx.workdir, ctx.sockdir, name="node-a", dsn=db.dsn, cluster_key=key,
            models=models, workers=WORKERS,
        )  # fmt: skip
        pin = a.start_first()
        lite = Vibectld(
            ctx.procs, ctx.workdir, ctx.sockdir, name="sqlite", models=models, workers=WORKERS
        )
        lite.start()
        # A client of each node with rpm and concurrency limits that nothing here reaches.
        limited = {"postgresql": a.issue("limited", **LIMITED)}
        limited["sqlite"] = lite.issue("limited", **LIMITED)
        for node in (a, lite):
            c.warm_up(ctx, node.port, node.ca_path, node.secret)
            c.warm_up(ctx, node.port, node.ca_path, node.secret, model=MODEL_ID)
        ctx.log(f"  PostgreSQL node pid {a.pid}, SQLite node pid {lite.pid}, fake {fake.pid}")
        provider_path(ctx, section, fake.api_base, a, limited["postgresql"])
        echo_against_sqlite(ctx, section, a, lite, limited)
        lite.stop()
        round_trips(ctx, section, db, a, limited["postgresql"])
        propagation(ctx, section, db, a, key, pin, models)
    finally:
        # The nodes first: they hold connections to the database.
        ctx.procs.stop_all()
        db.close()
    return section


# -- 1. the provider path --------------------------------------------------------------


def provider_path(
    ctx: Context, section: Section, api_base: str, node: Vibectld, limited: str
) -> None:
    s = ctx.settings
    duration, warmup = min(s.duration, 3.0), min(s.warmup, 1.0)
    env = clean_env(**{PG_SECRET_ENV: node.secret, LIMITED_SECRET_ENV: limited})
    targets = {
        "raw": c.target("raw", client="raw", api_base=api_base),
        "postgresql": c.target(
            "postgresql", port=node.port, ca=node.ca_path, model=MODEL_ID, pid=node.pid,
            secret_env=PG_SECRET_ENV,
        ),
        "limits": c.target(
            "limits", port=node.port, ca=node.ca_path, model=MODEL_ID, pid=node.pid,
            secret_env=LIMITED_SECRET_ENV,
        ),
    }  # fmt: skip
    one: dict[str, list[Result]] = {}
    many: dict[str, list[Result]] = {}
    for rep in range(s.repeats):
        # One caller alternating single calls between the three.
        args = ["--mode", "unary", "--warmup", str(warmup), "--strategy", "paired"]
        args += ["--duration", str(3 * duration)] + [a for t in targets.values() for a in t]
        c.collect(ctx, section, one, c.measure_load(args, env=env), f"provider x1  rep {rep + 1}")
        order = list(targets)
        for name in order[rep % 3 :] + order[: rep % 3]:
            args = ["--mode", "unary", "--warmup", str(warmup), "--callers", "16"]
            args += ["--duration", str(duration), *targets[name]]
            tag = f"provider x16 rep {rep + 1}"
            c.collect(ctx, section, many, c.measure_load(args, env=env), tag)
    header = [
        "path", "callers", "req/s", "vs raw", "p50 ms", "p99 ms", "p50 over raw ms",
        "vibectld CPU us/req", "errors",
    ]  # fmt: skip
    rows = []
    for callers, got in ((1, one), (16, many)):
        for path in targets:
            rs, base = got[path], got["raw"]
            over = (
                c.paired_delta(base, rs, "p50_ms")
                if callers == 1
                else (c.median_of(rs, "p50_ms") - c.median_of(base, "p50_ms"))
            )
            rows.append([
                PROVIDER_PATHS[path], str(callers), f"{c.median_of(rs, 'rps'):.0f}",
                c.pct(c.median_of(rs, "rps") / c.median_of(base, "rps")),
                c.fmt(c.median_of(rs, "p50_ms")), c.fmt(c.median_of(rs, "p99_ms")),
                f"{over:+.2f}", c.fmt(c.median_of(rs, "server_cpu_us_per_req"), ".0f"),
                str(c.total(rs, "errors")),
            ])  # fmt: skip
    section.tables.append(c.md_table(header, rows))

    v, r = c.median_of(one["postgresql"], "p50_ms"), c.median_of(one["raw"], "p50_ms")
    over = c.paired_delta(one["raw"], one["postgresql"], "p50_ms")
    ok = not math.isnan(over) and over <= MAX_P50_OVER_RAW_MS
    target = f"<= +{MAX_P50_OVER_RAW_MS:g} ms"
    section.graded(
        "PostgreSQL node, provider latency (unary, 1 caller)", ok,
        f"vibectld p50 {v:.2f} ms vs raw {r:.2f} ms: {over:+.2f} ms (target {target})",
        (AREA, "provider p50 at 1 caller, over a raw HTTP client", f"{over:+.2f} ms "
         f"({v:.2f} vs {r:.2f})", target),
    )  # fmt: skip
    v, r = c.median_of(many["postgresql"], "rps"), c.median_of(many["raw"], "rps")
    ratio = v / r
    ok = ratio >= MIN_PROVIDER_RPS_RATIO
    target = f">= {MIN_PROVIDER_RPS_RATIO:.0%}"
    section.graded(
        "PostgreSQL node, provider throughput (unary, 16 callers)", ok,
        f"vibectld {v:.0f} req/s = {ratio:.0%} of raw {r:.0f} (target {target})",
        (AREA, "provider req/s at 16 callers, vs a raw HTTP client",
         f"{ratio:.0%} ({v:.0f} vs {r:.0f})", target),
    )  # fmt: skip
    # The same with cluster-wide limits: no target of its own, what the round trips cost.
    lim_over = c.paired_delta(one["postgresql"], one["limits"], "p50_ms")
    lim = c.median_of(many["limits"], "rps")
    result = f"p50 {lim_over:+.2f} ms at 1 caller; {lim / r:.0%} of raw at 16 ({lim:.0f} req/s)"
    section.check(
        "PostgreSQL node, provider path of a client with rpm + concurrency limits", None,
        f"{result}; the p50 difference is over the same node's client without limits",
    )  # fmt: skip
    section.row(AREA, "provider path, client with rpm + concurrency limits", result)


# -- 2. echo against the same node on SQLite -------------------------------------------


def echo_against_sqlite(
    ctx: Context, section: Section, pg: Vibectld, lite: Vibectld, limited: dict[str, str]
) -> None:
    s = ctx.settings
    env = clean_env(**{
        PG_SECRET_ENV: pg.secret, SQLITE_SECRET_ENV: lite.secret,
        LIMITED_SECRET_ENV: limited["postgresql"], LIMITED_SQLITE_SECRET_ENV: limited["sqlite"],
    })  # fmt: skip
    secret_envs = {
        "no limits": {"sqlite": SQLITE_SECRET_ENV, "postgresql": PG_SECRET_ENV},
        "limits": {"sqlite": LIMITED_SQLITE_SECRET_ENV, "postgresql": LIMITED_SECRET_ENV},
    }
    nodes = {"sqlite": lite, "postgresql": pg}
    # The graded pair (no limits, 16 callers), its latency at 1 caller, and for
    # information the same with a client whose limits are enforced (in memory on SQLite,
    # in the database on PostgreSQL).
    configs = (("no limits", 1), ("no limits", ECHO_CALLERS), ("limits", ECHO_CALLERS))
    cells: dict[tuple[str, int], dict[str, list[Result]]] = {}
    for client, callers in configs:
        got = cells[(client, callers)] = {}
        targets = {
            name: c.target(
                name, port=node.port, ca=node.ca_path, pid=node.pid,
                secret_env=secret_envs[client][name],
            )
            for name, node in nodes.items()
        }  # fmt: skip
        for rep in range(s.repeats):
            order = ["sqlite", "postgresql"] if rep % 2 == 0 else ["postgresql", "sqlite"]
            if callers == 1:
                args = ["--strategy", "paired", "--duration", str(1.5 * s.duration)]
            else:
                args = ["--strategy", "sliced", "--callers", str(callers), "--slice", "1"]
                args += ["--duration", str(2 * s.duration)]
            args += [*targets[order[0]], *targets[order[1]], "--warmup", str(s.warmup)]
            tag = f"echo {client} x{callers:<3} rep {rep + 1}"
            c.collect(ctx, section, got, c.measure_load(args, env=env), tag)
    header = [
        "client", "callers", "SQLite req/s", "PostgreSQL req/s", "ratio",
        "SQLite p50 / p99 ms", "PostgreSQL p50 / p99 ms", "p50 delta ms",
        "server CPU us/req SQLite / PostgreSQL", "errors",
    ]  # fmt: skip
    rows = []
    for (client, callers), got in cells.items():
        lt, pt = got["sqlite"], got["postgresql"]
        cpu = "server_cpu_us_per_req"
        rows.append([
            client, str(callers), f"{c.median_of(lt, 'rps'):.0f}",
            f"{c.median_of(pt, 'rps'):.0f}", c.pct(c.paired_ratio(lt, pt, "rps")),
            _p50_p99(lt), _p50_p99(pt), f"{c.paired_delta(lt, pt, 'p50_ms'):+.3f}",
            f"{c.fmt(c.median_of(lt, cpu), '.0f')} / {c.fmt(c.median_of(pt, cpu), '.0f')}",
            f"{c.total(lt, 'errors')} / {c.total(pt, 'errors')}",
        ])  # fmt: skip
    section.tables.append(c.md_table(header, rows))
    for client in ("no limits", "limits"):
        lt, pt = (
            cells[(client, ECHO_CALLERS)]["sqlite"],
            cells[(client, ECHO_CALLERS)]["postgresql"],
        )
        ratio = c.paired_ratio(lt, pt, "rps")
        vp, vl = c.median_of(pt, "rps"), c.median_of(lt, "rps")
        detail = f"{vp:.0f} req/s = {ratio:.0%} of the SQLite node's {vl:.0f}"
        result = f"{ratio:.0%} ({vp:.0f} vs {vl:.0f})"
        if client == "limits":
            name = f"PostgreSQL node, echo ({ECHO_CALLERS} callers) vs SQLite, client with limits"
            section.check(name, None, f"{detail}; rpm and concurrency checked in the database")
            measure = f"echo req/s at {ECHO_CALLERS} callers vs SQLite, client with limits"
            section.row(AREA, measure, result)
            continue
        ok = ratio >= MIN_ECHO_RATIO
        target = f">= {MIN_ECHO_RATIO:.0%}"
        section.graded(
            f"PostgreSQL node, echo throughput ({ECHO_CALLERS} callers) vs SQLite", ok,
            f"{detail} (target {target})",
            (AREA, f"echo req/s at {ECHO_CALLERS} callers, vs the same node on SQLite", result,
             target),
        )  # fmt: skip


def _p50_p99(rs: list[Result]) -> str:
    return f"{c.fmt(c.median_of(rs, 'p50_ms'), '.3f')} / {c.fmt(c.median_of(rs, 'p99_ms'), '.3f')}"


# -- 3. statements per call ------------------------------------------------------------


def round_trips(
    ctx: Context, section: Section, db: BenchDatabase, node: Vibectld, limited: str
) -> None:
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
    whole = db.statements() - first
    queries = sorted(
        set(idle) | {q for d in per_call.values() for q in d},
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
    for kind, got in per_call.items():
        # The periodic statements (seen in the quiet stretch too) are per second, not per
        # call: left out here, so that the batched writes the calls cause are not netted
        # against the quiet stretch's sampling error.
        by_when = _by_when({q: n for q, n in got.items() if q not in idle})
        parts = [f"{by_when.get(BEFORE_REPLY, 0.0):.2f} before the reply"]
        parts += [f"{by_when.get(AFTER_REPLY, 0.0):.2f} after it"]
        parts += [f"{by_when.get(BATCHED, 0.0):.3f} in batched writes"]
        if by_when.get(UNKNOWN, 0.0) >= PER_CALL_MIN:
            parts += [f"{by_when[UNKNOWN]:.2f} unclassified (see the table)"]
        named = ", ".join(
            f"{purpose(q).label} {n:.2f}"
            for q, n in sorted(got.items(), key=lambda x: -x[1])
            if n >= PER_CALL_MIN
        )
        detail = f"{', '.join(parts)} ({named or 'nothing per call'}); {served[kind]} calls"
        section.check(f"database statements per call, client with {kind}", None, detail)
        section.row(AREA, f"database statements per call, client with {kind}", ", ".join(parts))
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
    section.notes.append(ROUND_TRIPS_NOTE)


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


# -- 4. revocation across nodes ---------------------------------------------------------


def propagation(
    ctx: Context,
    section: Section,
    db: BenchDatabase,
    a: PgNode,
    key: str,
    pin: str,
    models: dict[str, Any],
) -> None:
    s = ctx.settings
    trials = QUICK_TRIALS if s.quick else TRIALS
    rate = QUICK_BACKGROUND_RATE if s.quick else BACKGROUND_RATE
    # Issued before B and C start, so that each node knows them from its first load.
    victims = [[f"victim-{i}", a.issue(f"victim-{i}")] for i in range(trials)]
    others: list[PgNode] = []
    for name in ("node-b", "node-c"):
        node = PgNode(
            ctx.procs, ctx.workdir, ctx.sockdir, name=name, dsn=db.dsn, cluster_key=key,
            models=dict(models), workers=WORKERS,
        )  # fmt: skip
        node.start(issue=False)
        node.trust(pin)
        others.append(node)
    ctx.log(f"  nodes: a pid {a.pid}, " + ", ".join(f"{n.name} pid {n.pid}" for n in others))
    argv = [sys.executable, "-m", "bench.cluster_revoke", "--admin", str(a.socket)]
    argv += ["--rate", f"{rate:g}", "--timeout", f"{TRIAL_TIMEOUT_S:g}"]
    for n in others:
        argv += ["--probe", f"{n.name}:{n.port}:{n.ca_path}"]
    for n in (a, *others):
        argv += ["--load", f"{n.name}:{n.port}:{n.ca_path}"]
    env = clean_env(VIBECTLD_BENCH_SECRET=a.secret, VIBECTLD_BENCH_VICTIMS=json.dumps(victims))
    budget = trials * (TRIAL_TIMEOUT_S + 2) + 60
    try:
        out = subprocess.run(
            argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"bench.cluster_revoke did not finish within {budget:.0f} s") from None
    try:
        got = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(
            f"bench.cluster_revoke failed (exit {out.returncode}): {out.stderr.strip()[-1500:]}"
        ) from None
    report_propagation(section, got, rate)


def report_propagation(section: Section, got: dict[str, object], rate: float) -> None:
    trials = got["trials"]
    assert isinstance(trials, list)
    load = got["load"]
    assert isinstance(load, dict)
    aborted = got["aborted"]
    if isinstance(aborted, str) and aborted.startswith("before revocation"):
        # The nodes did not honour each other's secrets: nothing here measures revocation.
        section.failures.append(f"revocation across nodes: {aborted}")
    elif aborted:
        section.notes.append(f"revocation across nodes: {aborted}")
    by_node: dict[str, list[float]] = {}
    # The same counted from node A's reply to the revoke (the change committed): the
    # feed's own delay. Negative when B refused before A's reply reached the client.
    after_reply: dict[str, list[float]] = {}
    for t in trials:
        for name, seconds in t["nodes"].items():
            by_node.setdefault(name, []).append(math.inf if seconds is None else seconds)
            after = math.inf if seconds is None else seconds - t["admin_s"]
            after_reply.setdefault(name, []).append(after)
    admin_ms = [t["admin_s"] * 1000 for t in trials]
    header = ["node", "trials", "refused within the timeout", "p50 ms", "p99 ms", "max ms"]
    header += ["after A's reply: p50 / p99 ms"]
    rows = [_propagation_row(n, by_node[n], after_reply[n]) for n in by_node]
    every = [x for times in by_node.values() for x in times]
    if every:
        rows.append(_propagation_row("all", every, [x for v in after_reply.values() for x in v]))
    section.tables.append(c.md_table(header, rows))
    served = sum(int(n["ok"]) for n in load.values())
    errors = sum(int(n["errors"]) for n in load.values())
    load_s = float(str(got["load_seconds"]))
    section.check(
        "background load during the revocations", None,
        f"{served} calls served, {errors} failed over {load_s:.0f} s on {len(load)} nodes "
        f"({rate:g} calls/s per node, open loop)",
    )  # fmt: skip
    if errors:
        samples = [x for n in load.values() for x in n["samples"]]
        section.failures.append(f"background load during the revocations: {errors} failed, "
                                f"e.g. {samples[:3]}")  # fmt: skip
    if admin_ms:
        section.check(
            "revoke-client on node A (the admin call, included above)", None,
            f"p50 {percentile(admin_ms, 50):.1f} ms, p99 {percentile(admin_ms, 99):.1f} ms",
        )  # fmt: skip
    if not every:
        section.graded(
            "revocation propagation across nodes", False, "not measured (no trial ran)",
            (AREA, "revocation propagation to other nodes, p50 / p99", "not measured",
             f"p99 <= {MAX_PROPAGATION_P99_S:g} s"),
        )  # fmt: skip
        return
    p50, p99 = _pct(every, 50), _pct(every, 99)
    ok = p99 <= MAX_PROPAGATION_P99_S
    result = f"{_ms(p50)} / {_ms(p99)} ({len(every)} probes)"
    section.graded(
        "revocation propagation across nodes (under load)", ok,
        f"p50 {_ms(p50)}, p99 {_ms(p99)} over {len(trials)} revocations x "
        f"{len(by_node)} nodes (target p99 <= {MAX_PROPAGATION_P99_S:g} s)",
        (AREA, "revocation on node A refused on B and C, p50 / p99", result,
         f"p99 <= {MAX_PROPAGATION_P99_S:g} s"),
    )  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    """A percentile where a probe that never saw the refusal counts as infinitely late."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(seconds: float) -> str:
    # round() to an int: no "-0 ms" for a refusal a fraction of a ms before A's reply.
    return f"> {TRIAL_TIMEOUT_S:g} s" if math.isinf(seconds) else f"{round(seconds * 1000)} ms"


def _propagation_row(name: str, times: list[float], after: list[float]) -> list[str]:
    seen = sum(1 for x in times if not math.isinf(x))
    return [
        name, str(len(times)), str(seen), _ms(_pct(times, 50)), _ms(_pct(times, 99)),
        _ms(max(times)), f"{_ms(_pct(after, 50))} / {_ms(_pct(after, 99))}",
    ]  # fmt: skip
