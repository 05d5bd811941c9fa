"""Where vibectld spends its time under a benchmark load: a py-spy profile, summarised.

Starts vibectld (and, for `--model fake-gpt`, the fake provider with 20 ms latency) the
way `make bench` does, runs bench.load against it, records the daemon with py-spy for
`--seconds`, and prints the frames with the largest share of samples, inclusive and
self. py-spy is not a dependency of the project: install it where you like
(`pip install py-spy`) and put it on PATH or pass `--py-spy`. Sampling needs ptrace
rights over the daemon (root, or kernel.yama.ptrace_scope=0).

    python -m bench.profile --model echo --callers 16 --seconds 10
    python -m bench.profile --model fake-gpt --callers 1 --mode stream
    python -m bench.profile --paced 400 --seconds 10   # the streaming section's load

With `--paced N` the provider is the streaming section's paced one (50 tokens, one per
20 ms, bench/fake_paced.py) and the load is N concurrent streams (bench/streams.py).

`--workers N` sets server.workers (default 1: the one process serves, and it is the one
profiled). With more, py-spy records the first serving process, and the CPU per chunk
printed is summed over all of the daemon's processes.

A frame's "self" share in `_run (events.py)` is time in C code called from an asyncio
callback: for a grpc.aio server that is mostly grpc's Cython layer.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.servers import REPO, BenchError, FakeProvider, Processes, Vibectld, clean_env

PROVIDER_MODEL = "fake-gpt"


def _frame(text: str) -> str:
    """`func (path/file.py:123)` -> `func (file.py)`."""
    name, _, where = text.partition(" (")
    if not where:
        return text
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})"


def summarise(raw: Path, top: int) -> str:
    """The collapsed stacks py-spy wrote, as the top frames by share of samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    if not total:
        return "no samples (is the daemon busy? does py-spy have ptrace rights?)"
    lines = [f"{total} samples", "", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top // 2)]
    return "\n".join(lines)


def _spy(args: argparse.Namespace, pid: int, raw: Path) -> list[str]:
    return [
        args.py_spy, "record", "--pid", str(pid), "--duration", str(args.seconds),
        "--rate", str(args.rate), "--format", "raw", "--output", str(raw), "--nonblocking",
    ]  # fmt: skip


def _profiled(daemon: Vibectld, workers: int) -> int:
    """The process to record: the daemon itself, or with workers its first serving one."""
    from bench.streams import process_tree

    if workers == 1:
        return daemon.pid
    serving = sorted(p for p in process_tree(daemon.pid) if p != daemon.pid)
    if not serving:
        raise BenchError(f"server.workers is {workers} but the daemon has no child process")
    return serving[0]


def _profile_paced(args: argparse.Namespace, daemon: Vibectld, raw: Path) -> None:
    """py-spy on the daemon while bench.streams keeps `args.paced` streams open."""
    from bench import streams

    pid = _profiled(daemon, args.workers)
    target = {"port": daemon.port, "ca": daemon.ca_path, "model": PROVIDER_MODEL}
    env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret)
    spy: list[subprocess.Popen[str]] = []
    timer = threading.Timer(
        3.0,
        lambda: spy.append(
            subprocess.Popen(_spy(args, pid, raw), text=True, stderr=subprocess.PIPE)
        ),
    )
    timer.start()
    r = streams.measure(
        "grpc", target, args.paced, env, pid=daemon.pid, warmup=2.5, duration=args.seconds + 1
    )
    timer.join()
    _, err = spy[0].communicate(timeout=60)
    print(
        f"load: {args.paced} streams, {r.tokens_per_s:.0f} chunks/s, TTFT p50 {r.ttft_p50_ms:.1f}"
        f" ms, {c_fmt(r.daemon_cpu_us_per_token)} us of vibectld CPU per chunk, "
        f"{r.tokens_per_message:.2f} chunks per message, {r.errors} errors"
    )
    if spy[0].returncode != 0 or not raw.exists():
        raise BenchError(f"py-spy failed: {err.strip()[-1000:]}")
    print(summarise(raw, args.top))


def c_fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=("echo", PROVIDER_MODEL), default="echo")
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10, help="how long to record")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40, help="how many frames to print")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy binary")
    parser.add_argument("--out", type=Path, default=None, help="keep the raw stacks here")
    parser.add_argument(
        "--paced", type=int, default=0, metavar="N", help="N streams from the paced provider"
    )
    parser.add_argument("--workers", type=int, default=1, help="server.workers (default 1)")
    args = parser.parse_args(argv)
    if not args.py_spy:
        parser.error("py-spy is not on PATH: pip install py-spy, or pass --py-spy")
    if not 1 <= args.seconds <= 120 or not 1 <= args.callers <= 256:
        parser.error("--seconds must be 1..120 and --callers 1..256")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be 1..64")

    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="vibectld-profile-"))
    sockdir = Path(tempfile.mkdtemp(prefix="vdp-", dir="/tmp"))
    raw = args.out or workdir / "stacks.txt"
    try:
        models: dict[str, object] = {"default": "echo"}
        if args.paced:
            args.model = PROVIDER_MODEL
            fake = FakeProvider(procs, 20.0, chunk_delay_ms=20, module="bench.fake_paced")
            fake.start()
            models["openai_compatible"] = [
                {"model_id": PROVIDER_MODEL, "model_name": "fake", "api_base": fake.api_base}
            ]
        elif args.model == PROVIDER_MODEL:
            fake = FakeProvider(procs, 20.0)
            fake.start()
            models["openai_compatible"] = [
                {"model_id": PROVIDER_MODEL, "model_name": "fake", "api_base": fake.api_base}
            ]
        daemon = Vibectld(
            procs, workdir, sockdir, name="profiled", models=models, workers=args.workers
        )
        daemon.start()
        if args.paced:
            _profile_paced(args, daemon, raw)
            return
        load = subprocess.Popen(
            [
                sys.executable, "-m", "bench.load", "--target",
                f"name=profiled,port={daemon.port},ca={daemon.ca_path},model={args.model},"
                f"pid={daemon.pid}", "--mode", args.mode, "--callers", str(args.callers),
                "--warmup", "2", "--duration", str(args.seconds + 2),
            ],
            cwd=REPO,
            env=clean_env(VIBECTLD_BENCH_SECRET=daemon.secret),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        time.sleep(2.5)
        spy = subprocess.run(
            [
                args.py_spy, "record", "--pid", str(_profiled(daemon, args.workers)), "--duration",
                str(args.seconds), "--rate", str(args.rate), "--format", "raw",
                "--output", str(raw), "--nonblocking",
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        stdout, _ = load.communicate(timeout=args.seconds + 60)
        print(f"load: {stdout.strip()}")
        if spy.returncode != 0 or not raw.exists():
            raise BenchError(f"py-spy failed: {spy.stderr.strip()[-1000:]}")
        print(summarise(raw, args.top))
    except BenchError as e:
        print(f"profile: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        procs.stop_all()
        shutil.rmtree(sockdir, ignore_errors=True)
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
