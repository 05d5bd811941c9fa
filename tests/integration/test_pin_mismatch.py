"""A server whose CA no longer matches the pin: vibectl says so, not "unreachable".

Real daemons with their own private CAs, the real `vibectl` as a process: once when
the operator rebuilds the CA behind a configured profile (same address, same
secret, new CA), once when a URL's pin names another daemon's CA.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.client.test_cli import User, issue_url
from tests.conftest import RunningDaemon, short_tmpdir
from vibectl.adapters import proxy_adapter
from vibectl.config import Profile
from vibectl.errors import AuthenticationError
from vibectl.proxy_url import parse as parse_url


@pytest.fixture
def user(tmp_path: Path) -> User:
    return User(tmp_path / "home")


def pin_of(url: str) -> str:
    pin = parse_url(url).ca_sha256
    assert pin is not None, "the test daemons serve a private CA: their URLs carry a pin"
    return pin


def test_a_rebuilt_ca_is_named_with_both_fingerprints_and_the_fix(
    start_daemon: Callable[..., RunningDaemon], user: User, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    before = start_daemon(state)
    port = before.port
    old_url = issue_url(before, "alice")
    assert user.run("setup-proxy", "configure", old_url).returncode == 0
    assert user.run("ask", "hi").returncode == 0

    # The operator rebuilds the CA: same address, same registry (the secret stays
    # valid), a new CA and server certificate.
    before.stop()
    shutil.rmtree(state / "tls")
    after = start_daemon(state, server={"listen": f"127.0.0.1:{port}"})
    new_url = issue_url(after, "alice-again")
    old_pin, new_pin = pin_of(old_url), pin_of(new_url)
    assert old_pin != new_pin

    for args in (("ask", "hi"), ("setup-proxy", "test"), ("setup-proxy", "status"), ("models",)):
        started = time.monotonic()
        out = user.run(*args)
        took = time.monotonic() - started
        assert out.returncode == 4, (args, out.stdout, out.stderr)
        error = out.stderr
        assert "does not match the CA pinned in profile '127.0.0.1'" in error, (args, error)
        assert f"expected sha256 {old_pin[:16]}" in error and f"got {new_pin[:16]}" in error
        assert "the secret was not sent" in error
        assert "vibectl setup-proxy configure - --name 127.0.0.1" in error
        assert "cannot reach" not in error and "reachable" not in out.stdout, args
        # One line that explains, not gRPC's own handshake log ahead of it.
        assert error.count("\n") == 1 and error.startswith("vibectl: "), error
        # Told at the first failed handshake, not after the 10 s connect timeout.
        assert took < 8, (args, took)

    # The advice works: the new URL replaces the profile, and asking works again.
    again = user.run("setup-proxy", "configure", new_url)
    assert again.returncode == 0, again.stderr
    asked = user.run("ask", "hi")
    assert asked.returncode == 0, asked.stderr


def test_a_url_pinned_to_another_daemons_ca_is_refused_before_anything_is_saved(
    start_daemon: Callable[..., RunningDaemon], user: User, tmp_path: Path
) -> None:
    ours = start_daemon(tmp_path / "ours")
    other_sockets = short_tmpdir()
    try:
        other = start_daemon(tmp_path / "other", admin={"socket": str(other_sockets / "a.sock")})
        url = issue_url(ours, "alice")
        # The URL names the other daemon's address: its CA is not the one pinned.
        parsed = parse_url(url)
        elsewhere = url.replace(f":{parsed.port}?", f":{other.port}?")
        out = user.run("setup-proxy", "configure", elsewhere)
        assert out.returncode == 4, (out.stdout, out.stderr)
        error = out.stderr
        assert f"127.0.0.1:{other.port} does not match the CA pinned in the URL" in error
        assert f"expected sha256 {pin_of(url)[:16]}" in error
        assert f"got {pin_of(issue_url(other, 'x'))[:16]}" in error
        assert "nothing was saved" in error and "ask your vibectld admin" in error
        assert parsed.secret is not None and parsed.secret not in out.stdout + error
        assert not (user.config_dir / "client").exists()
    finally:
        shutil.rmtree(other_sockets, ignore_errors=True)


def test_a_connected_client_is_told_when_the_server_comes_back_with_another_ca(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    # A long-lived process (not the CLI): its channel was up, then the daemon restarts
    # with a rebuilt CA. The calls fail UNAVAILABLE, retried; the last is explained.
    state = tmp_path / "state"
    before = start_daemon(state)
    port, url = before.port, parse_url(issue_url(before, "alice"))
    assert url.secret is not None and url.ca_sha256 is not None
    profile = Profile("corp", "127.0.0.1", port, ca_sha256=url.ca_sha256)
    adapter = proxy_adapter(profile, url.secret, before.ca_pem)

    async def ask() -> str:
        text, _ = await adapter.execute(None, [], ["hi"])
        return text

    async def scenario() -> AuthenticationError:
        assert "hi" in await ask()
        await asyncio.to_thread(before.stop)
        shutil.rmtree(state / "tls")
        await asyncio.to_thread(start_daemon, state, server={"listen": f"127.0.0.1:{port}"})
        try:
            with pytest.raises(AuthenticationError) as refused:
                await ask()
            return refused.value
        finally:
            await adapter.aclose()

    error = asyncio.run(scenario())
    assert "does not match the CA pinned in profile 'corp'" in error.message
    assert f"expected sha256 {url.ca_sha256[:16]}" in error.message
    assert error.exit_code == 4 and not error.recoverable


def test_a_ca_bundle_the_rebuilt_server_fails_is_named_not_unreachable(
    start_daemon: Callable[..., RunningDaemon], user: User, tmp_path: Path
) -> None:
    # A profile without a pin, trusting a --ca-bundle: the same rebuild, told the same way.
    state = tmp_path / "state"
    before = start_daemon(state)
    port = before.port
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(before.ca_pem)
    url = issue_url(before, "alice").split("?", 1)[0]
    configured = user.run("setup-proxy", "configure", url, "--ca-bundle", str(bundle))
    assert configured.returncode == 0, configured.stderr
    before.stop()
    shutil.rmtree(state / "tls")
    start_daemon(state, server={"listen": f"127.0.0.1:{port}"})

    started = time.monotonic()
    out = user.run("ask", "hi")
    assert out.returncode == 4, (out.stdout, out.stderr)
    saved = user.config_dir / "client" / "ca" / "127.0.0.1.pem"
    assert f"the certificate of 127.0.0.1:{port} fails the CA file {saved}" in out.stderr
    assert "the secret was not sent" in out.stderr
    assert "vibectl setup-proxy configure - --ca-bundle FILE --name 127.0.0.1" in out.stderr
    assert time.monotonic() - started < 8

    # The bundle given to configure is checked the same way, before anything is saved.
    again = user.run("setup-proxy", "configure", url, "--ca-bundle", str(bundle), "--name", "b")
    assert again.returncode == 4, (again.stdout, again.stderr)
    assert "fails the --ca-bundle" in again.stderr, again.stderr
    listed = user.run("setup-proxy", "list").stdout.splitlines()
    assert [line.split()[1] for line in listed] == ["127.0.0.1"], listed
