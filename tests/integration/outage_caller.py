"""Callers for the storage outage test, as a process of their own.

    python -m tests.integration.outage_caller PORT CA_FILE SECRET...

One thread per secret calls Execute in a loop on its own connection until standard
input closes, then one JSON line goes to standard output: per secret, the calls served
and the failures (status and message). A process apart from the test's own, because the
test forks pg_ctl to stop and start PostgreSQL, and a fork while gRPC client threads are
busy can crash the child; and light (gRPC and the stubs only), so it starts at once.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import grpc

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc


def main(port: int, ca_pem: bytes, secrets: list[str]) -> None:
    stop = threading.Event()
    results: dict[str, dict[str, object]] = {}

    def call(secret: str) -> None:
        served, failed = 0, []
        creds = grpc.ssl_channel_credentials(ca_pem)
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = pb_grpc.VibectlLLMProxyStub(channel)
            while not stop.is_set():
                try:
                    stub.Execute(
                        pb.ExecuteRequest(user_fragments=["hi"]),
                        metadata=[("authorization", f"Bearer {secret}")],
                        timeout=30,
                    )
                except grpc.RpcError as e:
                    failed.append(f"{e.code().name}: {e.details()}")
                else:
                    served += 1
        results[secret] = {"served": served, "failed": failed}

    threads = [threading.Thread(target=call, args=(s,)) for s in secrets]
    for thread in threads:
        thread.start()
    print("calling", flush=True)
    sys.stdin.read()  # until the test closes it
    stop.set()
    for thread in threads:
        thread.join()
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]).read_bytes(), sys.argv[3:])
