"""`make bench`: how vibectld performs on this machine, section by section.

Sections (all by default; `--only a,b` picks some):

  overhead   vibectld vs a bare grpc.aio server of the same protocol (the floor):
             req/s and p50/p99 at 1/16/64 callers, unary and streaming, time to first chunk
  provider   a fake OpenAI-compatible endpoint (20 ms) called raw (aiohttp, httpx),
             through llm in-process (vibectld's model for the endpoint and llm's stock
             one) and through vibectld: p50/p99, req/s at 1 and 16 callers, TTFT
  registry   throughput with 100,000 issued / 50,000 revoked clients vs 1; admin
             issue/revoke latency at that size
  footprint  RSS idle / after 100k / after 200k calls; start to READY=1; client cold
             start of `vibectl ask` in proxy vs direct mode
  isolation  a client at 10x its rpm limit next to a normal one: the normal one's p99
  redaction  replacing secrets in a 10 kB and a 200 kB kubectl prompt: the client's
             request hook and the server's engine on an ExecuteRequest (redact, refuse)
  streaming  100 / 400 / 1,000 concurrent streams from a paced provider (50 tokens, one
             per 20 ms) through vibectld beside a raw SSE client: chunks/s, time to first
             token, gaps, vibectld CPU per chunk, RSS per stream; 100 clients never reading
  cluster    storage.backend: postgresql: the provider path vs raw HTTP, echo vs the
             same node on SQLite, database statements per call, revocation on one of
             three nodes until the others refuse it, under load

Every load generator runs in its own process; each figure is the median of the
repeats, and every ratio compares measurements of the same run. Each section prints
its table and PASS/FAIL per target as it finishes; at the end a summary table is
printed. A full run writes bench/results/<date>.md (replacing the day's file) and
bench/results/latest-summary.md (the table for the README); a run with --only writes
bench/results/<date>-<sections>.md instead; --quick and --no-write write nothing.

Exit status: 0 when every measurement completed without errors (whatever the
targets say, unless --strict); 1 when a measurement failed or saw errors; 3
with --strict when a target was missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench.common import Context, Section, Settings
from bench.report import machine_info, markdown, summary_markdown, summary_table
from bench.sections import (
    cluster,
    footprint,
    isolation,
    overhead,
    provider,
    redaction,
    registry,
    streaming,
)
from bench.servers import REPO, BenchError, Processes

RESULTS_DIR = REPO / "bench" / "results"
SECTIONS: dict[str, Callable[[Context], Section]] = {
    "overhead": overhead.run,
    "provider": provider.run,
    "registry": registry.run,
    "footprint": footprint.run,
    "isolation": isolation.run,
    "redaction": redaction.run,
    "streaming": streaming.run,
    "cluster": cluster.run,
}
TITLES = {
    "overhead": "Overhead vs the floor",
    "provider": "The real provider path",
    "registry": "Scale of the registry",
    "footprint": "Footprint",
    "isolation": "Isolation",
    "redaction": "Redaction",
    "streaming": "Streaming at scale",
    "cluster": cluster.TITLE,
}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(SECTIONS)}"
        )
    # In the canonical order, each once.
    return [n for n in SECTIONS if n in names]


def run_sections(
    names: list[str], settings: Settings, workdir: Path, sockdir: Path
) -> list[Section]:
    done: list[Section] = []
    for name in names:
        print(f"\n=== {TITLES[name]} ===", flush=True)
        procs = Processes()
        ctx = Context(settings, procs, workdir / name, sockdir)
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            section = SECTIONS[name](ctx)
        except BenchError as e:
            section = Section(name, TITLES[name])
            section.failures.append(f"the section could not run: {e}")
        except Exception:
            section = Section(name, TITLES[name])
            section.failures.append(f"the section crashed:\n{traceback.format_exc()}")
        finally:
            procs.stop_all()
        section.seconds = time.monotonic() - t0
        print()
        print(section.text(), flush=True)
        done.append(section)
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        type=_sections,
        default=list(SECTIONS),
        metavar="A,B",
        help=f"run only these sections ({','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=4.0,
        help="measured seconds of one closed-loop measurement (default 4; the provider "
        "section uses at most 3)",
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up seconds before each (default 1)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repeats of each measurement; the median is reported (default 3)",
    )
    parser.add_argument(
        "--channels", type=int, default=1, help="gRPC channels per load generator (default 1)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (under a minute): short measurements, 1 repeat, small "
        "registry and call counts; writes nothing",
    )
    parser.add_argument("--no-write", action="store_true", help="write no results file")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (configs, state, vibectld's logs)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeats = 0.6, 0.3, 1
    if not 0.1 <= args.duration <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--duration must be 0.1..600 and --warmup 0..60 seconds")
    if not 1 <= args.repeats <= 20 or not 1 <= args.channels <= 64:
        parser.error("--repeats must be 1..20 and --channels 1..64")
    settings = Settings(
        quick=args.quick,
        repeats=args.repeats,
        duration=args.duration,
        warmup=args.warmup,
        channels=args.channels,
    )
    described = (
        f"{args.duration:g} s per closed-loop measurement after {args.warmup:g} s warm-up, "
        f"{args.repeats} repeat(s), {args.channels} gRPC channel(s) per load generator"
        + (" (--quick)" if args.quick else "")
    )
    print(f"vibectld benchmark: {', '.join(args.only)}; {described}", flush=True)

    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="vibectld-bench-"))
    # Unix socket paths are limited to 107 bytes: keep the sockets' directory short.
    sockdir = Path(tempfile.mkdtemp(prefix="vdb-", dir="/tmp"))
    started = time.monotonic()
    sections: list[Section] = []
    code = 1
    try:
        sections = run_sections(args.only, settings, workdir, sockdir)
        code = 0
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        code = 130
    finally:
        sys.stdout.flush()
        shutil.rmtree(sockdir, ignore_errors=True)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if code:
        sys.exit(code)
    seconds = time.monotonic() - started

    print("\n=== Summary ===\n")
    print(summary_table(sections))
    checks = [c for s in sections for c in s.checks if c.passed is not None]
    missed = [c for c in checks if not c.passed]
    print(f"\n{len(checks) - len(missed)} of {len(checks)} targets met; {seconds / 60:.1f} min")
    failures = [f for s in sections for f in s.failures]
    for f in failures:
        print(f"ERROR  {f.splitlines()[0]}")

    if not (args.no_write or args.quick):
        date = dt.date.today().isoformat()
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        full = args.only == list(SECTIONS)
        path = RESULTS_DIR / (f"{date}.md" if full else f"{date}-{'-'.join(args.only)}.md")
        path.write_text(markdown(date, described, sections, machine_info(), seconds))
        print(f"\nwrote {path.relative_to(REPO)}")
        if full:
            latest = RESULTS_DIR / "latest-summary.md"
            latest.write_text(summary_markdown(date, sections))
            print(f"wrote {latest.relative_to(REPO)}")
    if failures:
        sys.exit(1)
    if args.strict and missed:
        sys.exit(3)


if __name__ == "__main__":
    main()
