"""The fake OpenAI-compatible provider for the benchmark, as a process of its own.

It is tests/fake_openai.py (same options: `--port 0 --latency-ms 20` prints the port,
then serves until SIGTERM), with one change a real endpoint has too: TCP_NODELAY on
every accepted connection. Without it http.server writes the response head and the
body as two small segments and Nagle's algorithm holds the second until the client's
delayed ACK (about 40 ms on Linux), so every call would take about 40 ms more than
the configured latency, whatever the client.

    python -m bench.fake_provider --port 0 --latency-ms 20
"""

from __future__ import annotations

import sys

from tests import fake_openai


def main() -> int:
    # socketserver.StreamRequestHandler sets TCP_NODELAY in setup() when this is true.
    fake_openai._Handler.disable_nagle_algorithm = True
    return fake_openai.main()


if __name__ == "__main__":
    sys.exit(main())
