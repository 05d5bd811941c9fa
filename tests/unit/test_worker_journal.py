"""The workers' own usage files and the main journal's marks (workers/journal_files.py).

Real files and a real SQLite registry: a worker's `WorkerJournal` writes its lines, the
main process's registry journals the records it was told (tagged), and a kill -9 of the
main process is what `drop` leaves (no flush, no close). The next `Registry.open`
replays: it must count each worker line the main process never journalled, once.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest

from tests.store.backends import drop
from vibectld.store import usage
from vibectld.store.registry import ClientRecord, Registry
from vibectld.workers import journal_files
from vibectld.workers.journal_files import WorkerJournal, recorded_first, tagged

NOW = 1_800_000_000
PER_CALL = 30  # tokens: 10 in, 20 out


def open_registry(tmp_path: Path) -> Registry:
    return Registry.open(tmp_path / "registry.db", now=NOW, journal=tmp_path / "usage-journal")


def issue(reg: Registry) -> ClientRecord:
    return reg.issue(name="alice", expires_at=NOW + 86400, issued_by="root", now=NOW)


def told(reg: Registry, client: ClientRecord, tag: tuple[str, int]) -> None:
    """The main process's side of a worker record: counted and journalled, tagged."""
    with tagged(reg.usage_journal(), tag):
        reg.record_call(
            client.id, now=NOW, error=False, input_tokens=10, output_tokens=20, cost_usd=0.0
        )


def worker_call(worker: WorkerJournal, client: ClientRecord | str) -> tuple[str, int]:
    client_id = client if isinstance(client, str) else client.id
    return worker.call(client_id, NOW, usage.call_counts(False, 10, 20, 0.0))


def test_the_marks_outlive_a_flush_that_deleted_their_segments(tmp_path: Path) -> None:
    reg = open_registry(tmp_path)
    alice = issue(reg)
    journal = reg.usage_journal()
    assert journal is not None
    for seq in (1, 2, 3):
        told(reg, alice, ("a" * 12, seq))
    told(reg, alice, ("b" * 12, 7))
    reg.flush()  # commits and deletes the segments holding those tags
    leftovers = journal.leftovers()
    assert len(leftovers) == 1
    # The new segment's header alone says what was journalled.
    assert journal.journalled(leftovers) == {"a" * 12: 3, "b" * 12: 7}
    told(reg, alice, ("a" * 12, 4))
    assert journal.journalled(journal.leftovers()) == {"a" * 12: 4, "b" * 12: 7}
    # The header is no record: nothing skipped, one call to replay.
    replayed = journal.read(journal.leftovers())
    assert replayed.skipped == 0 and replayed.counters[alice.id][0] == 1
    drop(reg)


def test_a_start_counts_only_the_worker_lines_never_journalled(tmp_path: Path) -> None:
    reg = open_registry(tmp_path)
    alice = issue(reg)
    journal_dir = tmp_path / "usage-journal"
    worker = WorkerJournal(journal_dir)
    tags = [worker_call(worker, alice) for _ in range(5)]
    # The main process journalled 1-3 (a flush committed 1-2 and deleted their segment),
    # then was killed before it read 4 and 5, which the worker had answered.
    told(reg, alice, tags[0])
    told(reg, alice, tags[1])
    reg.flush()
    told(reg, alice, tags[2])
    # Another worker's lines, of which the main journal knows nothing: all count.
    other = WorkerJournal(journal_dir)
    worker_call(other, alice)
    worker_call(other, alice)
    drop(reg)
    worker.close()
    other.close()

    again = open_registry(tmp_path)
    assert again.tokens_used(alice.id, NOW) == 7 * PER_CALL
    assert again.usage_journal() is not None
    assert again.usage_journal().worker_files() == []  # type: ignore[union-attr]
    again.close()
    # Counted once: the next start finds nothing more.
    third = open_registry(tmp_path)
    assert third.tokens_used(alice.id, NOW) == 7 * PER_CALL
    third.close()


def test_a_crash_after_the_replay_commit_counts_no_worker_line_twice(tmp_path: Path) -> None:
    reg = open_registry(tmp_path)
    alice = issue(reg)
    journal_dir = tmp_path / "usage-journal"
    worker = WorkerJournal(journal_dir)
    told(reg, alice, worker_call(worker, alice))
    worker_call(worker, alice)  # answered, never journalled by the main process
    drop(reg)
    worker.close()
    kept = tmp_path / "kept"
    shutil.copytree(journal_dir, kept)

    replayed = open_registry(tmp_path)  # commits both calls, deletes the files
    assert replayed.tokens_used(alice.id, NOW) == 2 * PER_CALL
    drop(replayed)
    # The crash came after that commit, before the deletions: the files are back.
    shutil.rmtree(journal_dir)
    shutil.copytree(kept, journal_dir)

    again = open_registry(tmp_path)
    assert again.tokens_used(alice.id, NOW) == 2 * PER_CALL
    again.close()


def test_a_dead_worker_s_unannounced_lines_are_not_counted(tmp_path: Path) -> None:
    reg = open_registry(tmp_path)
    alice = issue(reg)
    journal = reg.usage_journal()
    assert journal is not None
    worker = WorkerJournal(tmp_path / "usage-journal")
    told(reg, alice, worker_call(worker, alice))
    told(reg, alice, worker_call(worker, alice))
    worker_call(worker, alice)  # written, then the worker was killed before telling it
    worker.close()
    # Its channel read to the end, the main process deletes its files uncounted.
    assert journal.forget_worker(worker.token)
    assert worker.files() == [] and journal.marks == {}
    drop(reg)

    again = open_registry(tmp_path)
    assert again.tokens_used(alice.id, NOW) == 2 * PER_CALL
    again.close()


def test_a_clean_close_keeps_the_marks_while_a_worker_file_remains(tmp_path: Path) -> None:
    reg = open_registry(tmp_path)
    alice = issue(reg)
    worker = WorkerJournal(tmp_path / "usage-journal")
    told(reg, alice, worker_call(worker, alice))
    reg.flush()
    worker.close()
    reg.close()  # the worker's file is still there (not deleted: say, it is unwritable)
    journal_dir = tmp_path / "usage-journal"
    assert len(list(journal_dir.glob("*.log"))) == 1  # the segment whose header has the mark

    again = open_registry(tmp_path)
    assert again.tokens_used(alice.id, NOW) == PER_CALL  # not twice
    again.close()


def test_worker_files_go_once_the_main_process_journalled_all_they_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = "c" * 16
    worker = WorkerJournal(tmp_path)
    for _ in range(3):
        worker_call(worker, alice)
    worker.journalled(3)
    assert len(worker.files()) == 1  # young: kept open for the next records

    monkeypatch.setattr(journal_files, "ROTATE_SECONDS", 0.0)
    worker_call(worker, alice)  # 4
    worker.journalled(3)  # old enough, but 4 is not journalled yet: the file stays
    assert len(worker.files()) == 1
    worker_call(worker, alice)  # 5, in a new file
    assert len(worker.files()) == 2
    worker.journalled(4)  # the first file's every record: it goes
    [left] = worker.files()
    assert left.read_text().startswith(f"c@{worker.token}:5\t")
    assert left.stat().st_mode & 0o777 == 0o600
    worker.journalled(5)
    assert worker.files() == []
    worker.close()


def test_a_counted_call_s_status_waits_for_its_record_and_its_send() -> None:
    events: list[str] = []

    async def execute(request: str, context: object) -> str:
        # As the servicer does: the call is recorded on the loop's next turn.
        asyncio.get_running_loop().call_soon(events.append, "recorded")
        return "reply"

    handler = grpc.unary_unary_rpc_method_handler(execute)
    wrap = recorded_first(lambda: events.append("sent"))
    wrapped = wrap("/vibectl.llm_proxy.VibectlLLMProxy/Execute", handler)
    assert wrap("/grpc.health.v1.Health/Check", handler) is handler  # nothing to record

    async def serve() -> None:
        assert await wrapped.unary_unary("request", None) == "reply"
        events.append("status")

    asyncio.run(serve())
    assert events == ["recorded", "sent", "status"]
