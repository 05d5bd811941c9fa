"""``host:port`` as gRPC and URLs want it."""

from __future__ import annotations


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal bracketed (once: ``[::1]`` stays as it is)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
