"""The cluster section's fourth measurement: revocation across nodes.

Nodes B and C join node A on the one database; bench/cluster_revoke.py revokes clients
through A's admin socket and times until B and C refuse each, under a background load on
all three. This module starts the nodes and that process, and reports what it printed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

from bench import common as c
from bench.cluster_nodes import AREA, BenchDatabase, PgNode
from bench.common import Context, Section
from bench.result import percentile
from bench.servers import REPO, BenchError, clean_env

# Trials, each revoking one client on node A and probing B and C, under an open-loop
# background load on every node (calls/s per node).
TRIALS, QUICK_TRIALS = 50, 8
BACKGROUND_RATE, QUICK_BACKGROUND_RATE = 100.0, 50.0
TRIAL_TIMEOUT_S = 5.0
MAX_PROPAGATION_P99_S = 1.0  # the target (issue 14)


def run(
    ctx: Context, section: Section, db: BenchDatabase, a: PgNode, key: str, pin: str,
    models: dict[str, Any],
) -> None:  # fmt: skip
    s = ctx.settings
    trials = QUICK_TRIALS if s.quick else TRIALS
    rate = QUICK_BACKGROUND_RATE if s.quick else BACKGROUND_RATE
    # Issued before B and C start, so that each node knows them from its first load.
    victims = [[f"victim-{i}", a.issue(f"victim-{i}")] for i in range(trials)]
    others: list[PgNode] = []
    for name in ("node-b", "node-c"):
        node = PgNode(
            ctx.procs, ctx.workdir, ctx.sockdir, name=name, dsn=db.dsn, cluster_key=key,
            models=dict(models), workers=a.workers,
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
    report(section, got, rate)


def report(section: Section, got: dict[str, object], rate: float) -> None:
    trials = got["trials"]
    assert isinstance(trials, list)
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
    header = ["node", "trials", "refused within the timeout", "p50 ms", "p99 ms", "max ms"]
    header += ["after A's reply: p50 / p99 ms"]
    rows = [_row(n, by_node[n], after_reply[n]) for n in by_node]
    every = [x for times in by_node.values() for x in times]
    if every:
        rows.append(_row("all", every, [x for v in after_reply.values() for x in v]))
    section.tables.append(c.md_table(header, rows))
    _background(section, got, rate)
    admin_ms = [t["admin_s"] * 1000 for t in trials]
    if admin_ms:
        section.check(
            "revoke-client on node A (the admin call, included above)", None,
            f"p50 {percentile(admin_ms, 50):.1f} ms, p99 {percentile(admin_ms, 99):.1f} ms",
        )  # fmt: skip
    _grade(section, every, len(trials), len(by_node))


def _background(section: Section, got: dict[str, object], rate: float) -> None:
    """The load the nodes served meanwhile: any failed call is a measurement error."""
    load = got["load"]
    assert isinstance(load, dict)
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


def _grade(section: Section, every: list[float], trials: int, nodes: int) -> None:
    target = f"p99 <= {MAX_PROPAGATION_P99_S:g} s"
    if not every:
        section.graded(
            "revocation propagation across nodes", False, "not measured (no trial ran)",
            (AREA, "revocation propagation to other nodes, p50 / p99", "not measured", target),
        )  # fmt: skip
        return
    p50, p99 = _pct(every, 50), _pct(every, 99)
    ok = p99 <= MAX_PROPAGATION_P99_S
    result = f"{_ms(p50)} / {_ms(p99)} ({len(every)} probes)"
    section.graded(
        "revocation propagation across nodes (under load)", ok,
        f"p50 {_ms(p50)}, p99 {_ms(p99)} over {trials} revocations x {nodes} nodes "
        f"(target {target})",
        (AREA, "revocation on node A refused on B and C, p50 / p99", result, target),
    )  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    """A percentile where a probe that never saw the refusal counts as infinitely late:
    the nearest rank, since bench.result's interpolation between two ranks is not a
    number once one of them is infinite."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def _ms(seconds: float) -> str:
    # round() to an int: no "-0 ms" for a refusal a fraction of a ms before A's reply.
    return f"> {TRIAL_TIMEOUT_S:g} s" if math.isinf(seconds) else f"{round(seconds * 1000)} ms"


def _row(name: str, times: list[float], after: list[float]) -> list[str]:
    seen = sum(1 for x in times if not math.isinf(x))
    return [
        name, str(len(times)), str(seen), _ms(_pct(times, 50)), _ms(_pct(times, 99)),
        _ms(max(times)), f"{_ms(_pct(after, 50))} / {_ms(_pct(after, 99))}",
    ]  # fmt: skip
