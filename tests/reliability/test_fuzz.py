"""Bad input: property-based tests of the parsers, and garbage on the daemon's sockets.

Parsers (hypothesis): the admin protocol (`decode_request`, `decode_response`),
the connection URL (`vibectl.proxy_url.parse`), the `--expires` durations
(`parse_duration`) and the config loader (`parse_config`, `load_config`) raise
nothing but their own documented error, and what is formatted parses back.

Sockets (a live daemon): random bytes, invalid UTF-8, JSON of the wrong shape and
oversized lines on the admin socket; random bytes, a TLS ClientHello followed by
garbage, malformed and oversized HTTP/2 frames, a CONTINUATION flood, a rapid
reset of 1,000 streams and oversized gRPC messages on the gRPC port. After every
batch the daemon still serves: `status` on the admin socket, gRPC health and an
Execute. Every socket operation has a timeout.

The bugs these fuzzers found (pathological JSON on the admin socket, non-ASCII
digits, broken IPv6 hosts, huge numbers and non-UTF-8 files in the config, an
absurd --since) have regression tests here. Each test counts the cases it ran;
the module prints the counts at the end.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import ipaddress
import json
import os
import random
import shutil
import socket
import ssl
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningDaemon, _register_fake_models, short_tmpdir
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectl.proxy_url import ProxyURL, ProxyURLError
from vibectl.proxy_url import parse as parse_url
from vibectld.admin.protocol import (
    MAX_LINE_BYTES,
    ProtocolError,
    Request,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
    parse_duration,
)
from vibectld.config import ConfigError
from vibectld.config_file import load_config, parse_config

# How many cases each test ran: printed at the end of the module.
RAN: Counter[str] = Counter()

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis/ left in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIVE = settings(FUZZ, max_examples=150)
SOCKET_TIMEOUT = 5.0


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\n\nfuzz cases run:")
    for name, count in sorted(RAN.items()):
        print(f"  {count:6}  {name}")
    print(f"  {sum(RAN.values()):6}  in total")


# -- strategies ------------------------------------------------------------------------

ints = st.integers(min_value=-(2**64), max_value=2**64)
# Now and then a number beyond a float. (Over 4300 digits json.dumps itself refuses;
# the explicit examples cover those.)
any_ints = ints | st.sampled_from([10**400, -(10**400)])
json_scalars = (
    st.none() | st.booleans() | any_ints | st.floats(allow_nan=False) | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
yaml_keys = st.none() | st.booleans() | ints | st.text(max_size=12)
yaml_like = st.recursive(
    json_scalars | st.floats(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(yaml_keys, children, max_size=4)
    ),
    max_leaves=12,
)
# The real ops of the admin protocol (but `reload`, which would reload the test daemon,
# and `rotate_signing_key`, which would write a key file per example).
ADMIN_OPS = [
    "audit",
    "issue_client",
    "list_clients",
    "list_signing_keys",
    "retire_signing_key",
    "revoke_client",
    "show_ca",
    "status",
    "update_client",
    "usage",
]
ADMIN_ARG_NAMES = [
    "name",
    "target",
    "expires",
    "models",
    "rpm",
    "concurrency",
    "tokens_per_day",
    "usd_per_month",
    "note",
    "reason",
    "since",
    "all",
    "wait",
]
admin_args = st.dictionaries(st.sampled_from(ADMIN_ARG_NAMES) | st.text(max_size=8), json_values)
request_shaped = st.fixed_dictionaries(
    {},
    optional={
        "v": st.just(1) | json_values,
        "id": ints | json_values,
        "op": st.sampled_from(ADMIN_OPS) | json_values,
        "args": admin_args | json_values,
    },
)
invalid_utf8 = st.tuples(
    st.binary(max_size=40),
    st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]),
    st.binary(max_size=40),
).map(b"".join)
admin_lines = (
    st.binary(max_size=300)
    | invalid_utf8
    | json_values.map(lambda v: json.dumps(v).encode())
    | request_shaped.map(lambda v: json.dumps(v).encode())
)

# Config: the real sections and keys, with plausible or arbitrary values.
CONFIG_KEYS: dict[str, list[str]] = {
    "server": [
        "listen",
        "public_url",
        "name",
        "tls",
        "max_request_bytes",
        "shutdown_grace_seconds",
    ],
    "admin": ["socket", "group"],
    "models": ["default", "allowed", "aliases", "openai_compatible", "sync_workers", "prices"],
    "limits": [
        "requests_per_minute",
        "concurrent_requests",
        "tokens_per_day",
        "max_input_chars",
        "request_timeout_seconds",
        "usd_per_month",
        "server_usd_per_day",
    ],
    "redaction": ["mode", "detectors", "custom"],
    "clients": ["default_expiry", "max_expiry", "issuer", "audience"],
    "logging": ["level", "format"],
    "metrics": ["listen"],
}
plausible = st.one_of(
    st.sampled_from(["127.0.0.1:50051", "[::1]:0", ":80", "host:", "h:99999", "0.0.0.0:1"]),
    st.sampled_from(["vibectl-server://h:1", "vibectl-server-insecure://h", "http://h", "x"]),
    st.sampled_from(["/abs/path", "rel/path", "", " ", "30m", "2y", "0d", "90d", "1x"]),
    st.sampled_from(["info", "debug", "json", "journal", "auto", "console"]),
    st.integers(min_value=-2, max_value=10**6),
    st.floats(allow_nan=True),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8) | ints, max_size=3),
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                k: st.text(max_size=20) | json_scalars
                for k in ("model_id", "model_name", "api_base", "api_key_name", "extra")
            },
        ),
        max_size=2,
    ),
    st.dictionaries(
        st.text(max_size=6),
        st.fixed_dictionaries({}, optional={"input": yaml_like, "output": yaml_like}) | yaml_like,
        max_size=2,
    ),
    # redaction.custom: rules with random names and regexes (compiled and timed at load).
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["ticket-id", "jwt", "X", ""]) | st.text(max_size=6),
                "regex": st.sampled_from(["TKT-[0-9]{6}", ".*", "(a+)+$", "a{1,4294967295}"])
                | st.text(max_size=12)
                | json_scalars,
            },
        ),
        max_size=2,
    ),
    yaml_like,
)
config_like = st.fixed_dictionaries(
    {},
    optional={
        **{
            section: st.fixed_dictionaries(
                {}, optional={k: plausible for k in [*keys, "unknown_key"]}
            )
            | yaml_like
            for section, keys in CONFIG_KEYS.items()
        },
        "state_dir": plausible,
        "bogus": yaml_like,
    },
)

# -- the admin protocol --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_decode_request_raises_only_protocol_errors() -> None:
    @FUZZ
    @given(st.one_of(admin_lines, st.binary(max_size=2000)))
    @example(b"")
    @example(b"\n")
    @example(b"\xef\xbb\xbf{}")  # a UTF-8 byte order mark
    @example(b'\xff\xfe{\x00"\x00')  # UTF-16 detected by json.loads
    @example(b'{"v": 1, "id": true, "op": "status"}')
    @example(b'{"v": 1.0, "id": 1, "op": "status"}')
    @example(b'{"v": 1, "id": 1, "op": "status", "args": []}')
    @example(b'{"v": 1, "id": 1, "op": "status", "v": 2}')
    @example(b"NaN")
    @example(b"[" * 50_000)  # found: RecursionError escaped
    @example(b'{"v": 1, "id": ' + b"7" * 5000 + b', "op": "status"}')  # found: ValueError
    def check(line: bytes) -> None:
        RAN["decode_request: arbitrary bytes and JSON"] += 1
        try:
            req = decode_request(line)
        except ProtocolError as e:
            assert e.code in ("bad_request", "unsupported_version")
            assert e.message
            return
        assert isinstance(req.id, int) and not isinstance(req.id, bool)
        assert isinstance(req.op, str) and req.op
        assert isinstance(req.args, dict)

    check()


@pytest.mark.timeout(120)
def test_decode_response_raises_only_protocol_errors() -> None:
    @FUZZ
    @given(admin_lines | json_values.map(lambda v: json.dumps({"ok": True, "x": v}).encode()))
    def check(line: bytes) -> None:
        RAN["decode_response: arbitrary bytes and JSON"] += 1
        try:
            obj = decode_response(line)
        except ProtocolError as e:
            assert e.code == "internal"
            return
        assert isinstance(obj["ok"], bool)

    check()


finite_json = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)


@pytest.mark.timeout(120)
def test_admin_messages_round_trip() -> None:
    @FUZZ
    @given(
        req_id=st.integers(min_value=-(2**63), max_value=2**63),
        op=st.text(min_size=1, max_size=40),
        args=st.dictionaries(st.text(max_size=10), finite_json, max_size=5),
        result=st.dictionaries(st.text(max_size=10), finite_json, max_size=5),
        message=st.text(max_size=100),
    )
    def check(
        req_id: int, op: str, args: dict[str, Any], result: dict[str, Any], message: str
    ) -> None:
        RAN["admin protocol encode -> decode round trips"] += 1
        line = encode_request(Request(req_id, op, args))
        assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, always
        assert decode_request(line) == Request(req_id, op, args)
        ok = decode_response(encode_result(req_id, result))
        assert ok == {"v": 1, "id": req_id, "ok": True, "result": result}
        failed = decode_response(encode_error(None, "failed", message))
        assert failed["ok"] is False
        assert failed["error"] == {"code": "failed", "message": message}

    check()


# Found by fuzzing: json.loads raised RecursionError, or ValueError for an integer of
# over 4300 digits, and either escaped decode_request/decode_response.


@pytest.mark.parametrize("decode", [decode_request, decode_response])
def test_deeply_nested_json_is_a_protocol_error(decode: Callable[[bytes], Any]) -> None:
    with pytest.raises(ProtocolError):
        decode(b"[" * 50_000)


@pytest.mark.parametrize("decode", [decode_request, decode_response])
def test_a_huge_integer_is_a_protocol_error(decode: Callable[[bytes], Any]) -> None:
    with pytest.raises(ProtocolError):
        decode(b'{"v": 1, "ok": true, "id": ' + b"7" * 5000 + b', "op": "status"}')


# -- the connection URL ----------------------------------------------------------------

url_like = st.one_of(
    st.text(max_size=120),
    st.tuples(
        st.sampled_from(["vibectl-server://", "vibectl-server-insecure://", "VIBECTL-SERVER://"]),
        st.text(max_size=100),
    ).map("".join),
    st.tuples(
        st.sampled_from(["vibectl-server://", "vibectl-server-insecure://"]),
        st.text(alphabet="abc%@:[]/?#=&.-0123456789", max_size=60),
        st.sampled_from(["", "?ca-sha256=", "?ca-sha256=ab", "?x=1&ca-sha256=" + "a" * 64]),
    ).map("".join),
)


@pytest.mark.timeout(120)
def test_url_parse_raises_only_proxy_url_errors() -> None:
    @FUZZ
    @given(url_like)
    @example("vibectl-server://[::1")
    @example("vibectl-server://s@h:99999")
    @example("vibectl-server://s@h:0")
    @example("vibectl-server://s@h:-1")
    @example("vibectl-server://a:b@h:1")
    @example("vibectl-server://s@h:1?ca-sha256=" + "A" * 64)
    @example("vibectl-server://s@[v1.x]:1")
    @example("vibectl-server://%zz@h:1")
    @example("vibectl-server://s@h\u2100:1")
    @example("vibectl-server://s@h:\u0661")
    def check(text: str) -> None:
        RAN["proxy_url.parse: arbitrary text"] += 1
        try:
            url = parse_url(text)
        except ProxyURLError as e:
            assert str(e)
            return
        assert url.host
        assert 1 <= url.port <= 65535
        assert url.ca_sha256 is None or len(url.ca_sha256) == 64

    check()


hostnames = st.one_of(
    st.from_regex(
        r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}\Z"
    ),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: ipaddress.IPv6Address(a).compressed),
)


@pytest.mark.timeout(120)
def test_formatted_urls_parse_back() -> None:
    @FUZZ
    @given(
        host=hostnames,
        port=st.integers(min_value=1, max_value=65535),
        secret=st.none() | st.text(min_size=1, max_size=80),
        insecure=st.booleans(),
        pin=st.none() | st.from_regex(r"\A[0-9a-f]{64}\Z"),
    )
    def check(host: str, port: int, secret: str | None, insecure: bool, pin: str | None) -> None:
        RAN["proxy_url format -> parse round trips"] += 1
        url = ProxyURL(host, port, secret=secret, insecure=insecure, ca_sha256=pin)
        text = url.format()
        assert parse_url(text) == url
        # What a user pastes often has whitespace around it.
        assert parse_url(f"  {text}\n") == url

    check()


# -- --expires durations -----------------------------------------------------------------

UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


@pytest.mark.timeout(120)
def test_parse_duration_raises_only_value_errors() -> None:
    @FUZZ
    @given(
        st.text(max_size=30)
        | st.from_regex(r"\A\s*-?\d{0,25}\s*[mhdwyMs]?\s*\Z")
        | st.tuples(st.text(max_size=5), st.sampled_from("mhdwy")).map("".join)
    )
    @example("0m")
    @example("٣d")  # an Arabic-Indic digit: \d matches it, int() reads it
    @example("²d")  # a superscript: not a decimal digit
    @example("9" * 5000 + "d")
    @example("1y\n")
    @example("")
    def check(text: str) -> None:
        RAN["parse_duration: arbitrary text"] += 1
        try:
            seconds = parse_duration(text)
        except ValueError:
            return
        assert isinstance(seconds, int) and seconds > 0

    check()


@pytest.mark.timeout(120)
def test_valid_durations_give_the_right_seconds() -> None:
    @FUZZ
    @given(
        n=st.integers(min_value=1, max_value=10**9),
        unit=st.sampled_from(sorted(UNITS)),
        before=st.sampled_from(["", " ", "\t"]),
        between=st.sampled_from(["", " "]),
        after=st.sampled_from(["", " ", "\n"]),
    )
    def check(n: int, unit: str, before: str, between: str, after: str) -> None:
        RAN["parse_duration: valid durations"] += 1
        assert parse_duration(f"{before}{n}{between}{unit}{after}") == n * UNITS[unit]
        assert parse_duration(f"{n:0>5}{unit}") == n * UNITS[unit]  # leading zeros

    check()


# -- the config loader -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_parse_config_raises_only_config_errors() -> None:
    @FUZZ
    @given(config_like | yaml_like)
    @example(None)
    @example({})
    @example({"server": {"listen": ":"}})
    @example({"server": {"tls": {"cert_file": "/c"}}})
    @example({"clients": {"default_expiry": "3y", "max_expiry": "1y"}})
    @example({"models": {"aliases": {1: "x"}}})
    @example({"models": {"prices": {"m": {"input": float("nan")}}}})
    @example({1: 2})
    @example({"server": {"listen": "127.0.0.1:\u00b2"}})  # found: ValueError escaped
    @example({"metrics": {"listen": "h:\u0663"}})
    @example({"server": {"public_url": "vibectl-server://[::1:50051"}})  # found: ValueError
    @example({"server": {"shutdown_grace_seconds": 10**400}})  # found: OverflowError
    @example({"models": {"prices": {"m": {"input": 10**400}}}})
    @example({"redaction": {"custom": [{"name": "n", "regex": "a{1,4294967295}"}]}})  # found
    @example({"redaction": {"custom": [{"name": "n", "regex": "(" * 1000 + ")" * 1000}]}})
    @example({"redaction": {"detectors": [{}]}})
    def check(raw: Any) -> None:
        RAN["parse_config: arbitrary YAML-like structures"] += 1
        try:
            parse_config(raw)
        except ConfigError as e:
            assert str(e)

    check()


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vd-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(120)
def test_load_config_raises_only_config_errors(scratch: Path) -> None:
    path = scratch / "config.yaml"

    @settings(FUZZ, max_examples=200)
    @given(
        st.binary(max_size=300)
        | st.text(max_size=300).map(str.encode)
        | config_like.map(lambda c: yaml.safe_dump(c, allow_unicode=True).encode())
        | st.sampled_from(
            [
                b"a: &a [*a]",
                b"!!python/object:os.system {}",
                b"server: {listen: !!binary aGk=}",
                b"%YAML 9.9\n---\n",
                b"\x00",
                b"? [a]\n: 1",
                b"server:\n  listen: 127.0.0.1:1\nserver: {}",
            ]
        )
    )
    def check(content: bytes) -> None:
        RAN["load_config: arbitrary files"] += 1
        path.write_bytes(content)
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e)

    check()


# Found by fuzzing: ValueError ('²'.isdigit() but int('²') fails; urlsplit on a broken
# IPv6 host), OverflowError (float() of a huge int), UnicodeDecodeError and
# RecursionError (a file not in UTF-8, deep YAML) escaped instead of ConfigError.


@pytest.mark.parametrize("key", ["server", "metrics"])
def test_a_listen_port_of_superscript_digits_is_a_config_error(key: str) -> None:
    with pytest.raises(ConfigError):
        parse_config({key: {"listen": "127.0.0.1:\u00b2"}})


def test_a_public_url_with_a_broken_ipv6_host_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_config({"server": {"public_url": "vibectl-server://[::1:50051"}})


@pytest.mark.parametrize(
    "raw",
    [
        {"server": {"shutdown_grace_seconds": 10**400}},
        {"models": {"prices": {"m": {"input": 10**400}}}},
        {"limits": {"usd_per_month": 10**400}},
    ],
    ids=["shutdown_grace_seconds", "price", "usd_per_month"],
)
def test_huge_numbers_are_config_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_config(raw)


@pytest.mark.parametrize(
    "content", [b"server: {name: caf\xe9}\n", b"[" * 1000], ids=["latin-1", "deep"]
)
def test_an_unreadable_config_file_is_a_config_error(scratch: Path, content: bytes) -> None:
    path = scratch / "broken.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        load_config(path)


# -- a live daemon ---------------------------------------------------------------------


class Live:
    def __init__(self, daemon: RunningDaemon) -> None:
        self.daemon = daemon
        self.secret = daemon.issue("fuzz-canary")
        self.channel = daemon.channel()
        self.stub = pb_grpc.VibectlLLMProxyStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.sock_path = str(daemon.config.admin.socket)
        self.port = daemon.port

    def assert_serving(self) -> None:
        status = self.daemon.admin("status")
        assert status["in_flight"] == 0
        reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        req = pb.ExecuteRequest(user_fragments=["still there?"], model_name="faults")
        answer = self.stub.Execute(req, metadata=auth(self.secret), timeout=10)
        assert answer.success.response_text == "faults says: still there?", answer


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    _register_fake_models()
    sock_dir = short_tmpdir()
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "name": "fuzz"},
            "admin": {
                "socket": str(sock_dir / "admin.sock"),
                "group": grp.getgrgid(os.getgid()).gr_name,
            },
            "state_dir": str(tmp_path_factory.mktemp("fuzz") / "state"),
            "models": {"default": "echo"},
            "limits": {"requests_per_minute": None, "concurrent_requests": None},
            "logging": {"level": "error", "format": "console"},
        }
    )
    daemon = RunningDaemon(config).start()
    try:
        running = Live(daemon)
        running.assert_serving()
        yield running
    finally:
        daemon.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def admin_exchange(path: str, payload: bytes, answers: int) -> tuple[list[bytes], bool]:
    """Send `payload`, read up to `answers` lines; return them and whether the daemon closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        buf = b""
        closed = False
        while buf.count(b"\n") < answers:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            buf += data
        return buf.splitlines(), closed


@pytest.mark.timeout(120)
def test_garbage_lines_on_the_admin_socket_get_error_answers(live: Live) -> None:
    @LIVE
    @given(st.lists(admin_lines, min_size=1, max_size=4))
    def check(lines: list[bytes]) -> None:
        RAN["admin socket: connections of random lines"] += 1
        payload = b"\n".join(lines) + b"\n"
        expected = payload.count(b"\n")
        answers, closed = admin_exchange(live.sock_path, payload, expected)
        assert not closed, f"the daemon hung up after {len(answers)} of {expected} answers"
        assert len(answers) == expected
        for answer in answers:
            response = decode_response(answer)
            if response["ok"]:
                continue
            code = response["error"]["code"]
            assert code in {"bad_request", "unknown_op", "unsupported_version", "not_found"}, answer

    check()
    live.assert_serving()


@pytest.mark.parametrize(
    ("payload", "answered"),
    [
        pytest.param(b"x" * (MAX_LINE_BYTES + 1), True, id="over-limit-no-newline"),
        pytest.param(b"y" * (MAX_LINE_BYTES + 1) + b"\n", True, id="over-limit-line"),
        pytest.param(b"z" * (4 * 1024 * 1024), False, id="4-MiB"),
        pytest.param(
            b'{"v":1,"id":1,"op":"status","args":{"pad":"'
            + b"p" * (MAX_LINE_BYTES - 64)
            + b'"}}\n',
            True,
            id="just-under-limit",
        ),
        pytest.param(b'{"v":1,"id":1,"op":"sta', False, id="half-a-line-then-eof"),
        pytest.param(b"\n" * 5000, True, id="5000-empty-lines"),
    ],
)
def test_oversized_and_truncated_frames_on_the_admin_socket(
    live: Live, payload: bytes, answered: bool
) -> None:
    RAN["admin socket: oversized and truncated frames"] += 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(live.sock_path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        buf = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                buf += data
    # The daemon closed the connection (recv returned b"" or a reset): it did not hang.
    lines = buf.splitlines()
    if payload.startswith(b'{"v":1,"id":1,"op":"status"'):
        assert decode_response(lines[0])["ok"] is True
    elif payload.startswith(b"\n"):
        assert len(lines) == payload.count(b"\n")
    elif answered:
        [line] = lines
        error = decode_response(line)["error"]
        assert error["code"] == "bad_request"
        assert str(MAX_LINE_BYTES) in error["message"]
    print(f"\n{len(payload)} bytes -> {len(lines)} answer(s): {lines[0][:80] if lines else b''!r}")
    live.assert_serving()


def test_too_many_idle_admin_connections_are_refused_politely(live: Live) -> None:
    """64 connections that say nothing: the 65th is told to try again, then all is well."""
    socks: list[socket.socket] = []
    try:
        for _ in range(64):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(SOCKET_TIMEOUT)
            sock.connect(live.sock_path)
        time.sleep(0.2)  # let the daemon accept them all
        # Read to the end: one answer, then the daemon hangs up.
        answers, closed = admin_exchange(
            live.sock_path, encode_request(Request(1, "status", {})), 2
        )
        RAN["admin socket: idle connections"] += 65
        assert closed
        [line] = answers
        assert "too many admin connections" in decode_response(line)["error"]["message"]
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            live.assert_serving()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize(
    "line",
    [b"[" * 50_000 + b"\n", b'{"v":1,"id":' + b"9" * 5000 + b',"op":"status"}\n'],
    ids=["deep-nesting", "huge-integer"],
)
def test_pathological_json_on_the_admin_socket_gets_an_answer(live: Live, line: bytes) -> None:
    RAN["admin socket: pathological JSON"] += 1
    try:
        answers, _ = admin_exchange(live.sock_path, line, 1)
    finally:
        live.assert_serving()
    assert answers, "the daemon closed the connection without answering"
    assert decode_response(answers[0])["error"]["code"] == "bad_request"


@pytest.mark.parametrize("since", ["99999999999y", "9" * 30 + "d"])
def test_usage_with_an_absurd_since_is_not_an_internal_error(live: Live, since: str) -> None:
    """Found by fuzzing: it was an internal error (datetime overflow) with a traceback."""
    RAN["admin socket: absurd --since"] += 1
    for op in ("usage", "audit"):
        request = encode_request(Request(1, op, {"since": since}))
        answers, _ = admin_exchange(live.sock_path, request, 1)
        response = decode_response(answers[0])
        # Longer ago than the epoch reads as "everything"; a refusal would do too.
        assert response["ok"] or response["error"]["code"] == "bad_request", response
    live.assert_serving()


# -- the gRPC port ---------------------------------------------------------------------


def raw_exchange(port: int, payload: bytes, *, half_close: bool = True) -> tuple[bytes, str]:
    """Send `payload` over plain TCP; read until the daemon closes. Returns (data, how)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b"", "reset"
        except OSError as exc:
            # The daemon may refuse the bytes and reset before our half-close: with the
            # connection already gone, shutdown() reports ENOTCONN. That is a reset too.
            if exc.errno != errno.ENOTCONN:
                raise
            return b"", "reset"
        return _read_to_close(sock)


def _read_to_close(
    sock: socket.socket | ssl.SSLSocket, quiet: float = SOCKET_TIMEOUT
) -> tuple[bytes, str]:
    """Read until the peer closes ("closed"/"reset") or is silent for `quiet` s ("open")."""
    buf = b""
    sock.settimeout(quiet)
    deadline = time.monotonic() + SOCKET_TIMEOUT
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return buf, "reset"
        except TimeoutError:
            break
        if not data:
            return buf, "closed"
        buf += data
    return buf, "open"


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (TLS 1.2-1.3, ALPN h2), as a client would send."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.timeout(120)
def test_random_bytes_and_broken_tls_on_the_grpc_port(live: Live) -> None:
    rng = random.Random(0xF022)
    hello = client_hello()
    outcomes: Counter[str] = Counter()
    cases: list[tuple[str, bytes]] = []
    for _ in range(100):
        cases.append(("random bytes", rng.randbytes(rng.randint(1, 4096))))
    for _ in range(40):
        cases.append(("ClientHello + garbage", hello + rng.randbytes(rng.randint(1, 2048))))
    for _ in range(20):
        # A TLS record header that promises a huge record, then garbage.
        cases.append(("TLS record of 16 MiB", b"\x16\x03\x01\xff\xff" + rng.randbytes(1024)))
    for _ in range(20):
        cut = rng.randint(1, len(hello) - 1)
        cases.append(("a truncated ClientHello", hello[:cut]))
    cases.append(("plain-text HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 9))
    cases.append(("HTTP/1.1 request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    cases.append(("1 MiB of zeros", b"\0" * (1024 * 1024)))
    for name, payload in cases:
        RAN["gRPC port: random bytes / broken TLS connections"] += 1
        _, how = raw_exchange(live.port, payload)
        outcomes[f"{name}: {how}"] += 1
        assert how in ("closed", "reset"), f"{name}: the daemon kept the connection open"
    print(f"\n{len(cases)} connections: {dict(sorted(outcomes.items()))}")
    live.assert_serving()


# -- HTTP/2 frames over a real TLS session ------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types (RFC 9113 section 6).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
WINDOW_UPDATE, CONTINUATION = 0x8, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4
GOAWAY_CODES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    6: "FRAME_SIZE_ERROR",
    9: "COMPRESSION_ERROR",
    11: "ENHANCE_YOUR_CALM",
}


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames = []
    while len(data) >= 9:
        size = int.from_bytes(data[:3], "big")
        kind, flags = data[3], data[4]
        stream = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[9 : 9 + size]))
        data = data[9 + size :]
    return frames


def goaway(data: bytes) -> str | None:
    for kind, _, _, payload in parse_frames(data):
        if kind == GOAWAY and len(payload) >= 8:
            code = int.from_bytes(payload[4:8], "big")
            return GOAWAY_CODES.get(code, str(code))
    return None


def h2_connect(live: Live) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cadata=live.daemon.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", live.port), timeout=SOCKET_TIMEOUT)
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    assert tls.selected_alpn_protocol() == "h2"
    tls.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
    return tls


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def grpc_headers(path: bytes) -> bytes:
    # :method POST (static 3), :scheme https (static 7), then literals.
    return (
        b"\x83\x87"
        + hpack_literal(b":path", path)
        + hpack_literal(b":authority", b"localhost")
        + hpack_literal(b"content-type", b"application/grpc")
        + hpack_literal(b"te", b"trailers")
    )


def h2_exchange(live: Live, payload: bytes, quiet: float = 0.5) -> tuple[bytes, str]:
    """Send frames after a real handshake; read the reaction. A connection the daemon
    keeps open must still answer a PING (it is not wedged)."""
    with h2_connect(live) as tls:
        try:
            tls.sendall(payload)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return b"", "reset"
        data, how = _read_to_close(tls, quiet)
        if how == "open":
            return _ping(tls, data)
        return data, how


def _ping(tls: ssl.SSLSocket, received: bytes) -> tuple[bytes, str]:
    """PING the daemon; wait up to SOCKET_TIMEOUT for the ACK (or the end of the connection).

    `received` is what the connection brought so far (frames may straddle reads).
    """
    with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
        tls.sendall(frame(PING, 0, 0, b"are-you?"))
    buf = received
    tls.settimeout(SOCKET_TIMEOUT)
    deadline = time.monotonic() + SOCKET_TIMEOUT
    while time.monotonic() < deadline:
        if any(k == PING and f & 1 and p == b"are-you?" for k, f, _, p in parse_frames(buf)):
            return buf, "open, answers PING"
        try:
            data = tls.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return buf, "reset"
        except TimeoutError:
            break
        if not data:
            return buf, "closed"
        buf += data
    return buf, "open, wedged"


def reaction(data: bytes, how: str) -> str:
    frames = parse_frames(data)
    # What the daemon sent after its own SETTINGS / WINDOW_UPDATE / SETTINGS ack.
    kinds = {HEADERS: "HEADERS", RST_STREAM: "RST_STREAM", PING: "PING", GOAWAY: "GOAWAY"}
    sent = sorted({kinds[k] for k, _, _, _ in frames if k in kinds})
    code = goaway(data)
    return f"{'+'.join(sent) or 'nothing'}{f' {code}' if code else ''}, connection {how}"


H2_CASES = [
    pytest.param(frame(DATA, 0, 1, b"x" * 16384, length=2**24 - 1), id="16MiB-frame-header"),
    pytest.param(frame(HEADERS, END_HEADERS, 1, bytes(range(256)) * 16), id="garbage-hpack"),
    pytest.param(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 2**31)), id="window-over-2^31"),
    pytest.param(frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 2**24)), id="frame-size-over-max"),
    pytest.param(frame(SETTINGS, 0, 0, b"\x00\x04\x00"), id="settings-of-3-bytes"),
    pytest.param(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)), id="window-update-of-0"),
    pytest.param(frame(PING, 0, 1, b"12345678"), id="ping-on-a-stream"),
    pytest.param(frame(DATA, 0, 2, b"x"), id="data-on-an-idle-stream"),
    pytest.param(
        frame(HEADERS, 0, 1, grpc_headers(b"/vibectl.llm_proxy.VibectlLLMProxy/Execute"))
        + b"".join(frame(CONTINUATION, 0, 1, b"\x00" * 16384) for _ in range(256)),
        id="4MiB-continuation-flood",
    ),
    pytest.param(
        frame(HEADERS, END_HEADERS, 1, grpc_headers(b"/vibectl.llm_proxy.VibectlLLMProxy/Execute"))
        + frame(DATA, END_STREAM, 1, b"\x00\x7f\xff\xff\xff" + b"x" * 1000),
        id="grpc-length-prefix-2GiB",
    ),
    pytest.param(
        frame(HEADERS, END_HEADERS, 1, grpc_headers(b"/vibectl.llm_proxy.VibectlLLMProxy/Execute"))
        + frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x10" + b"\xff" * 16),
        id="grpc-garbage-protobuf",
    ),
    pytest.param(
        frame(HEADERS, END_HEADERS, 1, grpc_headers(b"/no.Such/Method"))
        + frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00"),
        id="unknown-method",
    ),
]


@pytest.mark.parametrize("payload", H2_CASES)
def test_malformed_http2_frames_are_refused(live: Live, payload: bytes) -> None:
    RAN["gRPC port: malformed HTTP/2 frames"] += 1
    data, how = h2_exchange(live, payload)
    print(f"\n{len(payload)} bytes of frames -> {reaction(data, how)}")
    assert how in ("closed", "reset", "open, answers PING")
    if payload.startswith(frame(DATA, 0, 1, b"", length=2**24 - 1)[:9]):
        assert how in ("closed", "reset"), "a frame over the maximum size must end the connection"
    live.assert_serving()


@pytest.mark.timeout(120)
def test_random_http2_frames_after_a_real_handshake(live: Live) -> None:
    rng = random.Random(0x4832)
    outcomes: Counter[str] = Counter()
    connections = 60
    for _ in range(connections):
        frames = b"".join(
            frame(
                rng.choice([DATA, HEADERS, 2, RST_STREAM, SETTINGS, 5, PING, GOAWAY, 8, 9, 10, 99]),
                rng.randrange(256),
                rng.choice([0, 1, 2, 3, rng.randrange(2**31)]),
                rng.randbytes(rng.choice([0, 1, 4, 8, 9, 100, 5000])),
            )
            for _ in range(rng.randint(1, 8))
        )
        _, how = h2_exchange(live, frames, quiet=0.2)
        RAN["gRPC port: connections of random HTTP/2 frames"] += 1
        outcomes[how] += 1
        assert how != "open, wedged"
    print(f"\n{connections} connections of random frames: {dict(sorted(outcomes.items()))}")
    live.assert_serving()


def test_a_rapid_reset_of_1000_streams(live: Live) -> None:
    """HEADERS then RST_STREAM, 1,000 times on one connection (CVE-2023-44487's pattern)."""
    RAN["gRPC port: rapid reset streams"] += 1000
    headers = grpc_headers(b"/vibectl.llm_proxy.VibectlLLMProxy/Execute")
    burst = b"".join(
        frame(HEADERS, END_HEADERS, sid, headers) + frame(RST_STREAM, 0, sid, b"\x00\x00\x00\x08")
        for sid in range(1, 2001, 2)
    )
    started = time.monotonic()
    with h2_connect(live) as tls:
        tls.sendall(burst)
        data, how = _read_to_close(tls, quiet=1.0)
    print(
        f"\n1000 streams opened and reset in {time.monotonic() - started:.2f} s: "
        f"{reaction(data, how)}"
    )
    live.assert_serving()
    assert live.daemon.runtime.inflight.total() == 0


# -- oversized gRPC messages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "codes"),
    [
        # Just over server.max_request_bytes (1 MiB): the service says what to do.
        (1024 * 1024 + 1000, {grpc.StatusCode.INVALID_ARGUMENT}),
        # Over gRPC's own receive limit (1 MiB + 64 KiB): refused by gRPC itself.
        (2 * 1024 * 1024, {grpc.StatusCode.RESOURCE_EXHAUSTED}),
    ],
    ids=["1-MiB-and-a-bit", "2-MiB"],
)
def test_oversized_grpc_messages_are_refused(
    live: Live, size: int, codes: set[grpc.StatusCode]
) -> None:
    RAN["gRPC port: oversized messages"] += 1
    req = pb.ExecuteRequest(user_fragments=["x" * size], model_name="faults")
    with pytest.raises(grpc.RpcError) as caught:
        live.stub.Execute(req, metadata=auth(live.secret), timeout=30)
    assert caught.value.code() in codes, caught.value
    live.assert_serving()


def test_oversized_metadata_is_refused(live: Live) -> None:
    RAN["gRPC port: oversized metadata"] += 1
    req = pb.ExecuteRequest(user_fragments=["hi"], model_name="faults")
    meta = [("authorization", "Bearer " + "a" * 200_000), ("x-junk", "j" * 100_000)]
    with pytest.raises(grpc.RpcError) as caught:
        live.stub.Execute(req, metadata=meta, timeout=10)
    print(f"\n300 KB of metadata -> {caught.value.code()}")
    assert caught.value.code() != grpc.StatusCode.OK
    live.assert_serving()


# The request path's own checks (issue 12): whatever a client puts in a request's
# request_id, model name and response schema, or in its authorization metadata, the
# answer is a documented status, never UNKNOWN or INTERNAL, and the daemon keeps serving.
REQUEST_PATH_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
}
request_ids = st.text(max_size=80) | st.text(alphabet="abc._:-09", max_size=70)
schemas = (
    json_values.map(json.dumps)
    | st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n)
    | st.integers(min_value=1, max_value=3000).map(lambda n: '{"a":' * n + "1" + "}" * n)
    | st.text(max_size=40)
)


@pytest.mark.timeout(300)
def test_random_request_fields_get_documented_answers(live: Live) -> None:
    restricted = live.daemon.issue("fuzz-restricted", models=["faults"])

    @LIVE
    @given(
        rid=request_ids,
        model=st.none() | st.sampled_from(["faults", "echo", "no-such"]) | st.text(max_size=20),
        schema=st.none() | schemas,
        secret=st.sampled_from([live.secret, restricted]),
    )
    def check(rid: str, model: str | None, schema: str | None, secret: str) -> None:
        RAN["gRPC port: random request fields"] += 1
        req = pb.ExecuteRequest(user_fragments=["hi"], request_id=rid)
        if model is not None:
            req.model_name = model
        if schema is not None:
            req.response_model_schema = schema
        try:
            reply = live.stub.Execute(req, metadata=auth(secret), timeout=10)
        except grpc.RpcError as e:
            assert e.code() in REQUEST_PATH_CODES, (e.code(), e.details())
            if secret == restricted and e.code() == grpc.StatusCode.PERMISSION_DENIED:
                assert "echo" not in (e.details() or "")
            return
        assert reply.request_id == rid or (not rid and len(reply.request_id) == 32)

    check()
    live.assert_serving()


@pytest.mark.timeout(300)
def test_random_authorization_metadata_is_refused_at_the_door(live: Live) -> None:
    execute = live.channel.unary_unary("/vibectl.llm_proxy.VibectlLLMProxy/Execute")

    @LIVE
    @given(
        value=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=600),
        # Garbage, or the oversize flood's megabytes (past gRPC's receive limit of 1 MiB
        # + 64 KiB): either would fail the call another way if it were read.
        body=st.binary(max_size=200) | st.integers(1 << 20, 6 << 20).map(bytes),
    )
    def check(value: str, body: bytes) -> None:
        RAN["gRPC port: random authorization metadata"] += 1
        try:
            execute(body, metadata=[("authorization", value)], timeout=10)
        except grpc.RpcError as e:
            # The body is never read: neither garbage nor size turns the refusal into another.
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
            return
        raise AssertionError(f"served with authorization {value!r}")

    check()
    live.assert_serving()
