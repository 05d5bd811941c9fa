"""vibectld's packages on a real systemd: Debian 12 booted with systemd-nspawn.

The .deb goes through its whole life: install (user, group, unit enabled but not
started), start, serve a client over TLS from the host, revoke, restart, reload
with a broken and then a fixed config, structured journal fields, the
`systemd-analyze security` exposure, and purge. The .rpm is installed with
`rpm -i --nodeps` into a fresh copy and must start and serve too.

The container shares the host's network namespace, so the daemon listens on the
host's 127.0.0.1 and the host's gRPC client (this venv's) reaches it with the CA
pinned by the connection URL, exactly as a user would.

The keyless `echo` model comes from the llm-echo plugin, a development
dependency that the production package does not ship (packaging/requirements.lock
has only what vibectld needs in production). Where the installed package lacks it,
the test installs llm-echo's wheel (downloaded on the host, the version this venv
has) into /opt/vibectld, offline, before configuring `models.default: echo`.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.system import packages
from tests.system.conftest import NOTES, booted, timed
from tests.system.container import Container, Result
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectl.proxy_url import ProxyURL
from vibectl.proxy_url import parse as parse_url
from vibectl.tls_pin import pinned_ca

pytestmark = [pytest.mark.system, pytest.mark.timeout(2400)]

CONFIG = "/etc/vibectld/config.yaml"
# Where files from the host go inside (nspawn mounts a fresh tmpfs on the container's /tmp,
# so files copied into the copy's /tmp from the host would be hidden).
STAGING = "/root"
EXPOSURE_LIMIT = 1.5
UNIT_PATHS = ("/lib/systemd/system/vibectld.service", "/usr/lib/systemd/system/vibectld.service")
# Hardening of the kind the unit uses, applied to a throwaway service by the first step.
SANDBOX_PROBE = (
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectControlGroups=yes",
    "RestrictNamespaces=yes",
    "NoNewPrivileges=yes",
    "SystemCallFilter=@system-service",
    "SystemCallArchitectures=native",
    "MemoryDenyWriteExecute=yes",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "CapabilityBoundingSet=",
    "DynamicUser=yes",
)


# -- helpers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config_yaml(port: int, extra: str = "") -> str:
    return (
        "server:\n"
        f'  listen: "127.0.0.1:{port}"\n'
        f'  public_url: "vibectl-server://localhost:{port}"\n'
        f"{extra}"
        "models:\n"
        "  default: echo\n"
        "limits:\n"
        "  requests_per_minute: null\n"
        "logging:\n"
        "  level: info\n"
    )


def write_config(box: Container, text: str) -> None:
    """Replace the config's content in place, keeping the owner and mode the package gave it."""
    path = box.path(CONFIG)
    assert path.exists(), f"the package did not install {CONFIG}"
    with path.open("w") as f:
        f.write(text)


def ok(result: Result) -> str:
    assert result.ok, result.describe()
    return result.stdout


def unit_state(box: Container) -> str:
    return box.run(["systemctl", "is-active", "vibectld"]).stdout.strip()


def show(box: Container, prop: str) -> str:
    return ok(box.run(["systemctl", "show", f"--property={prop}", "--value", "vibectld"])).strip()


def main_pid(box: Container) -> int:
    return int(show(box, "MainPID"))


def systemctl(box: Container, *args: str, timeout: float = 120) -> Result:
    return box.run(["systemctl", "--no-ask-password", *args], timeout=timeout)


def ensure_echo_model(box: Container, wheel: Path) -> bool:
    """Make the `echo` model available to /opt/vibectld; True if the package shipped it."""
    probe = ["/opt/vibectld/bin/python", "-c", "import llm_echo"]
    if box.run(probe).ok:
        return True
    inside = f"{STAGING}/{wheel.name}"
    shutil.copy(wheel, box.path(inside))
    pip = "/opt/vibectld/bin/pip"
    if box.path(pip).exists():
        ok(box.run([pip, "install", "--no-index", "--no-deps", inside], timeout=120))
    else:
        # The package's venv has no pip: unpack the (pure-Python) wheel into its
        # site-packages, which is all an installer does for it.
        site = ok(
            box.run(
                [
                    "/opt/vibectld/bin/python",
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('purelib'))",
                ]
            )
        ).strip()
        ok(box.run(["/opt/vibectld/bin/python", "-m", "zipfile", "-e", inside, site]))
    ok(box.run(probe))
    return False


def issue(box: Container, name: str) -> ProxyURL:
    out = ok(box.run(["vibectl-admin", "issue-client", name, "--expires", "1d"], timeout=30))
    lines = out.splitlines()
    assert len(lines) == 1, f"issue-client must print exactly the URL, got {out!r}"
    url = parse_url(lines[0])
    assert url.secret and url.ca_sha256, f"the URL lacks a secret or a CA pin: {url.masked()}"
    return url


class HostClient:
    """A client on the host, trusting only the CA pinned by its connection URL."""

    def __init__(self, url: ProxyURL, ca_pem: bytes | None = None) -> None:
        assert url.ca_sha256 is not None
        self.url = url
        self.ca_pem = ca_pem or pinned_ca(url.host, url.port, url.ca_sha256)

    def execute(self, prompt: str) -> pb.ExecuteResponse:
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        # The daemon listens on 127.0.0.1 only; `localhost` may resolve to ::1 first.
        options = [("grpc.ssl_target_name_override", self.url.host)]
        with grpc.secure_channel(f"127.0.0.1:{self.url.port}", creds, options) as channel:
            stub = pb_grpc.VibectlLLMProxyStub(channel)
            request = pb.ExecuteRequest(
                user_fragments=[prompt],
                system_fragments=["be brief"],
                request_id=str(uuid.uuid4()),
            )
            reply: pb.ExecuteResponse = stub.Execute(
                request, metadata=[("authorization", f"Bearer {self.url.secret}")], timeout=30
            )
            return reply

    def served(self, prompt: str) -> None:
        reply = self.execute(prompt)
        assert reply.WhichOneof("result") == "success", reply
        assert prompt in reply.success.response_text
        assert reply.success.actual_model_used == "echo"

    def refused(self, prompt: str) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            self.execute(prompt)
        code: grpc.StatusCode = info.value.code()
        return code


def wait_active(box: Container, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    state = unit_state(box)
    while state in ("activating", "reloading") and time.monotonic() < deadline:
        time.sleep(0.5)
        state = unit_state(box)
    return state


def journal_entries(box: Container, *matches: str) -> list[dict[str, object]]:
    out = ok(
        box.run(["journalctl", "--no-pager", "-o", "json", "-u", "vibectld", *matches], timeout=30)
    )
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def rejections(box: Container, pid: int) -> int:
    """How many reloads the daemon `pid` rejected, naming the bad key."""
    entries = journal_entries(box, f"_PID={pid}")
    return sum(1 for e in entries if "bogus_key" in str(e.get("MESSAGE", "")))


def note(line: str) -> None:
    """A result worth reporting, printed with the timings at the end of the run."""
    NOTES.append(line)


# -- the .deb -----------------------------------------------------------------------------


class State:
    """What one step hands the next."""

    port: int = 0
    alice: HostClient
    bob: HostClient
    bob_calls: int = 0


@pytest.fixture(scope="class")
def state() -> State:
    return State()


@pytest.fixture(scope="class")
def deb_box(cached_rootfs: Path) -> Iterator[Container]:
    with booted(cached_rootfs, "deb") as box:
        yield box


class TestDeb:
    def test_container_boots_systemd_and_sandboxes_services(self, deb_box: Container) -> None:
        """The harness itself: PID 1 is systemd, and it can run a sandboxed service (so a
        failure further on is the package's, not this machine's)."""
        assert ok(deb_box.run(["cat", "/proc/1/comm"])).strip() == "systemd"
        assert ok(deb_box.run(["systemctl", "is-system-running"])).strip() in (
            "running",
            "degraded",
        )
        sandbox = [f"--property={p}" for p in SANDBOX_PROBE]
        out = ok(
            deb_box.run(
                [
                    "systemd-run",
                    "--wait",
                    "--pipe",
                    "--quiet",
                    *sandbox,
                    "/usr/bin/python3.11",
                    "-c",
                    "import os, socket; socket.socket().bind(('127.0.0.1', 0)); "
                    "print(os.path.exists('/home'), os.access('/usr', os.W_OK))",
                ],
                timeout=60,
            )
        )
        assert out.split() == ["True", "False"], out

    def test_install_creates_users_and_enables_without_starting(
        self, deb_box: Container, built_packages: packages.Packages
    ) -> None:
        deb = f"{STAGING}/{built_packages.deb.name}"
        shutil.copy(built_packages.deb, deb_box.path(deb))
        # As an operator would; offline: the root filesystem already has every dependency.
        with timed("deb: apt-get install ./vibectld_*.deb"):
            ok(deb_box.run(["apt-get", "install", "-y", "--no-install-recommends", deb], 300))
        ok(deb_box.run(["getent", "passwd", "vibectld"]))
        ok(deb_box.run(["getent", "group", "vibectld-admin"]))
        assert deb_box.run(["systemctl", "is-enabled", "vibectld"]).stdout.strip() == "enabled"
        assert unit_state(deb_box) == "inactive"

    def test_start_serves_a_client_from_the_host(
        self, deb_box: Container, echo_wheel: Path, state: State
    ) -> None:
        shipped = ensure_echo_model(deb_box, echo_wheel)
        note(f"deb: llm-echo {'shipped in' if shipped else 'NOT shipped; added to'} /opt/vibectld")
        state.port = free_port()
        write_config(deb_box, config_yaml(state.port))
        ok(deb_box.run(["vibectld", "--check-config", "--config", CONFIG]))
        with timed("deb: systemctl start vibectld"):
            ok(systemctl(deb_box, "start", "vibectld"))
        assert unit_state(deb_box) == "active"
        status = show(deb_box, "StatusText")
        note(f"deb: after start, STATUS={status!r}; watchdog {show(deb_box, 'WatchdogUSec')}")
        assert status, "the daemon should describe itself with STATUS="

        state.alice = HostClient(issue(deb_box, "alice"))
        state.alice.served("hello from alice")
        state.bob = HostClient(issue(deb_box, "bob"), state.alice.ca_pem)
        state.bob.served("hello from bob")
        state.bob_calls += 1

    def test_revoked_client_is_refused(self, deb_box: Container, state: State) -> None:
        ok(deb_box.run(["vibectl-admin", "revoke-client", "alice", "--reason", "left"]))
        assert state.alice.refused("still there?") == grpc.StatusCode.UNAUTHENTICATED
        state.bob.served("bob is still served")
        state.bob_calls += 1

    def test_restart_keeps_revocation_and_other_clients(
        self, deb_box: Container, state: State
    ) -> None:
        before = main_pid(deb_box)
        with timed("deb: systemctl restart vibectld"):
            ok(systemctl(deb_box, "restart", "vibectld"))
        assert unit_state(deb_box) == "active"
        assert main_pid(deb_box) != before
        # The same pinned CA still verifies the server: TLS material persisted in state.
        assert state.alice.refused("after restart") == grpc.StatusCode.UNAUTHENTICATED
        state.bob.served("bob after the restart")
        state.bob_calls += 1

    def test_reload_with_a_broken_config_keeps_serving(
        self, deb_box: Container, state: State
    ) -> None:
        pid = main_pid(deb_box)
        write_config(deb_box, config_yaml(state.port, extra="  bogus_key: 1\n"))
        with timed("deb: systemctl reload (broken config)"):
            broken = systemctl(deb_box, "reload", "vibectld")
        assert not broken.ok, f"reload with a broken config must fail\n{broken.describe()}"
        assert wait_active(deb_box) == "active"
        assert main_pid(deb_box) == pid
        state.bob.served("bob after a rejected reload")
        state.bob_calls += 1
        assert rejections(deb_box, pid) == 1, "the rejected reload should be logged naming the key"

        # SIGHUP is the same reload: rejected, logged, and the service stays up.
        ok(systemctl(deb_box, "kill", "--signal=SIGHUP", "--kill-who=main", "vibectld"))
        deadline = time.monotonic() + 20
        while rejections(deb_box, pid) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rejections(deb_box, pid) == 2, "SIGHUP with a broken config should be rejected"
        assert wait_active(deb_box) == "active"
        assert main_pid(deb_box) == pid
        state.bob.served("bob after a rejected SIGHUP")
        state.bob_calls += 1

        write_config(deb_box, config_yaml(state.port))
        with timed("deb: systemctl reload (fixed config)"):
            ok(systemctl(deb_box, "reload", "vibectld"))
        assert unit_state(deb_box) == "active"
        assert main_pid(deb_box) == pid
        state.bob.served("bob after a good reload")
        state.bob_calls += 1

    def test_journal_has_structured_fields(self, deb_box: Container, state: State) -> None:
        bob = journal_entries(deb_box, "CLIENT=bob")
        requests = [e for e in bob if e.get("REQUEST_ID")]
        assert len(requests) >= state.bob_calls, json.dumps(bob, indent=1)[:4000]
        assert all(e.get("MODEL") == "echo" for e in requests), requests
        audit = json.dumps(journal_entries(deb_box, "AUDIT=1"))
        assert "alice" in audit and "issue" in audit and "revoke" in audit, audit[:4000]
        everything = ok(deb_box.run(["journalctl", "--no-pager", "-o", "json"], timeout=30))
        for client in (state.alice, state.bob):
            assert client.url.secret and client.url.secret not in everything, "a secret leaked"

    def test_journald_takes_a_huge_entry_with_the_fields_it_is_found_by(
        self, deb_box: Container
    ) -> None:
        """The unit tests check ops/journal.py's entries against a stand-in socket; this
        sends one for a record with a 1 MiB multi-line value, a 200 kB message and 40
        more long fields to the container's real journald, through the packaged code."""
        script = (
            "from vibectld.ops import journal\n"
            "fields = {'MESSAGE': 'm' * 200_000, 'PROVIDER_ERROR': 'upstream said\\n' * 70_000,\n"
            "          'CLIENT': 'journal-probe', 'STATUS': 'PROVIDER_ERROR',\n"
            "          'REQUEST_ID': 'probe-1', 'EVENT': 'request'}\n"
            "fields.update({f'EXTRA_{i}': 'x' * 5000 for i in range(40)})\n"
            "journal.JournalLogger().send(journal.encode(fields))\n"
        )
        ok(deb_box.run(["/opt/vibectld/bin/python", "-c", script], timeout=30))
        # --all: journalctl shows a field of 4 KiB or more as null without it.
        query = ["journalctl", "--no-pager", "--all", "-o", "json", "CLIENT=journal-probe"]
        deadline = time.monotonic() + 15
        entries: list[dict[str, Any]] = []
        while not entries and time.monotonic() < deadline:
            out = ok(deb_box.run(query, timeout=30))
            entries = [json.loads(line) for line in out.splitlines() if line.strip()]
            time.sleep(0.2)
        assert len(entries) == 1, "journald did not take the entry"
        entry = entries[0]
        assert (entry["STATUS"], entry["REQUEST_ID"], entry["EVENT"]) == (
            "PROVIDER_ERROR",
            "probe-1",
            "request",
        )
        # Cut, keeping both ends; the fields with no room left are named, not lost silently.
        error = entry["PROVIDER_ERROR"]
        error_text = error if isinstance(error, str) else bytes(error).decode()
        assert error_text.startswith("upstream said") and "bytes cut" in error_text
        assert len(error_text.encode()) <= 4096
        assert "bytes cut" in entry["MESSAGE"] and len(entry["MESSAGE"]) <= 32 * 1024
        assert "EXTRA_39" in entry["VIBECTLD_FIELDS_DROPPED"]

    def test_security_exposure(self, deb_box: Container) -> None:
        out = deb_box.run(["systemd-analyze", "security", "--no-pager", "vibectld.service"])
        match = re.search(r"Overall exposure level for vibectld\.service:\s*([\d.]+)", out.stdout)
        assert match, out.describe()
        exposure = float(match.group(1))
        note(f"systemd-analyze security vibectld: overall exposure {exposure}")
        assert exposure <= EXPOSURE_LIMIT, out.stdout

    def test_stop_is_clean_and_nothing_restarted(self, deb_box: Container) -> None:
        # Neither a crash nor the watchdog restarted the daemon during the steps above.
        assert show(deb_box, "NRestarts") == "0"
        started = time.monotonic()
        with timed("deb: systemctl stop vibectld"):
            ok(systemctl(deb_box, "stop", "vibectld"))
        assert time.monotonic() - started < 25, "stop should not run into TimeoutStopSec"
        assert unit_state(deb_box) == "inactive"
        assert show(deb_box, "Result") == "success"

    def test_purge_removes_unit_and_state(self, deb_box: Container, state: State) -> None:
        with timed("deb: apt-get purge"):
            ok(deb_box.run(["apt-get", "purge", "-y", "vibectld"], timeout=300))
        assert unit_state(deb_box) in ("inactive", "unknown")
        listed = deb_box.run(["systemctl", "list-unit-files", "--no-legend", "vibectld.service"])
        assert "vibectld.service" not in listed.stdout, listed.describe()
        for gone in (*UNIT_PATHS, "/var/lib/vibectld", "/etc/vibectld"):
            assert not deb_box.path(gone).exists(), f"{gone} survived the purge"
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", state.port), 2):
            pass


# -- the .rpm -----------------------------------------------------------------------------


@pytest.fixture(scope="class")
def rpm_box(cached_rootfs: Path) -> Iterator[Container]:
    with booted(cached_rootfs, "rpm") as box:
        yield box


class TestRpm:
    def test_rpm_installs_starts_and_serves(
        self, rpm_box: Container, built_packages: packages.Packages, echo_wheel: Path
    ) -> None:
        rpm = f"{STAGING}/{built_packages.rpm.name}"
        shutil.copy(built_packages.rpm, rpm_box.path(rpm))
        with timed("rpm: rpm -i --nodeps"):
            ok(rpm_box.run(["rpm", "-i", "--nodeps", rpm], timeout=300))
        ok(rpm_box.run(["getent", "passwd", "vibectld"]))
        ok(rpm_box.run(["getent", "group", "vibectld-admin"]))
        assert rpm_box.run(["systemctl", "is-enabled", "vibectld"]).stdout.strip() == "enabled"
        assert unit_state(rpm_box) == "inactive"
        shipped = ensure_echo_model(rpm_box, echo_wheel)
        note(f"rpm: llm-echo {'shipped in' if shipped else 'NOT shipped; added to'} /opt/vibectld")
        port = free_port()
        write_config(rpm_box, config_yaml(port))
        with timed("rpm: systemctl start vibectld"):
            ok(systemctl(rpm_box, "start", "vibectld"))
        assert unit_state(rpm_box) == "active"
        HostClient(issue(rpm_box, "carol")).served("hello from carol")

    def test_rpm_erase_stops_and_removes_the_unit(self, rpm_box: Container) -> None:
        ok(rpm_box.run(["rpm", "-e", "--nodeps", "vibectld"], timeout=300))
        assert unit_state(rpm_box) in ("inactive", "unknown")
        for gone in UNIT_PATHS:
            assert not rpm_box.path(gone).exists(), f"{gone} survived rpm -e"
