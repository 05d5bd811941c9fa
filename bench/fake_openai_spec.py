"""What the fake OpenAI-compatible endpoint does and records: behaviours, faults, requests."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, cast

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"


class Fault(enum.Enum):
    """How a request goes wrong; None in `Behaviour.fault` means it does not."""

    HTTP_500 = "500"
    HTTP_429 = "429"
    HTTP_401 = "401"
    # Accept the request and never answer (until the server closes or `hang_seconds` pass).
    HANG = "hang"
    # 200 with a body that is not valid JSON (an invalid SSE data line when streaming).
    MALFORMED = "malformed"
    # Stream `cut_after` content chunks, then drop the connection mid-body
    # (not streaming: send half of the declared body, then drop).
    CUT = "cut"


@dataclass(frozen=True)
class Behaviour:
    """What the fake does with the next requests; replace `FakeOpenAI.behaviour` to change it."""

    reply: str = "Hello from the fake endpoint."
    # Delay before the response starts, and between streamed content chunks.
    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    # How the reply is streamed; None splits it into words (keeping their spaces).
    stream_chunks: tuple[str, ...] | None = None
    fault: Fault | None = None
    # The fault hits only the first `fault_times` requests (None: all of them).
    fault_times: int | None = None
    # The `retry-after` header of a 429 (None: no header).
    retry_after: str | None = "1"
    hang_seconds: float = 60.0
    cut_after: int = 2
    # Error bodies quote the API key the request presented.
    echo_key: bool = True
    # Usage reported; None counts words (prompt: all message contents; completion: reply).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def chunks(self) -> list[str]:
        if self.stream_chunks is not None:
            return list(self.stream_chunks)
        words = self.reply.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    # Header names lower-cased; a repeated header keeps its last value.
    headers: dict[str, str]
    raw_body: bytes
    # The parsed JSON body, or None when it was absent or not JSON.
    body: Any
    # The client's source port: requests on one kept-alive connection share it.
    client_port: int = 0
    received_at: float = field(default_factory=time.monotonic)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def messages(self) -> list[dict[str, Any]]:
        if isinstance(self.body, dict) and isinstance(self.body.get("messages"), list):
            return cast(list[dict[str, Any]], self.body["messages"])
        return []

    @property
    def streamed(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


class End(enum.Enum):
    """How a streamed response (or a hang) ended at the fake."""

    # Every chunk and the end of the body were sent.
    COMPLETE = "complete"
    # The fake cut it on purpose (Fault.CUT).
    CUT = "cut"
    # The client closed the connection first (seen as EOF while waiting, or a failed write).
    CLIENT_CLOSED = "client_closed"
    # The fake itself was closing.
    SERVER_CLOSING = "server_closing"
    # A hang ran its whole `hang_seconds` without the client giving up.
    HANG_EXPIRED = "hang_expired"


@dataclass(frozen=True)
class ResponseEnd:
    """One streamed response, or one hang, and how it ended."""

    # "stream" or "hang".
    kind: str
    model: str
    client_port: int
    started_at: float
    ended_at: float
    # Content chunks written (a hang writes none).
    chunks_sent: int
    end: End
