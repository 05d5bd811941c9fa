"""`make bench`: vibectld against a bare gRPC floor, on this machine.

Starts vibectld (a temporary state directory, the `echo` model, no limits, JSON
logs to a file) and the floor server with vibectld's own TLS certificate, then
runs the load generator in its own process for each of (unary, streaming) x
(1, 16 callers), against both servers, alternating which goes first, each
measurement repeated. Prints a table and PASS/FAIL against the targets, and
writes the table to bench/results/<date>.md.

Exit status: 0 when every measurement completed without errors (whatever the
targets say, unless --strict); 1 when a measurement failed or saw errors; 3
with --strict when a target was missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from bench.report import Cell, Row, checks, machine_info, markdown, table
from bench.servers import REPO, BenchError, Floor, Processes, Vibectld

MODES = ("unary", "stream")
CALLERS = (1, 16)
RESULTS_DIR = REPO / "bench" / "results"


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def measure(
    port: int,
    ca: Path,
    secret: str,
    server_pid: int,
    mode: str,
    callers: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One run of bench.load in its own process; its JSON result."""
    argv = [
        sys.executable, "-m", "bench.load", "--json",
        "--port", str(port), "--ca", str(ca), "--mode", mode,
        "--callers", str(callers), "--channels", str(args.channels),
        "--duration", str(args.duration), "--warmup", str(args.warmup),
        "--server-pid", str(server_pid),
    ]  # fmt: skip
    env = {**os.environ, "VIBECTLD_BENCH_SECRET": secret}
    budget = args.warmup + args.duration + 60
    try:
        out = subprocess.run(
            argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget, check=False
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"bench.load did not finish within {budget:.0f} s") from None
    lines = out.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(
            f"bench.load failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}"
        ) from None
    return result


def run(args: argparse.Namespace, workdir: Path, sockdir: Path) -> int:
    procs = Processes()
    try:
        daemon = Vibectld(procs, workdir, sockdir)
        daemon.start()
        floor = Floor(procs)
        floor.start(*daemon.chain_for_floor())
        print(
            f"vibectld pid {daemon.pid} on 127.0.0.1:{daemon.port} (log {daemon.log_path}); "
            f"floor pid {floor.pid} on 127.0.0.1:{floor.port}",
            flush=True,
        )
        servers = {
            "floor": (floor.port, floor.pid),
            "vibectld": (daemon.port, daemon.pid),
        }
        rows: list[Row] = []
        failed: list[str] = []
        for mode in MODES:
            for callers in CALLERS:
                got: dict[str, list[dict[str, Any]]] = {"floor": [], "vibectld": []}
                for rep in range(args.repeats):
                    order = ["floor", "vibectld"] if rep % 2 == 0 else ["vibectld", "floor"]
                    for name in order:
                        port, pid = servers[name]
                        result = measure(
                            port, daemon.ca_path, daemon.secret, pid, mode, callers, args
                        )
                        got[name].append(result)
                        print(
                            f"  {mode:6} callers={callers:<3} rep {rep + 1} {name:8} "
                            f"{result['rps']:8.0f} req/s  p50 {result['p50_ms']:.3f} ms  "
                            f"p99 {result['p99_ms']:.3f} ms  errors {result['errors']}  "
                            f"client cpu {result['client_cpu_util']:.0%}",
                            flush=True,
                        )
                        if result["errors"]:
                            print(f"    e.g. {result['error_samples'][:2]}", flush=True)
                        if result["errors"] or not result["count"]:
                            failed.append(
                                f"{name} {mode} x{callers}: {result['errors']} errors, "
                                f"{result['count']} ok; e.g. {result['error_samples'][:2]}"
                            )
                rows.append(
                    Row(
                        mode, callers, Cell.median_of(got["floor"]), Cell.median_of(got["vibectld"])
                    )
                )
    finally:
        procs.stop_all()

    verdicts = checks(rows)
    settings = (
        f"{args.duration:g} s per measurement after {args.warmup:g} s warm-up, "
        f"{args.repeats} repeat(s), {args.channels} channel(s) per load generator"
    )
    print()
    print(table(rows))
    print()
    for check in verdicts:
        print(check.line())
    for failure in failed:
        print(f"ERROR  {failure}")
    if not args.no_write:
        date = dt.date.today().isoformat()
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{date}.md"
        path.write_text(markdown(date, settings, rows, verdicts, machine_info()))
        print(f"\nwrote {path.relative_to(REPO)}")
    if failed:
        return 1
    if args.strict and not all(c.passed for c in verdicts):
        return 3
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="measured seconds per measurement (default 5)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="warm-up seconds before each measurement (default 1)",
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
        help="a smoke run: 1 s measurements, 0.5 s warm-up, 1 repeat",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="do not write bench/results/<date>.md"
    )
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (config, state, vibectld's log)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.quick:
        args.duration, args.warmup, args.repeats = 1.0, 0.5, 1
    if not 0.1 <= args.duration <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--duration must be 0.1..600 and --warmup 0..60 seconds")
    if not 1 <= args.repeats <= 20 or not 1 <= args.channels <= 64:
        parser.error("--repeats must be 1..20 and --channels 1..64")
    print(f"vibectld benchmark: {args.duration:g} s per measurement, {args.repeats} repeat(s)")

    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="vibectld-bench-"))
    # Unix socket paths are limited to 107 bytes: keep the admin socket's short.
    sockdir = Path(tempfile.mkdtemp(prefix="vdb-", dir="/tmp"))
    code = 1
    try:
        code = run(args, workdir, sockdir)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
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
    sys.exit(code)


if __name__ == "__main__":
    main()
