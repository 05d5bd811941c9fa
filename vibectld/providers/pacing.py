"""How often a busy serving process reads each provider stream.

A relayed message costs this process about the same whatever it carries (a gRPC
write: serialising, framing, TLS, a completion back through grpc's poller, about
60-100 us here), and a read of a provider's connection costs a wake-up and a parse.
While the process relays few streams, each provider event is read and sent on its own,
at the provider's pace. Past what one process can send as separate messages, that pace
is what saturates it: new calls then wait seconds for their first token (grpc accepts
them on the same, busy loop) while the open streams get every event on time.

So above `FREE_STREAMS` open streams a stream rests between reads, with its connection
not read, for (open streams / `MESSAGES_PER_SECOND`), at most `MAX_REST_S`: what the
provider sent meanwhile waits in the kernel and goes out as one message. The process's
messages per second stay near its budget however many streams are open; each stream
gets its text in fewer, larger pieces, later by at most the rest. The first text of a
stream is never held back (the rest only follows a message sent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

# One process's budget of relayed messages per second, with room left for new calls,
# their provider requests and the rest of the loop: measured on a 2-core machine,
# where one serving process saturates near 4,000 separate messages a second
# (bench/results, the streaming section).
MESSAGES_PER_SECOND = 2500
# Below this many open streams every event is read and sent as it comes: at a typical
# 50 events a second per stream, that is within the budget.
FREE_STREAMS = 50
MAX_REST_S = 0.25


class Pacing:
    """The open provider streams of this process, and the rest each takes between reads."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1

    def rest(self) -> float:
        """Seconds a stream waits, unread, after a message: 0 while the process is not busy."""
        if self.open <= FREE_STREAMS:
            return 0.0
        return min(self.open / MESSAGES_PER_SECOND, MAX_REST_S)


async def rest(transport: asyncio.BaseTransport | None, seconds: float) -> None:
    """Wait `seconds` without reading `transport`, so what arrives meanwhile is read at once.

    aiohttp pauses a connection itself when its buffer is full; a transport already
    paused is left as it is, and only a pause made here is undone.
    """
    paused = None
    if isinstance(transport, asyncio.ReadTransport) and transport.is_reading():
        paused = transport
        paused.pause_reading()
    try:
        await asyncio.sleep(seconds)
    finally:
        if paused is not None and not paused.is_closing():
            paused.resume_reading()


# One per process: what is shared is this process's event loop.
PACING = Pacing()
