"""`vibectl`: ask a model, list models, and connect to a vibectld proxy.

Commands are thin: they read config, get an adapter from the one factory, and
turn the client's typed errors into a one-line message and an exit code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import click

from vibectl.cli_common import State, command
from vibectl.errors import UsageError
from vibectl.redaction import summary
from vibectl.setup_proxy import setup_proxy


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--proxy", "proxy", metavar="NAME", help="Use this proxy profile for this call.")
@click.option("--no-proxy", is_flag=True, help="Call models directly for this call.")
@click.version_option(package_name="vibectld", prog_name="vibectl")
@click.pass_context
def main(ctx: click.Context, proxy: str | None, no_proxy: bool) -> None:
    """A command-line assistant whose LLM calls run directly or through vibectld."""
    # gRPC's core logs a refused handshake as an INFO line on stderr, ahead of the
    # message that explains it; our errors say what happened. Set before grpc is
    # imported (adapters import it lazily); a user's own GRPC_VERBOSITY wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    ctx.obj = State(proxy, no_proxy)


def _adapter(state: State) -> Any:
    from vibectl.adapters import get_model_adapter

    return get_model_adapter(
        state.store, state.config(), proxy=state.proxy, no_proxy=state.no_proxy
    )


@command(main, "ask")
@click.argument("prompt", required=False)
@click.option("--model", "-m", metavar="M", help="Model id or alias (default: the server's).")
@click.option("--system", "-s", metavar="S", help="A system prompt.")
@click.option("--schema", metavar="JSON", help="A JSON schema the reply must follow.")
@click.option("--no-stream", is_flag=True, help="Print the reply only when it is complete.")
@click.option(
    "--no-redact",
    is_flag=True,
    help="Send the prompt without replacing secrets in it (the server's policy still applies).",
)
def ask(
    state: State,
    prompt: str | None,
    model: str | None,
    system: str | None,
    schema: str | None,
    no_stream: bool,
    no_redact: bool,
) -> None:
    """Ask a model; reads the prompt from stdin when PROMPT is absent."""
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("give a PROMPT or pipe one on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    parsed_schema: dict[str, Any] | None = None
    if schema is not None:
        try:
            parsed_schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise UsageError(f"--schema is not valid JSON: {e}") from None
        if not isinstance(parsed_schema, dict):
            raise UsageError("--schema must be a JSON object (a JSON schema)")
    run(_ask(state, prompt, model, system, parsed_schema, no_stream, no_redact))


def _tell_redacted(counts: Counter[str]) -> None:
    click.echo(
        f"vibectl: redacted {summary(counts)} before sending; --no-redact to send as is",
        err=True,
    )


async def _ask(
    state: State,
    prompt: str,
    model_name: str | None,
    system: str | None,
    schema: dict[str, Any] | None,
    no_stream: bool,
    no_redact: bool = False,
) -> None:
    adapter = _adapter(state)
    adapter.redact = not no_redact and state.config().redaction_enabled
    adapter.on_redacted = _tell_redacted
    try:
        model = adapter.get_model(model_name)
        system_fragments = [system] if system else []
        if no_stream or schema is not None:
            text, _ = await adapter.execute(model, system_fragments, [prompt], schema)
            click.echo(text)
            return
        ended_with_newline = True
        async for chunk in adapter.stream_execute(model, system_fragments, [prompt]):
            click.echo(chunk, nl=False)
            ended_with_newline = chunk.endswith("\n")
        if not ended_with_newline:
            click.echo()
    finally:
        await adapter.aclose()


@command(main, "models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(state: State, as_json: bool) -> None:
    """List the models you can use (the server's in proxy mode)."""

    async def fetch() -> tuple[str, list[dict[str, Any]]]:
        adapter = _adapter(state)
        try:
            return adapter.mode, await adapter.list_models()
        finally:
            await adapter.aclose()

    mode, listed = run(fetch())
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    click.echo(f"# {mode} mode", err=True)
    width = max((len(m["model_id"]) for m in listed), default=5)
    for m in listed:
        marker = "*" if m["default"] else " "
        aliases = f"  (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
        click.echo(f"{marker} {m['model_id']:<{width}}  {m['provider']}{aliases}")


main.add_command(setup_proxy)

if __name__ == "__main__":
    main()
