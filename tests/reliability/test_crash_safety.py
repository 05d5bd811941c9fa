"""Crash safety: kill -9 the daemon while 1,000 issue-client/revoke-client operations run.

Eight threads drive the admin socket (one AdminClient connection each), each issuing its
own clients and revoking three of every four right after. Every operation is recorded as
acknowledged (a response arrived) or not. Once 500 have been acknowledged the daemon is
killed with SIGKILL. Then:

- on the crash image (the files as the killed process left them, copied aside): SQLite's
  `PRAGMA integrity_check` says "ok", every acknowledged issue is a row and every
  acknowledged revoke has its revocation time;
- restarted on the same state directory: every acknowledged issue is listed by
  `list_clients --all`, every acknowledged revoke shows as revoked, nothing is there that
  was never sent, and every secret we hold is served exactly as its status says — in
  particular no revoked secret is served (UNAUTHENTICATED for each one);
- the rest of the 1,000 operations then run on the restarted daemon, which exits 0 on
  SIGTERM and leaves a database that passes `integrity_check` again.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.reliability._procs import DaemonProcess, execute, secret_of
from vibectld.admin.client import AdminClient, AdminClientError

pytestmark = pytest.mark.timeout(150)

TOTAL_OPS = 1000
KILL_AFTER_ACKS = 500  # give or take RANDOM_SPREAD, so the kill lands in varied states
RANDOM_SPREAD = 50
THREADS = 8


@dataclass
class Op:
    kind: str  # "issue" or "revoke"
    name: str
    client_id: str | None = None  # known once the issue is acknowledged
    url: str | None = None
    acked: bool = False
    error: str | None = None
    sent_at: float = 0.0


@dataclass
class Driver:
    """Runs up to `budget` operations over the admin socket from THREADS threads."""

    socket: Path
    prefix: str
    budget: int
    seed: int
    kill_after: int | None = None
    ops: list[Op] = field(default_factory=list)
    acks: int = 0
    tickets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    reached: threading.Event = field(default_factory=threading.Event)

    def _ticket(self) -> bool:
        with self.lock:
            if self.tickets >= self.budget:
                return False
            self.tickets += 1
            return True

    def _run(self, client: AdminClient, op: Op, args: dict[str, object]) -> bool:
        with self.lock:
            self.ops.append(op)
        op.sent_at = time.monotonic()
        try:
            result = client.call("issue_client" if op.kind == "issue" else "revoke_client", args)
        except AdminClientError as e:
            op.error = f"{e.code}: {e.message}"
            return False
        if op.kind == "issue":
            op.client_id, op.url = str(result["id"]), str(result["url"])
        op.acked = True
        with self.lock:
            self.acks += 1
            if self.kill_after is not None and self.acks >= self.kill_after:
                self.reached.set()
        return True

    def worker(self, w: int) -> None:
        # Three in four clients are revoked; which ones varies, so the threads drift apart.
        rng = random.Random(self.seed * 1000 + w)
        with AdminClient(self.socket, timeout=20) as client:
            for i in range(TOTAL_OPS):
                if not self._ticket():
                    return
                issued = Op("issue", f"{self.prefix}{w}-{i}")
                if not self._run(client, issued, {"name": issued.name, "expires": "1d"}):
                    return  # the daemon is gone
                if rng.random() >= 0.75 or not self._ticket():
                    continue
                revoke = Op("revoke", issued.name, client_id=issued.client_id, url=issued.url)
                if not self._run(client, revoke, {"target": issued.client_id}):
                    return

    def run(self) -> None:
        threads = [threading.Thread(target=self.worker, args=(w,)) for w in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "an admin driver thread hung"


def integrity(db: Path, *, copy_to: Path | None = None) -> tuple[str, dict[str, int | None]]:
    """integrity_check of the registry and {client id: revoked_at}, read without writing.

    With `copy_to`, the database and its WAL are copied there first and the copy is
    opened, so the crash image is examined exactly as it was left.
    """
    if copy_to is not None:
        copy_to.mkdir()
        for suffix in ("", "-wal"):
            source = db.with_name(db.name + suffix)
            if source.exists():
                shutil.copy2(source, copy_to / source.name)
        uri = f"file:{copy_to / db.name}"
    else:
        uri = f"file:{db}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        (verdict,) = conn.execute("PRAGMA integrity_check").fetchone()
        rows = dict(conn.execute("SELECT id, revoked_at FROM clients").fetchall())
    finally:
        conn.close()
    return str(verdict), rows


def test_kill_9_during_1000_admin_operations_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path) as daemon:
        daemon.start()
        seed = random.randrange(1_000_000)
        rng = random.Random(seed)
        kill_after = KILL_AFTER_ACKS + rng.randint(-RANDOM_SPREAD, RANDOM_SPREAD)
        driver = Driver(daemon.admin_socket, "c", TOTAL_OPS, seed, kill_after=kill_after)
        killer_done = threading.Event()
        killed_at: list[float] = []

        def killer() -> None:
            if driver.reached.wait(60):
                daemon.kill()
                killed_at.append(time.monotonic())
            killer_done.set()

        started = time.monotonic()
        kill_thread = threading.Thread(target=killer)
        kill_thread.start()
        driver.run()
        kill_thread.join(60)
        assert killer_done.is_set() and killed_at, "the daemon was never killed"
        assert daemon.proc is not None and daemon.proc.returncode == -9

        issues = [op for op in driver.ops if op.kind == "issue"]
        revokes = [op for op in driver.ops if op.kind == "revoke"]
        acked_issues = {str(op.client_id): op for op in issues if op.acked}
        acked_revokes = {str(op.client_id): op for op in revokes if op.acked}
        unacked = [op for op in driver.ops if not op.acked]
        assert len(acked_issues) + len(acked_revokes) >= kill_after
        assert all(op.error and op.error.startswith("unreachable") for op in unacked), [
            op.error for op in unacked
        ]

        # The crash image, as the killed process left it.
        db = daemon.state_dir / "registry.db"
        verdict, on_disk = integrity(db, copy_to=tmp_path / "crash-image")
        assert verdict == "ok"
        assert not set(acked_issues) - set(on_disk), "acknowledged issues missing on disk"
        not_revoked = [cid for cid in acked_revokes if on_disk.get(cid) is None]
        assert not not_revoked, f"acknowledged revokes not on disk: {not_revoked}"

        # Restart on the same state directory (over the stale admin socket).
        restart = time.monotonic()
        daemon.start()
        restart_s = time.monotonic() - restart
        listed = {c["id"]: c for c in daemon.admin("list_clients", {"all": True})["clients"]}
        assert not set(acked_issues) - set(listed), "acknowledged issues lost"
        assert all(listed[cid]["status"] == "revoked" for cid in acked_revokes)
        sent_names = {op.name for op in issues}
        assert {c["name"] for c in listed.values()} <= sent_names, "a client nobody issued"
        # Sent before the kill and never answered: these may or may not have happened.
        in_flight = [op for op in unacked if op.sent_at < killed_at[0]]
        unacked_issues = [op for op in in_flight if op.kind == "issue"]
        unacked_revokes = [op for op in in_flight if op.kind == "revoke"]
        names = {c["name"]: c for c in listed.values()}
        issues_applied = sum(op.name in names for op in unacked_issues)
        revokes_applied = sum(
            listed[str(op.client_id)]["status"] == "revoked" for op in unacked_revokes
        )

        # Every secret we hold is served exactly as its status says.
        stub = daemon.stub()
        refused = served = 0
        for cid, op in acked_issues.items():
            assert op.url is not None
            code = execute(stub, secret_of(op.url), timeout=10)
            if listed[str(cid)]["status"] == "revoked":
                assert code == "UNAUTHENTICATED", f"revoked client {op.name} got {code}"
                refused += 1
            else:
                assert code == "OK", f"active client {op.name} got {code}"
                served += 1
        assert refused >= len(acked_revokes) >= 100, f"seed {seed}"

        # The rest of the 1,000 operations, on the restarted daemon: all acknowledged.
        rest = Driver(daemon.admin_socket, "r", TOTAL_OPS - len(driver.ops), seed + 1)
        rest.run()
        assert all(op.acked for op in rest.ops), [op.error for op in rest.ops if not op.acked]
        listed = {c["id"]: c for c in daemon.admin("list_clients", {"all": True})["clients"]}
        for op in rest.ops:
            assert op.client_id in listed
            if op.kind == "revoke":
                assert listed[op.client_id]["status"] == "revoked"
        assert daemon.stop(30) == 0
        verdict, final = integrity(db)
        assert verdict == "ok" and len(final) == len(listed)
        total = len(driver.ops) + len(rest.ops)
        elapsed = time.monotonic() - started

    print(
        f"\ncrash-safety (seed {seed}): {total} admin ops in {elapsed:.1f} s; killed -9 after "
        f"{driver.acks} acks (acked: {len(acked_issues)} issues, {len(acked_revokes)} revokes); "
        f"in flight at the kill, unacked: {len(unacked_issues)} issues "
        f"({issues_applied} applied), {len(unacked_revokes)} revokes "
        f"({revokes_applied} applied), {len(unacked) - len(in_flight)} refused after it; "
        f"lost acked ops: 0; integrity_check: ok (crash image "
        f"and after); restart to READY {restart_s:.2f} s; revoked secrets refused: "
        f"{refused}/{refused}; active secrets served: {served}/{served}"
    )
