"""`vibectl setup-proxy`: connect to a vibectld with one pasted URL, and manage profiles."""

from __future__ import annotations

import asyncio
import functools
import getpass
import re
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from vibectl.adapters import fetch_pinned_ca, profile_ca, proxy_adapter
from vibectl.cli_common import State, command
from vibectl.config import ClientConfigError, Profile, mask
from vibectl.errors import ConfigurationError, UsageError
from vibectl.proxy_url import ProxyURL, ProxyURLError, parse
from vibectl.util.limits import format_usd


def _profile_name(host: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", host).strip("-.") or "default"
    return name[:64]


def _read_bundle(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read --ca-bundle {path}: {e.strerror}") from None
    try:
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise UsageError(
            f"--ca-bundle {path} is not a PEM certificate bundle; pass the CA's .pem file"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise UsageError(f"--ca-bundle {path} holds no PEM certificate")
    return data


def _trust(url: ProxyURL, ca_bundle: str | None) -> bytes | None:
    """The CA to trust for this server, or None for the system's trust store."""
    if url.insecure:
        return None
    if ca_bundle:
        return _read_bundle(ca_bundle)
    if url.ca_sha256:
        return fetch_pinned_ca(url.host, url.port, url.ca_sha256)
    return None


async def _server_info(profile: Profile, secret: str, ca_pem: bytes | None) -> Any:
    # setup-proxy only asks the server who it is: a long model deadline is no use here.
    adapter = proxy_adapter(profile, secret, ca_pem, max_timeout=30.0)
    try:
        return await adapter.server_info()
    finally:
        await adapter.aclose()


def _show_info(info: Any) -> None:
    click.echo(f"server:        {info.server_name} (vibectld {info.server_version})")
    click.echo(f"default model: {info.default_model or '(none)'}")
    for m in info.available_models:
        aliases = f" (aliases: {', '.join(m.aliases)})" if m.aliases else ""
        click.echo(f"model:         {m.model_id} [{m.provider}]{aliases}")
    limits = info.limits
    shown = []
    if limits.HasField("max_requests_per_minute"):
        shown.append(f"{limits.max_requests_per_minute} requests/min")
    if limits.HasField("max_concurrent_requests"):
        shown.append(f"{limits.max_concurrent_requests} concurrent")
    if limits.HasField("max_input_length"):
        shown.append(f"{limits.max_input_length} input chars")
    if limits.HasField("request_timeout_seconds"):
        shown.append(f"{limits.request_timeout_seconds} s timeout")
    click.echo(f"limits:        {', '.join(shown) or 'none'}")
    budget = _budget(limits)
    if budget:
        click.echo(f"budget:        {budget}")


def _budget(limits: Any) -> str | None:
    """'$3.20 of $20.00 left this month', where the server gives this client a dollar budget."""
    if not limits.HasField("usd_per_month"):
        return None  # no budget, or a server older than dollar budgets
    left = format_usd(limits.usd_left_this_month)
    return f"{left} of {format_usd(limits.usd_per_month)} left this month"


@click.group("setup-proxy")
def setup_proxy() -> None:
    """Connect vibectl to a vibectld proxy and manage proxy profiles."""


# Enough for any URL vibectl-admin prints (a secret is well under 2 kB); more is not a URL.
_MAX_URL_CHARS = 16_384


def _url_from_stdin() -> str:
    """The URL read from standard input: typed without echo on a terminal, else piped."""
    if sys.stdin.isatty():
        try:
            # getpass turns echo off on the terminal, so the secret is not shown either.
            text = getpass.getpass("Paste the vibectl-server:// URL (input hidden): ")
        except EOFError:
            text = ""
    else:
        text = sys.stdin.read(_MAX_URL_CHARS + 1)
    lines = text.strip().splitlines()
    if not lines:
        raise UsageError("no URL given; paste the whole URL vibectl-admin printed")
    if len(lines) > 1 or len(text) > _MAX_URL_CHARS:
        raise UsageError("expected one URL on standard input, found more")
    return lines[0]


@command(setup_proxy, "configure")
@click.argument("url", required=False)
@click.option("--name", metavar="NAME", help="Profile name (default: from the host).")
@click.option("--ca-bundle", metavar="FILE", help="Trust this CA bundle instead of the URL's pin.")
@click.option("--no-test", is_flag=True, help="Save without contacting the server.")
@click.option("--insecure", is_flag=True, help="Allow vibectl-server-insecure:// (no TLS).")
def configure(
    state: State,
    url: str,
    name: str | None,
    ca_bundle: str | None,
    no_test: bool,
    insecure: bool,
) -> None:
    """Verify the server in URL, store its secret, and make it the active profile.

    With URL '-' the URL is read from standard input; on a terminal, with '-' or
    without URL, it is prompted for without echo. Either way the secret stays out
    of `ps` and of the shell's history.
    """
    if url is None and not sys.stdin.isatty():
        raise UsageError(
            "give the URL, or - to read it from standard input: "
            "vibectl setup-proxy configure - < url.txt"
        )
    if url is None or url == "-":
        url = _url_from_stdin()
    try:
        parsed = parse(url)
    except ProxyURLError as e:
        raise UsageError(str(e)) from None
    if not parsed.secret:
        raise UsageError("the URL has no secret; paste the whole URL vibectl-admin printed")
    if parsed.insecure and not insecure:
        raise UsageError(
            "vibectl-server-insecure:// sends the secret and prompts unencrypted; "
            "pass --insecure if this is local testing"
        )
    if ca_bundle and parsed.ca_sha256:
        raise UsageError("the URL carries a ca-sha256 pin; drop --ca-bundle or the pin")
    profile_name = name or _profile_name(parsed.host)
    config = state.config()
    if no_test and parsed.ca_sha256:
        raise UsageError("a pinned URL must contact the server to fetch its CA; drop --no-test")
    ca_pem = _trust(parsed, ca_bundle)
    profile = Profile(
        name=profile_name,
        host=parsed.host,
        port=parsed.port,
        ca_sha256=parsed.ca_sha256,
        insecure=parsed.insecure,
    )
    if not no_test:
        info = asyncio.run(_server_info(profile, parsed.secret, ca_pem))
    try:
        if ca_pem is not None:
            profile.ca_file = str(state.store.save_ca(profile_name, ca_pem))
        state.store.save_secret(profile_name, parsed.secret)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config.profiles[profile_name] = profile
    config.active_profile = profile_name
    state.store.save(config)
    click.echo(f"profile '{profile_name}' saved and active ({parsed.masked()})")
    if not no_test:
        _show_info(info)
    click.echo('next: vibectl ask "hello"')


def _profile(state: State, name: str | None) -> Profile:
    config = state.config()
    chosen = name or config.active_profile
    if chosen is None:
        raise ConfigurationError(
            "no active proxy profile; run: vibectl setup-proxy configure - (and paste the URL)"
        )
    if chosen not in config.profiles:
        known = ", ".join(sorted(config.profiles)) or "none"
        raise ConfigurationError(f"no proxy profile named '{chosen}' (profiles: {known})")
    return config.profiles[chosen]


def _profile_command(
    command_name: str, *, required: bool = True
) -> Callable[[Callable[[State, Profile], None]], click.Command]:
    """Declare a command that acts on the profile NAME (when optional, the active one)."""

    def declare(fn: Callable[[State, Profile], None]) -> click.Command:
        @functools.wraps(fn)
        def on_profile(state: State, name: str | None) -> None:
            fn(state, _profile(state, name))

        declared = click.argument("name", required=required)(on_profile)
        return command(setup_proxy, command_name)(declared)

    return declare


@_profile_command("test", required=False)
def test(state: State, profile: Profile) -> None:
    """Check that a profile (default: the active one) reaches its server."""
    secret = state.store.load_secret(profile.name)
    info = asyncio.run(_server_info(profile, secret, profile_ca(state.store, profile)))
    click.echo(f"ok: {profile.name} reaches {profile.host}:{profile.port}")
    _show_info(info)


@command(setup_proxy, "status")
def status(state: State) -> None:
    """Show the active profile and whether its server answers."""
    config = state.config()
    if config.active_profile is None:
        click.echo("mode: direct (no proxy profile active)")
        return
    profile = _profile(state, None)
    secret = state.store.load_secret(profile.name)
    trust = (
        "none (insecure)"
        if profile.insecure
        else f"pinned CA {profile.ca_sha256[:16]}…"
        if profile.ca_sha256
        else profile.ca_file or "system trust store"
    )
    click.echo(f"mode:    proxy, profile '{profile.name}'")
    click.echo(f"server:  {profile.host}:{profile.port}")
    click.echo(f"secret:  {mask(secret)}")
    click.echo(f"trust:   {trust}")
    info = asyncio.run(_server_info(profile, secret, profile_ca(state.store, profile)))
    click.echo(f"status:  reachable, {info.server_name} (vibectld {info.server_version})")
    budget = _budget(info.limits)
    if budget:
        click.echo(f"budget: {budget}")


@command(setup_proxy, "list")
def list_profiles(state: State) -> None:
    """List proxy profiles; the active one is marked with *."""
    config = state.config()
    if not config.profiles:
        click.echo(
            "no proxy profiles; add one with: vibectl setup-proxy configure - (and paste the URL)"
        )
        return
    for name in sorted(config.profiles):
        p = config.profiles[name]
        marker = "*" if name == config.active_profile else " "
        try:
            shown = mask(state.store.load_secret(name))
        except ClientConfigError as e:
            shown = f"(unusable secret: {e})"
        click.echo(f"{marker} {name}  {p.host}:{p.port}  {shown}")


@_profile_command("use")
def use(state: State, profile: Profile) -> None:
    """Make NAME the active profile."""
    config = state.config()
    config.active_profile = profile.name
    state.store.save(config)
    click.echo(f"active profile: {profile.name}")


@_profile_command("remove")
def remove(state: State, profile: Profile) -> None:
    """Delete profile NAME and its stored secret."""
    config = state.config()
    del config.profiles[profile.name]
    if config.active_profile == profile.name:
        config.active_profile = None
    state.store.save(config)
    state.store.remove_profile_files(profile.name)
    click.echo(f"removed profile {profile.name}")


@command(setup_proxy, "disable")
def disable(state: State) -> None:
    """Stop using a proxy: calls go directly through the llm library."""
    config = state.config()
    config.active_profile = None
    state.store.save(config)
    click.echo("proxy disabled: vibectl now calls models directly")
