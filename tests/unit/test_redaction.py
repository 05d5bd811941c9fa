"""The redaction engine's API: detectors, custom rules and their validation, the adapter hook."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vibectl.adapters.base import ModelAdapter, Prompt, Reply
from vibectl.redaction import KINDS, Redactor, summary
from vibectl.redaction_rules import CustomRuleError, validate_custom

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVlLWhlcmU"
AWS = "AKIAIOSFODNN7EXAMPLE"


def test_placeholders_name_the_kind_and_counts_add_up() -> None:
    text = f"token: {JWT}\nkey={AWS} and again {AWS}\n"
    redacted, counts = Redactor().redact(text)
    assert redacted == (
        "token: [REDACTED:jwt]\nkey=[REDACTED:aws_access_key_id] and again "
        "[REDACTED:aws_access_key_id]\n"
    )
    assert counts == Counter({"aws_access_key_id": 2, "jwt": 1})
    assert Redactor().find(text) == counts
    assert summary(counts) == "3 secrets (aws_access_key_id 2, jwt 1)"


def test_a_prompt_of_only_secrets_and_an_empty_one() -> None:
    assert Redactor().redact(JWT) == ("[REDACTED:jwt]", Counter({"jwt": 1}))
    assert Redactor().redact("") == ("", Counter())


def test_detectors_can_be_chosen_and_unknown_ones_are_named() -> None:
    only_aws = Redactor(detectors=["aws_access_key_id"])
    assert only_aws.redact(f"{JWT} {AWS}") == (
        f"{JWT} [REDACTED:aws_access_key_id]",
        Counter({"aws_access_key_id": 1}),
    )
    with pytest.raises(ValueError, match="unknown detector"):
        Redactor(detectors=["jwt", "nope"])
    with pytest.raises(ValueError, match="'all' or a list"):
        Redactor(detectors="some")
    assert "k8s_secret" in KINDS and "anthropic_key" in KINDS


def test_custom_rules_are_redacted_as_their_name() -> None:
    r = Redactor(custom=[("ticket-id", "TKT-[0-9]{6}")])
    assert r.redact("see TKT-123456 now") == (
        "see [REDACTED:ticket-id] now",
        Counter({"ticket-id": 1}),
    )
    assert "ticket-id" in r.kinds


def test_offsets_survive_characters_whose_lower_case_is_longer() -> None:
    text = "İİİ password: hunter2-xyz\n"
    redacted, counts = Redactor().redact(text)
    assert redacted == "İİİ password: [REDACTED:password]\n"
    assert counts == Counter({"password": 1})


def test_a_valid_custom_rule_compiles() -> None:
    assert validate_custom("ticket-id", "TKT-[0-9]{6}").pattern == "TKT-[0-9]{6}"


@pytest.mark.parametrize(
    ("name", "regex", "problem"),
    [
        ("Bad Name", "x+", "lower-case letters"),
        ("jwt", "x+", "built-in detector"),
        ("r", "", "empty"),
        ("r", "(unclosed", "not a valid regex"),
        ("r", ".*", "matches the empty string"),
        ("r", "a?", "matches the empty string"),
        ("r", ".+", "of ordinary kubectl output"),
        ("r", r"\S+", "of ordinary kubectl output"),
        ("r", "(a+)+$", "catastrophically slow"),
        ("r", "(x|x)+y", "catastrophically slow"),
    ],
)
def test_bad_custom_rules_are_refused_with_the_problem(name: str, regex: str, problem: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(CustomRuleError, match=problem):
        validate_custom(name, regex)
    assert time.monotonic() - t0 < 5


class _Recording(ModelAdapter):
    mode = "test"

    def __init__(self) -> None:
        self.sent: list[Prompt] = []
        self.notices: list[Counter[str]] = []
        self.on_redacted = self.notices.append

    def get_model(self, name: str | None) -> Any:
        return name

    async def _execute(self, model: Any, prompt: Prompt) -> Reply:
        self.sent.append(prompt)
        return "ok", None  # type: ignore[return-value]

    async def _stream(self, model: Any, prompt: Prompt) -> AsyncIterator[str]:
        self.sent.append(prompt)
        yield "ok"

    def validate_model_key(self, name: str | None) -> str | None:
        return None

    async def validate_model_name(self, name: str) -> str | None:
        return None

    async def list_models(self) -> list[dict[str, Any]]:
        return []


def test_the_adapter_redacts_system_and_user_fragments_in_both_calls() -> None:
    adapter = _Recording()
    asyncio.run(adapter.execute(None, [f"sys {JWT}"], [f"user {AWS}", "plain"]))

    async def stream() -> list[str]:
        return [c async for c in adapter.stream_execute(None, [], [f"k {AWS}"])]

    asyncio.run(stream())
    first, second = adapter.sent
    assert first.system_fragments == ["sys [REDACTED:jwt]"]
    assert first.user_fragments == ["user [REDACTED:aws_access_key_id]", "plain"]
    assert second.user_fragments == ["k [REDACTED:aws_access_key_id]"]
    assert adapter.notices == [
        Counter({"jwt": 1, "aws_access_key_id": 1}),
        Counter({"aws_access_key_id": 1}),
    ]
    assert adapter.last_redactions == Counter({"aws_access_key_id": 1})


def test_the_adapter_sends_as_is_when_told() -> None:
    adapter = _Recording()
    adapter.redact = False
    asyncio.run(adapter.execute(None, [], [f"user {AWS}"]))
    assert adapter.sent[0].user_fragments == [f"user {AWS}"]
    assert adapter.notices == [] and adapter.last_redactions == Counter()


# `kubectl get secret -o yaml` of a Secret made by `kubectl apply`: its data also sits in
# the last-applied annotation, one line of JSON; and a stringData file as a block.
APPLIED_SECRET = """\
apiVersion: v1
data:
  password: cGFzc3dvcmQtMTIz
kind: Secret
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"v1","data":{"password":"cGFzc3dvcmQtMTIz"},"kind":"Secret","metadata":{"annotations":{},"name":"db","namespace":"default"}}
  name: db
stringData:
  app.conf: |
    user = admin
    pass = hunter2-hunter2
type: Opaque
"""


def test_what_was_redacted_holds_nothing_for_a_second_pass() -> None:
    """The server screens what vibectl already redacted: its placeholders, in a Secret's
    block values and one-line JSON too, are not secrets (found again they would be
    counted twice, and a server in refuse mode would refuse a clean prompt)."""
    redacted, counts = Redactor().redact(APPLIED_SECRET)
    assert counts == Counter({"k8s_secret": 4})
    assert "cGFzc3dvcmQtMTIz" not in redacted and "hunter2" not in redacted
    assert Redactor().find(redacted) == Counter()


# Pieces of kubectl output, secrets and the syntax around them, for the property below.
_PIECES = st.sampled_from(
    [
        "apiVersion: v1",
        "kind: Secret",
        "kind: ConfigMap",
        "data:",
        "stringData:",
        "  password: cGFzcw==",
        "  token: |",
        "    abc",
        "password:",
        "hunter2",
        "PASSWORD=",
        "token=",
        "Bearer",
        JWT,
        AWS,
        "postgres://u:p@h/",
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----END RSA PRIVATE KEY-----",
        "ghp_" + "a" * 36,
        "xoxb-1234567890",
        "sk-ant-api03-" + "a1" * 12,
        "- name: DB_PASSWORD",
        "value:",
        "client-key-data:",
        "LS0tLS1CRUdJTiBSU0E=",
        "[REDACTED:jwt]",
        '"',
        "'",
        "{",
        "}",
        "-",
        '\\"',
        "İ",
    ]
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(_PIECES, st.text(max_size=8)),
            st.sampled_from([" ", "\n", "\t", ": ", "=", "\r\n"]),
        ),
        max_size=30,
    )
)
def test_any_mix_is_redacted_without_error_and_no_placeholder_is_found_again(
    parts: list[tuple[str, str]],
) -> None:
    """A prompt vibectl redacted reaches the server's policy, which must not find its
    placeholders again (it would count them twice, or refuse a clean prompt). It may find
    something new: the first pass can miss in malformed text what the second then sees."""
    text = "".join(piece + sep for piece, sep in parts)
    spans = Redactor().spans(text)
    end = 0
    for s, e, _ in spans:
        assert end <= s < e <= len(text)
        end = e
    redacted, counts = Redactor().redact(text)
    assert counts.total() == len(spans)
    placeholders = [m.span() for m in re.finditer(r"\[REDACTED:[\w-]+\]", redacted)]
    assert len(placeholders) >= len(spans)
    for s, e, kind in Redactor().spans(redacted):
        overlap = [(ps, pe) for ps, pe in placeholders if s < pe and ps < e]
        assert not overlap, (kind, redacted[s:e], text)
