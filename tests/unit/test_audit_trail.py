"""AuditTrail.write_held: rows held while the database was away are written oldest first,
each once, even while admin threads keep adding rows to a full queue.

The store here is a small recorder standing in for the database (only `add_audit` is
called): what is under test is the queue, and the race needs a row to arrive in the
middle of a write, which a recorder can do on cue.
"""

from __future__ import annotations

from typing import Any

from vibectld.audit_trail import MAX_HELD_AUDIT_ROWS, AuditTrail


class _Recorder:
    def __init__(self, trail: AuditTrail, arrive_during_first: int) -> None:
        self.trail, self.arrive = trail, arrive_during_first
        self.written: list[int] = []

    def add_audit(self, **row: Any) -> None:
        self.written.append(row["n"])
        # Admin threads add rows while the first held one is being written.
        for i in range(self.arrive):
            self.trail._held.append({"n": 10_000 + i})
        self.arrive = 0


def test_rows_held_are_written_oldest_first_each_once() -> None:
    trail = AuditTrail()
    for n in range(5):
        trail._held.append({"n": n})
    recorder = _Recorder(trail, 0)
    trail.write_held(recorder)  # type: ignore[arg-type]
    assert recorder.written == [0, 1, 2, 3, 4] and not trail.holding


def test_a_row_pushed_out_during_its_write_does_not_take_the_next_with_it() -> None:
    trail = AuditTrail()
    for n in range(MAX_HELD_AUDIT_ROWS):
        trail._held.append({"n": n})
    # One row arrives while row 0 is written: the full queue drops row 0 (written now)
    # to make room, and row 1 must still be written.
    recorder = _Recorder(trail, 1)
    trail.write_held(recorder)  # type: ignore[arg-type]
    assert recorder.written[:3] == [0, 1, 2]
    assert recorder.written[-1] == 10_000
    assert len(recorder.written) == len(set(recorder.written)) == MAX_HELD_AUDIT_ROWS + 1
