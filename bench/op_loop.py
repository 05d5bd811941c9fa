"""Back-to-back async operations in this process: the loop of the PostgreSQL studies.

bench/load.py drives a server from its own process over gRPC or HTTP; the studies
(bench/pg_drivers.py, bench/limiter_connections.py) time one database operation as the
daemon's event loop would run it, so their callers are tasks next to the operation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

CLIENTS = 1000  # the operations' client ids are c1 .. c1000


async def closed_loop(
    op: Callable[[str], Awaitable[float | None]], callers: int, warmup: float, duration: float
) -> tuple[list[float], float, float]:
    """Each caller runs op back to back for a random client: the latencies (s) in the
    measured window, the window's length and the CPU time this process spent in it. An op
    that returns a number has timed itself (part of what it does is not the measure)."""
    latencies: list[float] = []
    measuring = False
    stop = False

    async def caller(seed: int) -> None:
        rng = random.Random(seed)
        while not stop:
            client = f"c{rng.randint(1, CLIENTS)}"
            start = time.perf_counter()
            timed = await op(client)
            elapsed = time.perf_counter() - start if timed is None else timed
            if measuring:
                latencies.append(elapsed)

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    await asyncio.sleep(warmup)
    measuring = True
    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.sleep(duration)
    measuring = False
    window, cpu = time.perf_counter() - began, time.process_time() - cpu
    stop = True
    await asyncio.gather(*tasks)
    return latencies, window, cpu
