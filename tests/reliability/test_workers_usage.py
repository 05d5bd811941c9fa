"""Usage is exact across workers when the main process is killed with SIGKILL mid-load.

`server.workers: 2`, real processes (tests/reliability/_procs.py), the `echo` model.
Eight client threads, each on a connection of its own (so the kernel spreads them over
both workers), call Execute and StreamExecute back to back for a few seconds; the main
process is then killed with SIGKILL. Its workers stop on their own; the daemon is started
again on the same state directory (its usage journal is replayed before it serves).

Then, per client, `vibectl-admin usage` must equal the calls that client saw succeed
(an OK status, every stream read to its end), exactly: a call that answered OK is in its
worker's own usage file if the main process never journalled it, and the replay counts
it from there once (workers/journal_files.py); a call that failed must not be counted.
Run with several kill moments. The replay's rules (which worker lines count, after a
flush deleted segments) are tested on real files in tests/unit/test_worker_journal.py.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from tests.reliability._procs import DaemonProcess, auth
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(300)

CLIENTS = 4
THREADS_PER_CLIENT = 2  # one calls Execute, the other StreamExecute
ROUNDS = 3


@dataclass
class Load:
    """One client thread's calls: what it saw succeed, and how the others ended."""

    name: str
    secret: str
    stream: bool
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)


def one_call(stub: pb_grpc.VibectlLLMProxyStub, load: Load, n: int) -> str:
    request = pb.ExecuteRequest(user_fragments=[f"call {n}"], model_name="echo")
    try:
        if load.stream:
            for chunk in stub.StreamExecute(request, metadata=auth(load.secret), timeout=20):
                if chunk.HasField("error"):
                    return f"MODEL:{chunk.error.error_code}"
            return "OK"  # read to its end: the status was OK
        reply = stub.Execute(request, metadata=auth(load.secret), timeout=20)
    except grpc.RpcError as e:
        return str(e.code().name)
    return f"MODEL:{reply.error.error_code}" if reply.HasField("error") else "OK"


def drive(d: DaemonProcess, load: Load, stop: threading.Event) -> None:
    ca = (d.state_dir / "tls" / "ca.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.use_local_subchannel_pool", 1)]
    n = 0
    while not stop.is_set():
        # A connection per thread (and a new one once the daemon is gone): each lands on
        # a worker the kernel picks.
        with grpc.secure_channel(f"localhost:{d.port}", creds, options=options) as channel:
            stub = pb_grpc.VibectlLLMProxyStub(channel)
            while not stop.is_set():
                n += 1
                outcome = one_call(stub, load, n)
                if outcome == "OK":
                    load.ok += 1
                else:
                    load.failed[outcome] += 1
                    time.sleep(0.02)  # the daemon is going: no busy loop of refusals
                    break


def usage_by_name(d: DaemonProcess) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for row in d.admin("usage")["usage"]:
        totals[row["name"]] += int(row["requests"])
    return dict(totals)


def worker_pids(d: DaemonProcess) -> list[int]:
    return [int(row["pid"]) for row in d.admin("status")["workers"] if row["pid"]]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_usage_equals_calls_seen_ok_after_kill_9_of_the_main_process(tmp_path: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    with DaemonProcess(tmp_path, server={"workers": 2}) as daemon:
        daemon.start()
        secrets = {f"c{i}": daemon.issue(f"c{i}") for i in range(CLIENTS)}
        expected: Counter[str] = Counter()
        report: list[str] = []
        for round_ in range(ROUNDS):
            pids = worker_pids(daemon)
            assert len(pids) == 2, pids
            loads = [
                Load(name, secret, stream=t % 2 == 1)
                for name, secret in secrets.items()
                for t in range(THREADS_PER_CLIENT)
            ]
            stop = threading.Event()
            threads = [threading.Thread(target=drive, args=(daemon, ld, stop)) for ld in loads]
            for t in threads:
                t.start()
            time.sleep(1.5 + rng.random() * 2)  # the kill lands in varied states
            daemon.kill()
            killed = time.monotonic()
            # Every worker follows its main process out; the clients' calls fail meanwhile.
            while not all(gone(p) for p in pids) and time.monotonic() - killed < 30:
                time.sleep(0.05)
            assert all(gone(p) for p in pids), "a worker outlived its main process"
            workers_gone = time.monotonic() - killed
            stop.set()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a client thread hung"

            for ld in loads:
                expected[ld.name] += ld.ok
            failed: Counter[str] = Counter()
            for ld in loads:
                failed.update(ld.failed)
            # Only the daemon's going away may fail a call (with a status: UNAVAILABLE
            # mostly), never the model.
            assert not [f for f in failed if f.startswith("MODEL:")], failed

            daemon.start()
            usage = usage_by_name(daemon)
            served = sum(ld.ok for ld in loads)
            report.append(
                f"round {round_}: {served} calls OK, failed {dict(failed)}, workers gone "
                f"{workers_gone * 1000:.0f} ms after the kill"
            )
            assert usage == dict(expected), (seed, round_, usage, dict(expected))
        assert daemon.stop(30) == 0
    print(f"\nworkers usage after kill -9 (seed {seed}): " + "; ".join(report))
