"""Several nodes on PostgreSQL: the provider and echo paths on `storage.backend:
postgresql` (here), the database statements a call costs (cluster_statements.py), and
revocation across nodes (cluster_revocation.py)."""

from __future__ import annotations

from bench import common as c
from bench.clients import MODEL_ID, MODEL_NAME
from bench.cluster_nodes import AREA, BenchDatabase, PgNode, generate_cluster_key
from bench.common import Context, Section
from bench.result import Result
from bench.sections import cluster_revocation, cluster_statements
from bench.sections.cluster_statements import FLUSH_WAIT_S
from bench.servers import FakeProvider, Vibectld, clean_env

TITLE = "Several nodes on PostgreSQL"
LATENCY_MS = 20.0  # the fake provider's, as in the provider section
# The targets (issue 14): as the provider section's with SQLite, and against SQLite.
MAX_P50_OVER_RAW_MS = 2.0
MIN_PROVIDER_RPS_RATIO = 0.80
MIN_ECHO_RATIO = 0.70
ECHO_CALLERS = 16
# server.workers of every node: one serving process, so that the CPU per call read from
# its pid is the whole node's and the SQLite and PostgreSQL nodes are alike (a load
# generator's one connection reaches one worker anyway).
WORKERS = 1
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
Cells = dict[tuple[str, int], dict[str, list[Result]]]

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
        one, many = measure_provider(ctx, section, fake.api_base, a, limited["postgresql"])
        report_provider(section, one, many)
        report_echo(section, measure_echo(ctx, section, a, lite, limited))
        lite.stop()
        cluster_statements.run(ctx, section, db, a, limited["postgresql"])
        cluster_revocation.run(ctx, section, db, a, key, pin, models)
    finally:
        # The nodes first: they hold connections to the database.
        ctx.procs.stop_all()
        db.close()
    return section


# -- 1. the provider path --------------------------------------------------------------


def measure_provider(
    ctx: Context, section: Section, api_base: str, node: Vibectld, limited: str
) -> tuple[dict[str, list[Result]], dict[str, list[Result]]]:
    """Each path's results at 1 caller (measured together) and at 16 (in turn)."""
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
    return one, many


def report_provider(
    section: Section, one: dict[str, list[Result]], many: dict[str, list[Result]]
) -> None:
    header = [
        "path", "callers", "req/s", "vs raw", "p50 ms", "p99 ms", "p50 over raw ms",
        "vibectld CPU us/req", "errors",
    ]  # fmt: skip
    rows = []
    for callers, got in ((1, one), (16, many)):
        for path in PROVIDER_PATHS:
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
    vs = c.Versus(
        "PostgreSQL node, provider latency (unary, 1 caller)",
        AREA,
        "provider p50 at 1 caller, over a raw HTTP client",
        "vibectld p50",
        "raw",
    )
    v, r = c.median_of(one["postgresql"], "p50_ms"), c.median_of(one["raw"], "p50_ms")
    over = c.paired_delta(one["raw"], one["postgresql"], "p50_ms")
    c.grade_ms_over(section, vs, v, r, over, MAX_P50_OVER_RAW_MS)
    vs = c.Versus(
        "PostgreSQL node, provider throughput (unary, 16 callers)",
        AREA,
        "provider req/s at 16 callers, vs a raw HTTP client",
        "vibectld",
        "raw",
    )
    v, r = c.median_of(many["postgresql"], "rps"), c.median_of(many["raw"], "rps")
    c.grade_share(section, vs, v, r, v / r, MIN_PROVIDER_RPS_RATIO)
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


def measure_echo(
    ctx: Context, section: Section, pg: Vibectld, lite: Vibectld, limited: dict[str, str]
) -> Cells:
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
    cells: Cells = {}
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
            order = c.in_turn(rep, ["sqlite", "postgresql"])
            args = c.head_to_head(callers, s.duration)
            args += [*targets[order[0]], *targets[order[1]], "--warmup", str(s.warmup)]
            tag = f"echo {client} x{callers:<3} rep {rep + 1}"
            c.collect(ctx, section, got, c.measure_load(args, env=env), tag)
    return cells


def report_echo(section: Section, cells: Cells) -> None:
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
    plain, limited = cells[("no limits", ECHO_CALLERS)], cells[("limits", ECHO_CALLERS)]
    lt, pt = plain["sqlite"], plain["postgresql"]
    vs = c.Versus(f"PostgreSQL node, echo throughput ({ECHO_CALLERS} callers) vs SQLite", AREA,
                  f"echo req/s at {ECHO_CALLERS} callers, vs the same node on SQLite",
                  "PostgreSQL node", "the SQLite node's")  # fmt: skip
    vp, vl = c.median_of(pt, "rps"), c.median_of(lt, "rps")
    c.grade_share(section, vs, vp, vl, c.paired_ratio(lt, pt, "rps"), MIN_ECHO_RATIO)
    # With limits: for information (rpm and concurrency checked in the database).
    lt, pt = limited["sqlite"], limited["postgresql"]
    ratio = c.paired_ratio(lt, pt, "rps")
    vp, vl = c.median_of(pt, "rps"), c.median_of(lt, "rps")
    detail = f"{vp:.0f} req/s = {ratio:.0%} of the SQLite node's {vl:.0f}"
    name = f"PostgreSQL node, echo ({ECHO_CALLERS} callers) vs SQLite, client with limits"
    section.check(name, None, f"{detail}; rpm and concurrency checked in the database")
    measure = f"echo req/s at {ECHO_CALLERS} callers vs SQLite, client with limits"
    section.row(AREA, measure, f"{ratio:.0%} ({vp:.0f} vs {vl:.0f})")


def _p50_p99(rs: list[Result]) -> str:
    return f"{c.fmt(c.median_of(rs, 'p50_ms'), '.3f')} / {c.fmt(c.median_of(rs, 'p99_ms'), '.3f')}"
