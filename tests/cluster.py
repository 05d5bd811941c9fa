"""Several vibectld nodes on one PostgreSQL database, behind HAProxy, as real processes.

    cluster = Cluster(root, postgres.dsn, size=3).start()
    url = cluster.issue("alice", "--rpm", "5")        # vibectl-admin on node 1
    caller = cluster.caller(url)                      # the URL's pin, fetched through HAProxy
    outcome = caller.through_lb()                     # Outcome(code="OK", node="node-2", …)
    caller.on(cluster.nodes[2])                       # straight to one node
    cluster.nodes[1].kill()                           # kill -9
    cluster.close()

Each node is a `vibectld` process (tests/reliability/_procs.py, with the test models
registered, so `faults` is there: "sleep:S" holds a call open, for concurrency and
streams), in a directory of its own: its config file with `keys/postgresql-dsn` and
`keys/cluster-key` beside it, as an operator installs them, its state directory and admin
socket. Processes, not threads of this one, so that kill -9 is a real kill.

The nodes listen on fixed ports chosen before anything starts, because HAProxy needs its
backends and the nodes need HAProxy's port: `server.public_url` names the load balancer
(`localhost:<its port>`), so `issue-client` on any node prints a URL that goes through it.
The first node starts alone (it creates the schema, the CA and the signing keys); the
others start together and load them.

A call reports which node served it: the harness opens a fresh channel per call (HAProxy
balances connections, round robin), asks `GetServerInfo` for the node's `server.name` on
that channel, then makes the call on the same connection.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.postgres import PostgresCluster, free_port
from tests.haproxy import HAPROXY, HAProxy
from tests.postgres import Postgres
from tests.reliability._procs import BIN, REPO, DaemonProcess, auth
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectl.proxy_url import parse as parse_url
from vibectl.tls_pin import pinned_ca

# Every session on the database but this one: who waits on what, in which state.
_ACTIVITY = """
    SELECT pid, application_name, state, wait_event_type, wait_event,
           round(extract(epoch FROM now() - xact_start)::numeric, 1) AS xact_seconds,
           left(query, 120)
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
"""

# The name every node's certificate carries (tls.default_hosts) and public_url uses.
HOST = "localhost"


def write_secret(path: Path, value: str) -> None:
    """A credential file as an operator installs one: 0600, the value on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n", encoding="utf-8")
    os.chmod(path, 0o600)


def generate_cluster_key() -> str:
    """A new cluster key from `vibectld --generate-cluster-key`, as an operator makes one."""
    out = subprocess.run(
        [str(BIN / "vibectld"), "--generate-cluster-key"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"vibectld --generate-cluster-key failed: {out.stderr}"
    return out.stdout.strip()


class Node(DaemonProcess):
    """One vibectld process of the cluster, restartable on the same port and files."""

    def __init__(self, root: Path, name: str, port: int, **overrides: Any) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root, fake_models=True, **overrides)
        self.name = name
        self.fixed_port = port
        self.dsn: str | None = None

    def install_credentials(self, dsn: str, cluster_key: str) -> None:
        self.dsn = dsn
        write_secret(self.root / "keys" / "postgresql-dsn", dsn)
        write_secret(self.root / "keys" / "cluster-key", cluster_key)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The real vibectl-admin against this node's admin socket."""
        return subprocess.run(
            [str(BIN / "vibectl-admin"), "--socket", str(self.admin_socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str) -> Any:
        """`vibectl-admin --json <args>`, parsed; fails the test on a non-zero exit."""
        out = self.cli("--json", *args)
        if out.returncode != 0:
            raise AssertionError(
                f"{self.name}: vibectl-admin {args}: {out.stderr}\n{self.diagnose()}"
            )
        return json.loads(out.stdout)

    def diagnose(self) -> str:
        """What the process's threads are doing (py-spy) and what its database sessions
        wait on: for a failure that is a hang, the place it hangs."""
        parts = []
        # py-spy is no dependency of the project; used where a developer installed it.
        if self.running() and (BIN / "py-spy").exists():
            spy = subprocess.run(
                [str(BIN / "py-spy"), "dump", "--pid", str(self.pid)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            parts.append(f"--- py-spy dump of {self.name} ---\n{spy.stdout}{spy.stderr}")
        if self.dsn is not None:
            try:
                with psycopg.connect(self.dsn, connect_timeout=5) as conn:
                    rows = conn.execute(_ACTIVITY).fetchall()
                parts.append("--- pg_stat_activity ---\n" + "\n".join(map(str, rows)))
            except psycopg.Error as e:
                parts.append(f"--- pg_stat_activity: {type(e).__name__} ---")
        return "\n".join(parts)


@dataclass(frozen=True)
class Outcome:
    """One call as its client saw it."""

    code: str  # "OK", a gRPC status name, or "MODEL:<code>" for an in-band model error
    node: str | None  # the server.name that answered GetServerInfo on the call's connection
    started: float  # time.monotonic() at the call's start
    ended: float
    limit_type: str | None = None  # the refusal's `limit-type` trailer, if any
    details: str = ""


def _trailer(err: grpc.RpcError, key: str) -> str | None:
    trailers: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for k, v in trailers or ():
        if k == key:
            return str(v)
    return None


class Caller:
    """One client secret, trusting exactly the CA its URL pins."""

    def __init__(self, url: str, ca_pem: bytes) -> None:
        target = parse_url(url)
        assert target.secret, "the URL carries no secret"
        self.secret = target.secret
        self.lb_port = target.port
        self.credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)

    def channel(self, port: int) -> grpc.Channel:
        """A new channel (so a new TCP connection, balanced afresh) to localhost:port."""
        return grpc.secure_channel(f"{HOST}:{port}", self.credentials)

    def known_on(self, port: int) -> bool:
        """Whether the node at `port` accepts this secret, without spending any limit:
        GetServerInfo authenticates but is not counted as a call."""
        with self.channel(port) as channel:
            try:
                pb_grpc.VibectlLLMProxyStub(channel).GetServerInfo(
                    pb.GetServerInfoRequest(), metadata=auth(self.secret), timeout=10
                )
            except grpc.RpcError:
                return False
        return True

    def health(self, port: int, service: str = "") -> str:
        """The gRPC health service's answer for `service` on the node at `port`
        ("SERVING", "NOT_SERVING"; a gRPC status name if the check fails)."""
        with self.channel(port) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10
                )
            except grpc.RpcError as e:
                return str(e.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def call(
        self,
        port: int,
        prompt: str = "hi",
        model: str | None = None,
        timeout: float = 30,
        stream: bool = False,
        on_node: Callable[[str], object] | None = None,
    ) -> Outcome:
        """GetServerInfo (to learn the node) then Execute on one new connection.

        `on_node(name)` runs between the two: a test can line calls up on a barrier,
        or learn where a long call landed while it runs.
        """
        started = time.monotonic()
        node: str | None = None
        with self.channel(port) as channel:
            stub = pb_grpc.VibectlLLMProxyStub(channel)
            try:
                info = stub.GetServerInfo(
                    pb.GetServerInfoRequest(), metadata=auth(self.secret), timeout=timeout
                )
                node = info.server_name
                if on_node is not None:
                    on_node(node)
                code = self._execute(stub, prompt, model, timeout, stream)
            except grpc.RpcError as e:
                return Outcome(
                    str(e.code().name),
                    node,
                    started,
                    time.monotonic(),
                    _trailer(e, "limit-type"),
                    str(e.details()),
                )
        return Outcome(code, node, started, time.monotonic())

    def _execute(
        self,
        stub: pb_grpc.VibectlLLMProxyStub,
        prompt: str,
        model: str | None,
        timeout: float,
        stream: bool,
    ) -> str:
        request = pb.ExecuteRequest(user_fragments=[prompt])
        if model is not None:
            request.model_name = model
        if stream:
            for chunk in stub.StreamExecute(request, metadata=auth(self.secret), timeout=timeout):
                if chunk.HasField("error"):
                    return f"MODEL:{chunk.error.error_code}"
            return "OK"
        reply = stub.Execute(request, metadata=auth(self.secret), timeout=timeout)
        return f"MODEL:{reply.error.error_code}" if reply.HasField("error") else "OK"

    def through_lb(self, prompt: str = "hi", model: str | None = None) -> Outcome:
        return self.call(self.lb_port, prompt, model)

    def on(self, node: Node, prompt: str = "hi", model: str | None = None) -> Outcome:
        return self.call(node.fixed_port, prompt, model)


class Cluster:
    """`size` nodes sharing the database at `dsn`, and HAProxy in front of them."""

    def __init__(
        self,
        root: Path,
        dsn: str,
        *,
        size: int = 3,
        storage: dict[str, Any] | None = None,
        per_node: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.root = root
        self.dsn = dsn
        self.size = size
        self.storage = {"backend": "postgresql", **(storage or {})}
        # Config sections merged over the common ones, node by node (say, on_stale).
        self.per_node = list(per_node) + [{}] * (size - len(per_node))
        self.nodes: list[Node] = []
        self.lb: HAProxy | None = None

    def start(self) -> Cluster:
        ports: list[int] = []
        while len(ports) < self.size:
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.lb = HAProxy(ports).start()
        cluster_key = generate_cluster_key()
        for i, port in enumerate(ports):
            name = f"node-{i + 1}"
            extra = self.per_node[i]
            node = Node(
                self.root / name,
                name,
                port,
                server={
                    "listen": f"127.0.0.1:{port}",
                    "name": name,
                    "public_url": f"vibectl-server://{HOST}:{self.lb.port}",
                },
                storage={**self.storage, **extra.get("storage", {})},
                **{k: v for k, v in extra.items() if k != "storage"},
            )
            node.install_credentials(self.dsn, cluster_key)
            self.nodes.append(node)
        # The first node makes the cluster's state; the others join it, together.
        self.nodes[0].start()
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            for started in pool.map(lambda n: n.start(), self.nodes[1:]):
                assert started.running()
        self.lb.wait_status({n.fixed_port: "UP" for n in self.nodes})
        return self

    @property
    def lb_port(self) -> int:
        assert self.lb is not None
        return self.lb.port

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def issue(self, name: str, *flags: str, on: int = 0) -> str:
        """`vibectl-admin issue-client NAME FLAGS…` on node `on`; the URL it prints."""
        out = self.nodes[on].cli("issue-client", name, *flags)
        assert out.returncode == 0, f"issue-client {name}: {out.stderr}"
        return out.stdout.strip()

    def issue_over_socket(self, name: str, on: int = 0, **args: Any) -> str:
        """The same issue_client, sent on the admin socket from this process: no CLI
        start-up (~0.5 s each), for tests that need many clients and test no CLI."""
        return str(self.nodes[on].admin("issue_client", {"name": name, **args})["url"])

    def caller(self, url: str, via: Node | None = None) -> Caller:
        """A client for `url`, trusting the CA its pin names, fetched through HAProxy
        (or from the node `via`)."""
        target = parse_url(url)
        assert target.ca_sha256, "the URL carries no ca-sha256 pin"
        port = target.port if via is None else via.fixed_port
        return Caller(url, pinned_ca(HOST, port, target.ca_sha256))

    def wait_all_up(self, timeout: float = 15) -> None:
        assert self.lb is not None
        self.lb.wait_status({n.fixed_port: "UP" for n in self.nodes}, timeout)

    def log_tails(self) -> str:
        parts = [f"--- {n.name} ---\n{n.log_tail()}" for n in self.nodes]
        if self.lb is not None:
            parts.append(f"--- haproxy ---\n{self.lb.log_tail()}")
        return "\n".join(parts)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        if self.lb is not None:
            self.lb.remove()


class User:
    """One user's vibectl (the real command) with a configuration of its own."""

    def __init__(self, home: Path) -> None:
        self.env = {
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(home),
            "VIBECTL_CONFIG_DIR": str(home / "vibectl"),
            "LLM_USER_PATH": str(home / "llm"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "vibectl"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            check=False,
        )


def usage_by_name(node: Node) -> dict[str, int]:
    """Requests per client today, cluster-wide, as `vibectl-admin --json usage` shows them."""
    return {row["name"]: int(row["requests"]) for row in node.json("usage")}


def wait_until(check: Any, timeout: float, interval: float = 0.05) -> Any:
    """Poll `check()` until it returns something truthy; that value, or the last one."""
    deadline = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = check()
    return value


def pg_ctl_apart(server: PostgresCluster, action: str) -> None:
    """`server.stop()` or `server.start()`, run from a fresh Python process.

    As root, pg_ctl runs as `nobody`, which makes subprocess fork() rather than vfork();
    gRPC's fork handlers then run in the child, and with this process's channels busy
    (a test under load) they can abort it before pg_ctl starts. The helper has no gRPC,
    and is itself started with vfork (no user change), where no fork handler runs.
    """
    assert action in ("stop", "start")
    script = (
        "import sys; from pathlib import Path; from bench.postgres import PostgresCluster; "
        f"getattr(PostgresCluster(Path(sys.argv[1]), durable=False), {action!r})()"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(server.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"pg_ctl {action} failed: {out.stderr}\n{server.log_tail()}"


@contextlib.contextmanager
def shared_database(server: PostgresCluster, name: str) -> Iterator[Postgres]:
    """A fresh database on the session's server for a whole module's cluster (the
    `postgres` fixture's are per test); dropped after it, the server started if stopped."""
    server.create_database(name)
    handle = Postgres(server, name)
    try:
        yield handle
    finally:
        handle.cleanup()


def cluster_in(root: Path, dsn: str, **kwargs: Any) -> Iterator[Cluster]:
    """A started cluster for a fixture; its nodes' logs are printed if it fails to start
    or a test fails (pytest shows captured output of failures only)."""
    if not Path(HAPROXY).exists():
        # As the `haproxy` fixture does: skipped on a developer's machine without it,
        # a failure in CI, which must run these tests.
        reason = "haproxy is not installed (scripts/system-deps installs it as root)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the cluster tests, but {reason}")
        pytest.skip(reason)
    cluster = Cluster(root, dsn, **kwargs)
    try:
        cluster.start()
        yield cluster
    finally:
        print(cluster.log_tails())
        cluster.close()
