"""The server's redaction policy: secrets out of every prompt, whatever client sent it.

`redaction.mode` (vibectld.yaml(5)): ``redact``, the default, replaces each secret in
every system and user fragment with ``[REDACTED:<kind>]`` before the model is chosen,
so no provider ever receives one; ``refuse`` answers INVALID_ARGUMENT naming the kinds
found and how many (never a value), before any model call and before any budget is
looked at; ``off`` sends prompts as they came. The engine is vibectl's own
(vibectl/redaction.py), so a prompt reads the same after client- and server-side
redaction, and what a client already redacted arrives as placeholders that no detector
matches: the server counts only what got past the client (``vibectl --no-redact``,
vibectl 0.11, any other gRPC client).

A `RedactionPolicy` belongs to a Generation: its Redactor (the chosen detectors and the
custom rules, which config loading has already checked) is compiled once per
configuration load, never per call, and with ``off`` there is none and no work at all.

The response schema is left as sent: a developer writes it, it is not pasted kubectl
output, and a placeholder inside it would change the JSON schema the model must follow.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from vibectl.redaction import Redactor, summary
from vibectld.config import RedactionConfig
from vibectld.service.refusals import InvalidRequest


@dataclass(frozen=True)
class Screened:
    """A call's fragments as they may go to the model, and the secrets found in them."""

    system: list[str]
    user: list[str]
    found: Counter[str]  # per kind; replaced in `system` and `user` (mode redact)


class SecretsRefused(InvalidRequest):
    """redaction.mode is refuse and the prompt holds secrets; `found` counts them per kind."""

    def __init__(self, found: Counter[str]) -> None:
        super().__init__(
            f"the prompt holds {summary(found)}; this server refuses prompts with secrets "
            "(redaction.mode: refuse) — remove them and send it again, or let vibectl "
            "redact them (leave out --no-redact)"
        )
        self.found = found


@dataclass(frozen=True)
class RedactionPolicy:
    mode: str  # redact | refuse | off
    redactor: Redactor | None  # None when off

    @classmethod
    def build(cls, config: RedactionConfig) -> RedactionPolicy:
        if config.mode == "off":
            return cls("off", None)
        return cls(config.mode, Redactor(config.detectors, config.custom))

    def screen(self, system: Sequence[str], user: Sequence[str]) -> Screened:
        """The fragments to send and the secrets found; SecretsRefused in mode refuse."""
        redactor = self.redactor
        if redactor is None:
            return Screened(list(system), list(user), Counter())
        if self.mode == "refuse":
            found: Counter[str] = Counter()
            for fragment in (*system, *user):
                found.update(redactor.find(fragment))
            if found:
                raise SecretsRefused(found)
            return Screened(list(system), list(user), found)
        system_out, in_system = redactor.redact_all(system)
        user_out, in_user = redactor.redact_all(user)
        in_system.update(in_user)
        return Screened(system_out, user_out, in_system)


def kinds_text(found: Counter[str]) -> str:
    """The kinds found, sorted and comma-separated: the journal's KINDS field."""
    return ",".join(sorted(found))
