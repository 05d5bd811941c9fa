"""Revocation across nodes: revoke a client on one node, time until the others refuse it.

    VIBECTLD_BENCH_SECRET=... VIBECTLD_BENCH_VICTIMS='[["v1", "<secret>"], ...]' \\
    python -m bench.cluster_revoke --admin A.sock --probe b:PORT:CA --probe c:PORT:CA \\
        --load a:PORT:CA --load b:PORT:CA --load c:PORT:CA --rate 100

Each victim (a client issued before the run, its secret honoured by every probed node)
is revoked through the first node's admin socket. From the moment the revoke request is
sent, every probed node is called with the victim's secret, one call at a time with a
1 ms pause, until it answers UNAUTHENTICATED: that reply's arrival, counted from the
request, is the node's propagation time for the trial (so it includes the admin call
itself, a conservative measure). Before each trial every probed node must still serve
the victim: a node that refuses it already says nothing about propagation.

Meanwhile a background load calls every --load node at --rate calls per second each
(open loop, the bench client's secret), so the nodes revoke while serving. The secrets
come from the environment, never argv. Prints one JSON object (see `main`).

This runs in its own process: the orchestrator starts children with preexec_fn and so
must not start gRPC's threads itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.admin.client import AdminClient, AdminClientError

HOST = "127.0.0.1"
PROBE_PAUSE_S = 0.001
MAX_OUTSTANDING = 512  # background calls in flight per node; past it a tick is skipped
# Trials in a row that see no refusal on any node before the run gives up.
GIVE_UP_AFTER = 3


@dataclass(frozen=True)
class Node:
    name: str
    port: int
    ca: Path


def _node(text: str) -> Node:
    name, port, ca = text.split(":", 2)
    return Node(name, int(port), Path(ca))


@dataclass
class LoadCount:
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    samples: list[str] = field(default_factory=list)


class Caller:
    """One channel to one node; Execute with a given secret, the status code back."""

    def __init__(self, node: Node) -> None:
        self.node = node
        creds = grpc.ssl_channel_credentials(root_certificates=node.ca.read_bytes())
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.aio.secure_channel(f"{HOST}:{node.port}", creds, options=options)
        self.stub = pb_grpc.VibectlLLMProxyStub(self.channel)

    async def call(self, secret: str, within: float = 10.0) -> grpc.StatusCode:
        try:
            await self.stub.Execute(
                pb.ExecuteRequest(user_fragments=["ping"]),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=within,
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    async def close(self) -> None:
        await self.channel.close()


async def background(caller: Caller, secret: str, rate: float, count: LoadCount) -> None:
    """Calls at `rate` per second, each its own task, until cancelled.

    Not bench.load's open loop (`--rate`): that one runs for a set duration and reports
    when it ends, while this load must last exactly as long as the trials, whose length
    is known only when the last node refuses, and it only counts status codes."""
    outstanding: set[asyncio.Task[None]] = set()

    async def one() -> None:
        code = await caller.call(secret)
        if code == grpc.StatusCode.OK:
            count.ok += 1
            return
        count.errors += 1
        if len(count.samples) < 5:
            count.samples.append(code.name)

    start = time.perf_counter()
    n = 0
    try:
        while True:
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            if len(outstanding) >= MAX_OUTSTANDING:
                count.skipped += 1
                continue
            task = asyncio.create_task(one())
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
    finally:
        for task in outstanding:
            task.cancel()
        await asyncio.gather(*outstanding, return_exceptions=True)


async def until_refused(caller: Caller, secret: str, t0: float, limit: float) -> float | None:
    """Seconds from t0 to the first UNAUTHENTICATED reply, or None after `limit` s."""
    while True:
        left = t0 + limit - time.perf_counter()
        if left <= 0:
            return None
        code = await caller.call(secret, within=max(left, 0.1))
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return time.perf_counter() - t0
        await asyncio.sleep(PROBE_PAUSE_S)


def revoke(socket: Path, name: str) -> float:
    """Revoke `name` through the admin socket; perf_counter() once it answered."""
    with AdminClient(socket, timeout=30) as admin:
        admin.call("revoke_client", {"target": name, "reason": "bench"})
    return time.perf_counter()


async def run(args: argparse.Namespace, secret: str, victims: list[list[str]]) -> dict[str, Any]:
    probes = [Caller(n) for n in args.probe]
    loads = [Caller(n) for n in args.load]
    counts = {c.node.name: LoadCount() for c in loads}
    workers = [
        asyncio.create_task(background(c, secret, args.rate, counts[c.node.name])) for c in loads
    ]
    trials: list[dict[str, Any]] = []
    aborted: str | None = None
    began = time.perf_counter()
    try:
        # Let the background load reach its pace before the first trial.
        await asyncio.sleep(args.settle)
        misses = 0
        for name, victim in victims:
            codes = await asyncio.gather(*(p.call(victim) for p in probes))
            refusing = [f"{p.node.name}: {c.name}" for p, c in zip(probes, codes, strict=True)]
            if any(c != grpc.StatusCode.OK for c in codes):
                aborted = (
                    f"before revocation the victim {name}, issued on the first node, was not "
                    f"served by every node ({', '.join(refusing)})"
                )
                break
            t0 = time.perf_counter()
            revoked = asyncio.create_task(asyncio.to_thread(revoke, args.admin, name))
            seen = await asyncio.gather(
                *(until_refused(p, victim, t0, args.timeout) for p in probes)
            )
            try:
                admin_done = await revoked
            except AdminClientError as e:
                aborted = f"revoke-client {name} failed on the first node: {e.message}"
                break
            trials.append(
                {
                    "victim": name,
                    "admin_s": admin_done - t0,
                    "nodes": {p.node.name: s for p, s in zip(probes, seen, strict=True)},
                }
            )
            misses = misses + 1 if all(s is None for s in seen) else 0
            if misses >= GIVE_UP_AFTER:
                aborted = (
                    f"no node refused a revoked secret within {args.timeout:g} s in "
                    f"{GIVE_UP_AFTER} trials in a row; stopped"
                )
                break
            # A random pause, so trials do not fall in step with a periodic catch-up read.
            await asyncio.sleep(args.pause * (0.5 + random.random()))
    finally:
        seconds = time.perf_counter() - began
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in probes + loads))
    return {
        "trials": trials,
        "aborted": aborted,
        "load_seconds": seconds,
        "load": {
            n: {"ok": c.ok, "errors": c.errors, "skipped": c.skipped, "samples": c.samples}
            for n, c in counts.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_revoke", description=__doc__)
    p.add_argument("--admin", type=Path, required=True, help="the revoking node's admin socket")
    p.add_argument("--probe", type=_node, action="append", required=True, help="NAME:PORT:CA")
    p.add_argument("--load", type=_node, action="append", default=[], help="NAME:PORT:CA")
    p.add_argument("--rate", type=float, default=100.0, help="background calls/s per node")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds a trial waits per node")
    p.add_argument("--pause", type=float, default=0.2, help="mean seconds between trials")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of load before trial 1")
    args = p.parse_args(argv)
    secret = os.environ["VIBECTLD_BENCH_SECRET"]
    victims = json.loads(os.environ["VIBECTLD_BENCH_VICTIMS"])
    print(json.dumps(asyncio.run(run(args, secret, victims))), flush=True)


if __name__ == "__main__":
    main()
