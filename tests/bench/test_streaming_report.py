"""The streaming section's report for one server.workers setting: its table is titled
with the setting, and every graded target names it (so the workers 1 and 2 runs of one
bench run are told apart in the summary)."""

from __future__ import annotations

from bench.common import Section
from bench.sections import streaming
from bench.streams import Run


def _run(client: str, n: int, rate: float, rss: int | None) -> Run:
    grpc = client != "raw"
    return Run(client, n, tokens_per_s=rate, ttft_p50_ms=25.0, ttft_p99_ms=60.0,
               gap_p99_ms=30.0, tokens_per_message=1.5 if grpc else 1.0, errors=0,
               error_samples=[], daemon_cpu_us_per_token=40.0 if grpc else None,
               daemon_rss_kib=rss if grpc else None, worker_cpu_max=0.3)  # fmt: skip


def test_one_table_and_targets_per_workers_setting() -> None:
    got = {
        (n, client): [_run(client, n, rate, 100_000 + 40 * n) for rate in (900.0, 1000.0)]
        for n in streaming.LEVELS
        for client in ("raw", "grpc", "floor")
    }
    section = Section("streaming", "Streaming at scale")
    streaming.report(section, got, 100_000, 2)
    (table,) = section.tables
    assert table.startswith("server.workers: 2\n")
    assert "| 400 | vibectld | 950 | 100% |" in table
    assert "| 400 | gRPC floor | 950 | 100% |" in table
    graded = [c for c in section.checks if c.passed is not None]
    names = [c.name for c in graded]
    assert len(names) == 6 and all(name.endswith(", 2 workers") for name in names)
    # vibectld beside the floor at 400 and 1,000 streams: shown, not graded.
    beside = [c for c in section.checks if c.passed is None]
    # 40 KiB more per stream at every level: the slope from 400 to 1,000 is 41 kB too.
    assert [c.detail for c in beside] == ["41.0 kB", "100%", "100%"]
    assert "RSS per added open stream" in beside[0].name
    assert all("(2 w.) vs the gRPC floor" in c.name for c in beside[1:])
    verdicts = {c.name.split(" at ")[0]: c.passed for c in graded}
    assert verdicts["vibectld CPU per relayed chunk"] is False  # 40 us > 35 us
    # (RSS during - idle) * 1.024 / streams: 40 KiB per stream is 41 kB.
    rss = next(c for c in section.checks if c.name.startswith("RSS per open stream"))
    assert rss.passed and "41.0 kB" in rss.detail
