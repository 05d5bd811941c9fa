"""Signals under load, on a real vibectld process.

SIGHUP: while callers run back-to-back Execute calls, four broken configurations (bad
YAML, an unknown key, a bad value, missing certificate files) are each written and
signalled, then a valid changed one. Each reload's outcome is read from the
NOTIFY_SOCKET (RELOADING=1 … READY=1 with its STATUS) rather than guessed. No call may
fail, and the last reload must show in GetServerInfo.

SIGTERM: echo callers plus calls to the `faults` model that sleep 1 s (they are in flight
when the signal arrives) and 30 s (longer than the grace period). The daemon must exit 0
within the grace period (plus a small margin); every in-flight 1 s call completes inside
the grace period; the 30 s calls are cut at its end; and after a restart the usage
counters equal the calls the client saw succeed — so nothing was counted that the client
did not get, and nothing it got was lost at shutdown.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from tests.reliability._procs import DaemonProcess, auth, execute
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

CALLERS = 8
GRACE_SECONDS = 3.0
# Stopping also flushes usage, closes the registry and the provider clients.
EXIT_MARGIN_SECONDS = 3.0


@dataclass
class Load:
    """Back-to-back calls from several threads; (kind, started, ended, code) for each."""

    stop: threading.Event = field(default_factory=threading.Event)
    records: list[tuple[str, float, float, str]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, call: Callable[[], str], *, once: bool = False) -> None:
        def run() -> None:
            while not self.stop.is_set():
                started = time.monotonic()
                code = call()
                with self.lock:
                    self.records.append((kind, started, time.monotonic(), code))
                if once or code != "OK":
                    return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def finish(self, timeout: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0))
        assert not any(t.is_alive() for t in self.threads), "a caller hung"

    def codes(self, kind: str | None = None) -> Counter[str]:
        return Counter(r[3] for r in self.records if kind is None or r[0] == kind)


def server_info(stub: pb_grpc.VibectlLLMProxyStub, secret: str) -> pb.GetServerInfoResponse:
    reply: pb.GetServerInfoResponse = stub.GetServerInfo(
        pb.GetServerInfoRequest(), metadata=auth(secret), timeout=10
    )
    return reply


def status_of(message: str) -> str:
    return next((x for x in message.split("\n") if x.startswith("STATUS=")), "")


def test_sighup_with_broken_configs_under_load_fails_no_call(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, limits={"request_timeout_seconds": 120}) as daemon:
        daemon.start()
        secret = daemon.issue("steady")
        stubs = [daemon.stub(), daemon.stub()]
        load = Load()
        for i in range(CALLERS):
            stub = stubs[i % len(stubs)]
            load.add("echo", partial(execute, stub, secret, timeout=10))
        broken = {
            "bad YAML": "server: [unclosed\nlimits: {",
            "unknown key": json.dumps({**daemon.raw, "bogus_key": 1}),
            "bad value": json.dumps(
                {**daemon.raw, "limits": {**daemon.raw["limits"], "requests_per_minute": "lots"}}
            ),
            "missing certificates": json.dumps(
                {
                    **daemon.raw,
                    "server": {
                        **daemon.raw["server"],
                        "tls": {
                            "cert_file": str(tmp_path / "missing.pem"),
                            "key_file": str(tmp_path / "missing.key"),
                        },
                    },
                }
            ),
        }
        reload_ms: list[float] = []
        try:
            time.sleep(0.5)
            first_hup = time.monotonic()
            for text in broken.values():
                daemon.write_config(text)
                mark = daemon.notify.mark()
                sent = time.monotonic()
                daemon.signal(signal.SIGHUP)
                daemon.notify.wait(lambda lines: "RELOADING=1" in lines, 10, after=mark)
                done = daemon.notify.wait(lambda lines: "READY=1" in lines, 10, after=mark)
                reload_ms.append((time.monotonic() - sent) * 1000)
                assert "last reload rejected" in status_of(done), done
                time.sleep(0.3)
            daemon.raw["limits"]["request_timeout_seconds"] = 77
            daemon.raw["models"]["aliases"] = {"after-hup": "echo"}
            daemon.write_config()
            mark = daemon.notify.mark()
            sent = time.monotonic()
            daemon.signal(signal.SIGHUP)
            done = daemon.notify.wait(lambda lines: "READY=1" in lines, 10, after=mark)
            reload_ms.append((time.monotonic() - sent) * 1000)
            last_ready = time.monotonic()
            assert "rejected" not in status_of(done), done
            info = server_info(stubs[0], secret)
            time.sleep(0.5)
        finally:
            load.finish(30)
        assert daemon.stop(30) == 0

    during = [r for r in load.records if first_hup <= r[2] <= last_ready]
    codes = load.codes()
    print(
        f"\nsighup-under-load: {len(load.records)} calls from {CALLERS} callers, "
        f"{len(during)} of them during the 5 reloads ({len(broken)} broken: "
        f"{', '.join(broken)}); outcomes {dict(codes)}; SIGHUP to READY "
        f"{', '.join(f'{ms:.0f}' for ms in reload_ms)} ms; applied: "
        f"request_timeout_seconds={info.limits.request_timeout_seconds}, "
        f"aliases={dict(info.model_aliases)}"
    )
    assert set(codes) == {"OK"}, codes
    assert len(during) > 0
    assert info.limits.request_timeout_seconds == 77
    assert info.model_aliases["after-hup"] == "echo"


def test_sigterm_under_load_finishes_in_flight_calls_and_counts_every_served_one(
    tmp_path: Path,
) -> None:
    with DaemonProcess(
        tmp_path, fake_models=True, server={"shutdown_grace_seconds": GRACE_SECONDS}
    ) as daemon:
        daemon.start()
        secret = daemon.issue("busy")
        stubs = [daemon.stub(), daemon.stub()]
        load = Load()
        for i in range(CALLERS):
            stub = stubs[i % len(stubs)]
            load.add("echo", partial(execute, stub, secret, timeout=10))
        for i in range(4):
            stub = stubs[i % len(stubs)]
            load.add(
                "sleep:1",
                partial(execute, stub, secret, "sleep:1", "faults", timeout=20),
            )
        for i in range(2):
            stub = stubs[i % len(stubs)]
            load.add(
                "sleep:30",
                partial(execute, stub, secret, "sleep:30", "faults", timeout=40),
                once=True,
            )
        try:
            time.sleep(2.5)
            term = time.monotonic()
            daemon.signal(signal.SIGTERM)
            rc = daemon.wait(GRACE_SECONDS + 20)
            exited = time.monotonic() - term
        finally:
            load.finish(30)
        served = load.codes()["OK"]

        restart = time.monotonic()
        daemon.start()
        restart_s = time.monotonic() - restart
        [usage] = daemon.admin("usage", {"name": "busy"})["usage"]
        [client] = [c for c in daemon.admin("list_clients")["clients"] if c["name"] == "busy"]
        assert daemon.stop(30) == 0

    in_flight = [r for r in load.records if r[0] == "sleep:1" and r[1] < term < r[2]]
    long_calls = [r for r in load.records if r[0] == "sleep:30"]
    after = [r for r in load.records if r[1] > term]
    print(
        f"\nsigterm-under-load: exit code {rc} {exited:.2f} s after SIGTERM (grace "
        f"{GRACE_SECONDS:g} s); calls {dict(load.codes())} by kind "
        f"{ {k: dict(load.codes(k)) for k in ('echo', 'sleep:1', 'sleep:30')} }; "
        f"1 s calls in flight at SIGTERM: {len(in_flight)}, finished "
        f"{', '.join(f'+{r[2] - term:.2f}' for r in in_flight)} s; 30 s calls ended "
        f"{', '.join(f'{r[3]} +{r[2] - term:.2f}' for r in long_calls)} s; started after "
        f"SIGTERM: {dict(Counter(r[3] for r in after))}; served seen by the client {served}, "
        f"usage after restart: requests={usage['requests']} errors={usage['errors']}, "
        f"list-clients requests={client['requests']}; restart {restart_s:.2f} s"
    )
    assert rc == 0
    assert exited <= GRACE_SECONDS + EXIT_MARGIN_SECONDS
    assert in_flight, "no 1 s call was in flight at SIGTERM"
    for _, _, ended, code in in_flight:
        assert code == "OK" and ended - term <= GRACE_SECONDS
    for _, _, ended, code in long_calls:
        assert code != "OK" and GRACE_SECONDS - 0.5 <= ended - term <= exited + 0.5
    assert usage["requests"] == served and usage["errors"] == 0
    assert client["requests"] == served
    # Calls queued in gRPC when it stops are refused with a retryable UNAVAILABLE.
    before = Counter(r[3] for r in load.records if r[1] < term)
    assert set(before) <= {"OK", "UNAVAILABLE"}, before


def test_calls_in_flight_at_sigterm_finish_or_are_retryable(tmp_path: Path) -> None:
    callers = 32
    with DaemonProcess(tmp_path, server={"shutdown_grace_seconds": GRACE_SECONDS}) as daemon:
        daemon.start()
        secret = daemon.issue("rolling-restart")
        stubs = [daemon.stub() for _ in range(4)]
        load = Load()
        for i in range(callers):
            stub = stubs[i % len(stubs)]
            load.add("echo", partial(execute, stub, secret, timeout=10))
        try:
            time.sleep(1.5)
            term = time.monotonic()
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(GRACE_SECONDS + 20) == 0
        finally:
            load.finish(30)
    before = Counter(r[3] for r in load.records if r[1] < term)
    print(f"\n{callers} callers, calls started before SIGTERM: {dict(before)}")
    assert set(before) <= {"OK", "UNAVAILABLE"}, before
