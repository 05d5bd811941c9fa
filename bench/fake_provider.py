"""The fake OpenAI-compatible provider for the benchmark, as a process of its own.

It is tests/fake_openai.py run standalone (`--port 0 --latency-ms 20` prints the port,
then serves until SIGTERM). Like a real endpoint it sets TCP_NODELAY on every
connection: without it http.server's response head and body go out as two small
segments and Nagle's algorithm holds the second until the client's delayed ACK
(about 40 ms on Linux), whatever the client.

    python -m bench.fake_provider --port 0 --latency-ms 20
"""

from __future__ import annotations

import sys

from tests import fake_openai

if __name__ == "__main__":
    sys.exit(fake_openai.main())
