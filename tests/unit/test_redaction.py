"""The redaction engine's API: detectors, custom rules and their validation, the adapter hook."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

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
