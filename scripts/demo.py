"""The end-to-end demo: a private vibectld, one issued client, calls through TLS, a revocation.

Runs as an ordinary user in a temporary directory and leaves nothing behind.
It talks to the daemon only the way operators and clients do: the
`vibectl-admin` CLI over the admin socket, and gRPC over TLS with the secret.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectl.proxy_url import parse
from vibectl.tls_pin import pinned_ca

BIN = Path(sys.executable).parent


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admin(sock: Path, *args: str) -> str:
    out = subprocess.run(
        [str(BIN / "vibectl-admin"), "--socket", str(sock), *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def wait_ready(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"vibectld exited with {proc.returncode}; its log:\n{log.read_text()}")
        try:
            admin(sock, "status")
            return
        except subprocess.CalledProcessError:
            time.sleep(0.2)
    sys.exit(f"vibectld did not become ready within 60 s; its log:\n{log.read_text()}")


def vibectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        [str(BIN / "vibectl"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        sys.exit(f"vibectl {args[0]} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.rstrip().splitlines())


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vibectld-demo-"))
    sock_dir = Path(tempfile.mkdtemp(prefix="vd-", dir="/tmp"))
    port = free_port()
    sock = sock_dir / "admin.sock"
    config = work / "config.yaml"
    log = work / "vibectld.log"
    config.write_text(
        json.dumps(
            {
                "server": {
                    "listen": f"127.0.0.1:{port}",
                    "public_url": f"vibectl-server://localhost:{port}",
                    "name": "demo",
                },
                "admin": {"socket": str(sock), "group": "vibectld-admin"},
                "state_dir": str(work / "state"),
                "models": {"default": "echo"},
                "logging": {"level": "info", "format": "console"},
            },
            indent=2,
        )
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        step(f"starting vibectld on 127.0.0.1:{port} (state and config in {work})")
        with log.open("wb") as log_file:
            proc = subprocess.Popen(
                [str(BIN / "vibectld"), "--config", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        wait_ready(sock, proc, log)
        print("    vibectld is up; it created its own CA and server certificate")

        step("vibectl-admin issue-client demo-user --expires 1h")
        url = admin(sock, "issue-client", "demo-user", "--expires", "1h").strip()
        target = parse(url)
        print(f"    connection URL (secret masked): {target.masked()}")
        assert target.secret and target.ca_sha256

        step("verifying the server with nothing but the URL's ca-sha256 pin")
        ca = pinned_ca(target.host, target.port, target.ca_sha256)
        print(f"    the server's CA matches the pin {target.ca_sha256[:16]}…")
        channel = grpc.secure_channel(target.target, grpc.ssl_channel_credentials(ca))
        stub = pb_grpc.VibectlLLMProxyStub(channel)
        auth = [("authorization", f"Bearer {target.secret}")]

        step("Execute on the 'echo' model, through TLS, with the secret")
        request = pb.ExecuteRequest(
            system_fragments=["You are a Kubernetes assistant."],
            user_fragments=["why is my pod in CrashLoopBackOff?"],
            model_name="echo",
            request_id="demo-1",
        )
        reply = stub.Execute(request, metadata=auth, timeout=30)
        print(f"    reply: {reply.success.response_text}")
        m = reply.success.metrics
        print(f"    metrics: {m.duration_ms} ms, {m.input_tokens} in / {m.output_tokens} out")

        step("StreamExecute: chunks as they arrive, then complete, then final metrics")
        for chunk in stub.StreamExecute(request, metadata=auth, timeout=30):
            kind = chunk.WhichOneof("chunk_type")
            detail = chunk.text_chunk if kind == "text_chunk" else str(getattr(chunk, kind or ""))
            print(f"    [{kind}] {' '.join(detail.split())}")

        step("a user pastes the URL: vibectl setup-proxy configure -  (from stdin, not ps)")
        user_env = {
            **os.environ,
            "VIBECTL_CONFIG_DIR": str(work / "user-config"),
            "LLM_USER_PATH": str(work / "user-llm"),
        }
        print(
            indent(
                vibectl(
                    user_env, "setup-proxy", "configure", "-", "--name", "demo", stdin=url + "\n"
                )
            ),
            end="",
        )

        step('vibectl ask "why is my pod in CrashLoopBackOff?"  (through the proxy)')
        print(indent(vibectl(user_env, "ask", "why is my pod in CrashLoopBackOff?")), end="")

        step("vibectl-admin revoke-client demo-user")
        print("    " + admin(sock, "revoke-client", "demo-user", "--reason", "demo").strip())

        step("the same secret, once more: vibectl ask, then a raw gRPC call")
        refused = subprocess.run(
            [str(BIN / "vibectl"), "ask", "hello again"],
            capture_output=True,
            text=True,
            env=user_env,
            check=False,
        )
        print(f"    vibectl exit {refused.returncode}: {refused.stderr.strip()}")
        try:
            stub.Execute(request, metadata=auth, timeout=30)
            print("    unexpected: the revoked secret was served")
            return 1
        except grpc.RpcError as e:
            print(f"    refused: {e.code().name}: {e.details()}")

        step("vibectl-admin list-clients --all")
        print(admin(sock, "list-clients", "--all"), end="")
        channel.close()
        print("\nDemo complete. Next: run the tests with ./scripts/test")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if os.environ.get("VIBECTLD_DEMO_KEEP"):
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
