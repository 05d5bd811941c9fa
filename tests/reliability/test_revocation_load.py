"""Revocation under load: 32 open streams of one client, revoked while another client works.

A real vibectld process with the test models (`faults`): client 1 holds 32 long streams
(`chunks:100000`, a chunk every ~10 ms each) and a thread of back-to-back Execute calls;
client 2 holds 4 streams of 300 chunks and its own Execute loop. Client 1 is revoked over
the admin socket. Every chunk's arrival is timestamped in the client (time.monotonic), as
is the moment the revoke was acknowledged. Then:

- no chunk of client 1 arrives later than REVOKE_GAP_BUDGET_MS after the acknowledgement
  (what does arrive in that window was already on the wire; the measured gap is printed);
- every one of its 32 streams ends with UNAUTHENTICATED, and the revoke reports them all
  as cancelled. None may hang until its deadline (`hung`), as a stream whose cancel
  landed while gRPC itself was writing a chunk once did;
  test_a_revoked_stream_blocked_in_a_write_ends_unauthenticated pins that case alone;
- no Execute of client 1 that started after the acknowledgement is served, and a new
  call and a new stream are refused;
- client 2's streams complete with all their chunks and its calls all succeed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.reliability._procs import DaemonProcess, auth, execute, secret_of
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

STREAMS = 32
OTHER_STREAMS = 4
OTHER_CHUNKS = 300
# Chunks handed to the transport just before the revoke may still be in flight on
# loopback; anything later than this would be a chunk produced after the revoke.
REVOKE_GAP_BUDGET_MS = 250.0
STREAM_DEADLINE = 15.0


@dataclass
class Stream:
    times: list[float] = field(default_factory=list)
    code: str | None = None
    ended_at: float = 0.0
    completed: bool = False  # saw `complete` and then `final_metrics`
    call: Any = None  # the grpc call, to cancel at teardown


@dataclass
class Calls:
    """(started, ended, code) of each Execute of a loop."""

    records: list[tuple[float, float, str]] = field(default_factory=list)


def read_stream(stub: pb_grpc.VibectlLLMProxyStub, secret: str, prompt: str, out: Stream) -> None:
    request = pb.ExecuteRequest(user_fragments=[prompt], model_name="faults")
    call = stub.StreamExecute(request, metadata=auth(secret), timeout=STREAM_DEADLINE)
    out.call = call
    complete = False
    try:
        for chunk in call:
            now = time.monotonic()
            if chunk.HasField("text_chunk"):
                out.times.append(now)
            elif chunk.HasField("complete"):
                complete = True
            elif chunk.HasField("final_metrics"):
                out.completed = complete
        out.code = "OK"
    except grpc.RpcError as e:
        out.code = str(e.code().name)
    out.ended_at = time.monotonic()


def call_loop(
    stub: pb_grpc.VibectlLLMProxyStub, secret: str, stop: threading.Event, out: Calls
) -> None:
    while not stop.is_set():
        started = time.monotonic()
        code = execute(stub, secret, "hi", model="faults", timeout=10)
        out.records.append((started, time.monotonic(), code))


def join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))


def test_revoking_a_client_with_32_streams_stops_it_at_once_and_spares_others(
    tmp_path: Path,
) -> None:
    stop = threading.Event()
    threads: list[threading.Thread] = []
    heavy_streams = [Stream() for _ in range(STREAMS)]
    other_streams = [Stream() for _ in range(OTHER_STREAMS)]

    def spawn(target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        threads.append(thread)

    with DaemonProcess(tmp_path, fake_models=True) as daemon:
        daemon.start()
        issued = daemon.admin("issue_client", {"name": "heavy"})
        heavy_id, heavy = str(issued["id"]), secret_of(str(issued["url"]))
        other = daemon.issue("other")
        heavy_stub, other_stub = daemon.stub(), daemon.stub()
        heavy_calls, other_calls = Calls(), Calls()
        try:
            for out in other_streams:
                spawn(read_stream, other_stub, other, f"chunks:{OTHER_CHUNKS}", out)
            spawn(call_loop, other_stub, other, stop, other_calls)
            spawn(call_loop, heavy_stub, heavy, stop, heavy_calls)
            for out in heavy_streams:
                spawn(read_stream, heavy_stub, heavy, "chunks:100000", out)
            deadline = time.monotonic() + 30
            while min(len(s.times) for s in heavy_streams) < 5:
                assert time.monotonic() < deadline, "the 32 streams never got going"
                time.sleep(0.02)
            time.sleep(0.3)  # steady state: 32 streams flowing

            asked = time.monotonic()
            result = daemon.admin("revoke_client", {"target": heavy_id})
            acked = time.monotonic()

            heavy_threads = threads[OTHER_STREAMS + 2 :]
            join_all(heavy_threads, STREAM_DEADLINE + 5)
            time.sleep(0.2)  # the call loops keep calling after the revoke
            stop.set()
            after_call = execute(heavy_stub, heavy, "hi", model="faults")
            request = pb.ExecuteRequest(user_fragments=["chunks:3"], model_name="faults")
            try:
                list(heavy_stub.StreamExecute(request, metadata=auth(heavy), timeout=10))
                after_stream = "OK"
            except grpc.RpcError as e:
                after_stream = str(e.code().name)
            join_all(threads, 30)
        finally:
            stop.set()
            for s in heavy_streams + other_streams:
                if s.call is not None:
                    s.call.cancel()

    ends = Counter(s.code for s in heavy_streams)
    hung = ends.pop("DEADLINE_EXCEEDED", 0)
    late = [t - acked for s in heavy_streams for t in s.times if t > acked]
    gap_ms = max(late, default=0.0) * 1000
    end_ms = max(s.ended_at - acked for s in heavy_streams if s.code != "DEADLINE_EXCEEDED") * 1000
    before = sum(len(s.times) for s in heavy_streams) - len(late)
    served_after = [r for r in heavy_calls.records if r[0] > acked and r[2] == "OK"]
    refused_after = [r for r in heavy_calls.records if r[0] > acked and r[2] != "OK"]
    other_codes = Counter(code for _, _, code in other_calls.records)
    print(
        f"\nrevocation-under-load: revoke ack {1000 * (acked - asked):.1f} ms after asking, "
        f"cancelled_calls={result['cancelled_calls']}; {before} chunks of the revoked client "
        f"before the ack, {len(late)} after it, last one +{gap_ms:.1f} ms (budget "
        f"{REVOKE_GAP_BUDGET_MS:.0f} ms); streams ended {dict(ends)}, the last +{end_ms:.1f} "
        f"ms after the ack, {hung} hung until their deadline; its Execute "
        f"loop: {len(heavy_calls.records)} calls, "
        f"{len(refused_after)} started after the ack all refused; other client: "
        f"{OTHER_STREAMS}/{sum(s.completed for s in other_streams)} streams complete, "
        f"calls {dict(other_codes)}"
    )
    assert gap_ms <= REVOKE_GAP_BUDGET_MS
    assert set(ends) <= {"UNAUTHENTICATED"}, ends
    assert not hung, f"{hung} revoked streams hung until their deadline"
    assert STREAMS <= result["cancelled_calls"] <= STREAMS + 1
    assert not served_after, f"{len(served_after)} calls started after the revoke were served"
    assert refused_after and {r[2] for r in refused_after} == {"UNAUTHENTICATED"}
    assert after_call == "UNAUTHENTICATED" and after_stream == "UNAUTHENTICATED"
    for s in other_streams:
        assert s.code == "OK" and s.completed and len(s.times) == OTHER_CHUNKS
    assert set(other_codes) == {"OK"} and other_codes["OK"] > 0


def test_a_revoked_stream_blocked_in_a_write_ends_unauthenticated(tmp_path: Path) -> None:
    """A reader that does not read keeps the server blocked in its write (flow control).

    Revoking the client then cancels the handler inside gRPC's write, every time.
    """
    with DaemonProcess(tmp_path, fake_models=True) as daemon:
        daemon.start()
        issued = daemon.admin("issue_client", {"name": "slow-reader"})
        secret = secret_of(str(issued["url"]))
        # fake-sync streams each word of its prompt at once, coalesced into messages of
        # up to 64 KiB: the longest prompt allowed (200,000 characters) is more than the
        # flow-control windows hold.
        request = pb.ExecuteRequest(user_fragments=["w " * 99_999], model_name="fake-sync")
        call = daemon.stub().StreamExecute(request, metadata=auth(secret), timeout=5)
        try:
            # Words already waiting come as one chunk (up to 64 KiB of them).
            assert set(next(call).text_chunk.split()) == {"w"}
            time.sleep(1.0)  # the server fills the flow-control window and blocks writing
            result = daemon.admin("revoke_client", {"target": issued["id"]})
            acked = time.monotonic()
            assert result["cancelled_calls"] == 1
            drained = 0
            try:
                for _ in call:
                    drained += 1  # chunks already buffered before the revoke
                code = "OK"
            except grpc.RpcError as e:
                code = str(e.code().name)
            waited = time.monotonic() - acked
            print(
                f"\nslow reader revoked: drained {drained} buffered chunks, then {code} "
                f"{waited:.2f} s after the ack"
            )
            assert code == "UNAUTHENTICATED", f"the stream ended {code} after {waited:.1f} s"
        finally:
            call.cancel()
