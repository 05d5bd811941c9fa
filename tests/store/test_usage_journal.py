"""The usage journal (vibectld/store/journal.py): a registry killed before its flush loses
no counted call, and no call is ever counted twice.

Each test runs on SQLite and on PostgreSQL (tests/store/backends.py). A kill is either
real (a child process counting calls, killed with SIGKILL) or what one leaves behind,
made in this process by `drop`: the database without the unflushed counts, the journal's
files as written, and no flush or close.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.postgres import Postgres
from tests.store.backends import Backend, PostgreSQLBackend, SQLiteBackend, drop
from vibectld.store import transfer
from vibectld.store.base import Transaction
from vibectld.store.journal import JournalBusy
from vibectld.store.postgresql import PostgreSQLDatabase
from vibectld.store.registry import ClientRecord, Registry

NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC
DAY = 86400
TODAY = "2027-01-15"


def open_store(backend: Backend, journal: Path) -> Registry:
    return Registry.load(backend.database(), now=NOW, journal=journal)


def issue(reg: Registry, name: str = "alice") -> ClientRecord:
    return reg.issue(name=name, expires_at=NOW + 90 * DAY, issued_by="root", now=NOW)


def call(reg: Registry, client: ClientRecord, at: int = NOW, cost: float = 0.25) -> None:
    reg.record_call(
        client.id, now=at, error=False, input_tokens=10, output_tokens=20, cost_usd=cost
    )


def usage(backend: Backend, client: ClientRecord) -> tuple[int, int, int, float]:
    found = backend.sql(
        "SELECT requests, input_tokens, output_tokens, cost_usd FROM usage "
        "WHERE client_id = ? AND day = ?",
        (client.id, TODAY),
    )
    return found[0] if found else (0, 0, 0, 0.0)


def requests(backend: Backend, client: ClientRecord) -> tuple[int, int | None]:
    [row] = backend.sql("SELECT requests, last_seen_at FROM clients WHERE id = ?", (client.id,))
    return row


def segments(journal: Path) -> list[str]:
    return sorted(p.name for p in journal.glob("*.log"))


def test_a_dropped_registry_s_calls_are_replayed_exactly_once(
    backend: Backend, tmp_path: Path
) -> None:
    journal = tmp_path / "usage-journal"
    reg = open_store(backend, journal)
    alice = issue(reg)
    for i in range(5):
        call(reg, alice, NOW + i)
    reg.record_redactions(alice.id, now=NOW, found={"aws-key": 2, "email": 1})
    drop(reg)
    assert usage(backend, alice) == (0, 0, 0, 0.0)  # never flushed

    again = open_store(backend, journal)
    assert usage(backend, alice) == (5, 50, 100, 1.25)
    assert requests(backend, alice) == (5, NOW + 4)
    assert sorted(backend.sql("SELECT kind, count FROM redactions")) == [
        ("aws-key", 2),
        ("email", 1),
    ]
    assert again.tokens_used(alice.id, NOW) == 150  # loaded after the replay
    again.close()
    assert segments(journal) == []  # replayed, then deleted; a clean close leaves none

    Registry.load(backend.database(), now=NOW, journal=journal).close()
    assert usage(backend, alice) == (5, 50, 100, 1.25)


def test_a_crash_between_the_commit_and_the_deletion_does_not_count_twice(
    backend: Backend, tmp_path: Path
) -> None:
    journal = tmp_path / "usage-journal"
    reg = open_store(backend, journal)
    alice = issue(reg)
    for i in range(3):
        call(reg, alice, NOW + i)
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in segments(journal):
        shutil.copy(journal / name, kept / name)
    reg.flush()
    assert segments(journal) == ["000000000002.log"]  # the new, empty one
    call(reg, alice, NOW + 3)
    drop(reg)
    # The crash came after the commit, before the deletion: the flushed segment is back.
    for name in segments(kept):
        shutil.copy(kept / name, journal / name)

    open_store(backend, journal).close()
    assert usage(backend, alice) == (4, 40, 80, 1.0)
    assert requests(backend, alice) == (4, NOW + 3)
    assert segments(journal) == []


def test_a_failed_flush_keeps_its_segment_and_the_next_one_covers_it(
    backend: Backend, tmp_path: Path
) -> None:
    journal = tmp_path / "usage-journal"
    reg = open_store(backend, journal)
    alice = issue(reg)
    call(reg, alice, NOW)
    call(reg, alice, NOW + 1)
    with backend.failing("usage"), pytest.raises(Exception, match="disk on fire"):
        reg.flush()
    assert segments(journal) == ["000000000001.log", "000000000002.log"]
    call(reg, alice, NOW + 2)
    reg.flush()  # the counts put back, and the one since: segments 1 and 2
    assert usage(backend, alice)[0] == 3
    assert segments(journal) == ["000000000003.log"]
    call(reg, alice, NOW + 3)
    with backend.failing("usage"), pytest.raises(Exception, match="disk on fire"):
        reg.flush()
    drop(reg)  # killed with a failed flush's segment on disk

    open_store(backend, journal).close()
    assert usage(backend, alice) == (4, 40, 80, 1.0)
    assert requests(backend, alice) == (4, NOW + 3)


def test_a_close_whose_flush_fails_leaves_the_counts_to_the_next_start(
    backend: Backend, tmp_path: Path
) -> None:
    journal = tmp_path / "usage-journal"
    reg = open_store(backend, journal)
    alice = issue(reg)
    call(reg, alice)
    call(reg, alice, NOW + 1)
    with backend.failing("usage"), pytest.raises(Exception, match="disk on fire"):
        reg.close()
    assert usage(backend, alice)[0] == 0
    open_store(backend, journal).close()
    assert usage(backend, alice) == (2, 20, 40, 0.5)


def test_a_killed_process_loses_no_counted_call(backend: Backend, tmp_path: Path) -> None:
    """A real SIGKILL: the child counts calls, says so, and is killed before any flush."""
    journal = tmp_path / "usage-journal"
    reg = open_store(backend, journal)
    alice = issue(reg)
    reg.close()
    if isinstance(backend, SQLiteBackend):
        opening = f"Registry.open(Path({str(backend.path)!r}), journal=journal)"
    else:
        assert isinstance(backend, PostgreSQLBackend)
        opening = f"Registry.open_postgresql({backend.postgres.dsn!r}, journal=journal)"
    child = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from vibectld.store.registry import Registry
        journal = Path({str(journal)!r})
        reg = {opening}
        for i in range(1000):
            reg.record_call({alice.id!r}, now=int(time.time()), error=i % 10 == 0,
                            input_tokens=3, output_tokens=4, cost_usd=0.001)
        print("counted", flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "counted\n"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL

    open_store(backend, journal).close()
    [(calls, errors, tokens_in, tokens_out, cost)] = backend.sql(
        "SELECT SUM(requests), SUM(errors), SUM(input_tokens), SUM(output_tokens), "
        "SUM(cost_usd) FROM usage WHERE client_id = ?",
        (alice.id,),
    )
    assert (calls, errors, tokens_in, tokens_out) == (1000, 100, 3000, 4000)
    assert cost == pytest.approx(1.0)
    assert requests(backend, alice)[0] == 1000


def test_one_journal_one_process_and_its_files_are_private(
    backend: Backend, tmp_path: Path
) -> None:
    journal = tmp_path / "usage-journal"
    reg = open_store(backend, journal)
    alice = issue(reg)
    call(reg, alice)
    with pytest.raises(JournalBusy, match="another vibectld uses the usage journal"):
        open_store(backend, journal)
    assert stat.S_IMODE(journal.stat().st_mode) == 0o700
    for path in journal.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    reg.close()


def test_two_nodes_on_one_postgresql_each_replay_their_own_journal(
    postgres: Postgres, tmp_path: Path
) -> None:
    backend = PostgreSQLBackend(postgres)
    one, two = tmp_path / "node1", tmp_path / "node2"
    node1 = open_store(backend, one)
    node2 = open_store(backend, two)
    alice = issue(node1)
    node2._learn([alice])  # as its feed would bring it
    for i in range(3):
        call(node1, alice, NOW + i)
    node1.flush()
    call(node1, alice, NOW + 5)
    for i in range(4):
        call(node2, alice, NOW + 10 + i)
    drop(node1)
    drop(node2)

    # Each node's replay is its own: node 2's restart leaves node 1's segment alone.
    open_store(backend, two).close()
    assert usage(backend, alice)[0] == 3 + 4
    open_store(backend, one).close()
    assert usage(backend, alice)[0] == 3 + 1 + 4
    assert requests(backend, alice) == (8, NOW + 13)
    marks = backend.sql("SELECT journal, applied FROM usage_journals ORDER BY applied")
    assert [applied for _, applied in marks] == [1, 2]
    identities = {(d / "identity").read_text().strip() for d in (one, two)}
    assert {journal for journal, _ in marks} == identities


def test_a_torn_or_foreign_line_is_skipped_and_the_rest_replayed(
    backend: Backend, tmp_path: Path
) -> None:
    journal = tmp_path / "usage-journal"
    reg = open_store(backend, journal)
    alice = issue(reg)
    call(reg, alice)
    call(reg, alice, NOW + 1)
    drop(reg)
    [segment] = journal.glob("*.log")
    with segment.open("ab") as f:
        f.write(b"not a record\n" + f"c\t{alice.id}\t{NOW}\t0\t1".encode())  # torn at the end
    with capture_logs() as logs:
        open_store(backend, journal).close()
    assert usage(backend, alice) == (2, 20, 40, 0.5)
    [replayed] = [e for e in logs if e["event"] == "usage_journal.replayed"]
    assert (replayed["calls"], replayed["torn_lines"]) == (2, 2)


def test_a_call_the_journal_could_not_write_is_still_counted_and_reported(
    backend: Backend, tmp_path: Path
) -> None:
    journal = tmp_path / "usage-journal"
    reg = open_store(backend, journal)
    alice = issue(reg)
    call(reg, alice)
    held = reg._journal
    assert held is not None and held._fd is not None
    os.close(held._fd)  # every write now fails (EBADF), as on a full disk
    call(reg, alice, NOW + 1)
    held._fd = None  # the descriptor is gone; rotate must not close it again
    with capture_logs() as logs:
        reg.flush()
    assert usage(backend, alice)[0] == 2  # counted in memory, written by the flush
    [failed] = [e for e in logs if e["event"] == "usage_journal.write_failed"]
    assert failed["calls"] == 1 and failed["log_level"] == "warning"
    call(reg, alice, NOW + 2)  # the next segment takes writes again
    drop(reg)
    open_store(backend, journal).close()
    assert usage(backend, alice)[0] == 3


def test_storage_migrate_carries_which_segments_the_usage_holds(
    postgres: Postgres, tmp_path: Path
) -> None:
    """A segment the SQLite store had applied, left on disk (its deletion failed), is not
    replayed into the PostgreSQL copy: the copy carries the journal's record with it."""
    journal = tmp_path / "usage-journal"
    single = SQLiteBackend(tmp_path / "state" / "registry.db")
    reg = open_store(single, journal)
    alice = issue(reg)
    for i in range(3):
        call(reg, alice, NOW + i)
    [segment] = journal.glob("*.log")
    kept = segment.read_bytes()
    reg.flush()
    target = PostgreSQLDatabase.open(postgres.dsn)

    def copy(source: Transaction) -> None:
        # The tables storage migrate copies that this needs, as it copies them.
        def tables(tx: Transaction) -> None:
            for table in ("clients", "usage", "usage_journals"):
                transfer._copy_table(source, tx, table, transfer._TABLES[table])

        target.transaction(tables)

    try:
        reg.transact(copy)
    finally:
        target.close()
    reg.close()
    segment.write_bytes(kept)  # as if its deletion had failed

    cluster = PostgreSQLBackend(postgres)
    open_store(cluster, journal).close()
    assert usage(cluster, alice) == (3, 30, 60, 0.75)
    assert segments(journal) == []
