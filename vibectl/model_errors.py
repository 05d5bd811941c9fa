"""Model failures: the stable codes and the one rule that classifies a provider's exception.

vibectld reports a failed model call in-band (ExecuteError.error_code), and the
client's direct mode raises the same failure itself. Both classify with
`classify()`, so a provider's 401 reads PROVIDER_AUTH_ERROR whether the call went
through the proxy or straight to the provider. Only the key's owner differs (the
server's key or the user's own), and that is a parameter, not a second classifier.

Standard library only: proxy mode imports this (via vibectl.errors) and must
start without llm or pydantic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class ErrorCode:
    """Stable in-band error codes (ExecuteError.error_code) existing clients know."""

    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    SCHEMA_NOT_SUPPORTED = "SCHEMA_NOT_SUPPORTED"
    PROVIDER_ERROR = "PROVIDER_ERROR"
    PROVIDER_AUTH_ERROR = "PROVIDER_AUTH_ERROR"
    PROVIDER_TIMEOUT = "PROVIDER_TIMEOUT"
    PROVIDER_RATE_LIMITED = "PROVIDER_RATE_LIMITED"


# Failures that may go away by themselves: retrying later can succeed.
RECOVERABLE_CODES = frozenset({ErrorCode.PROVIDER_TIMEOUT, ErrorCode.PROVIDER_RATE_LIMITED})

# Exception class names (any provider SDK, any llm plugin) that mean the key is the problem.
_AUTH_EXCEPTION_NAMES = frozenset({"NeedsKeyException", "AuthenticationError"})
_MAX_DETAILS = 1000
_MAX_QUOTED = 300


@dataclass(frozen=True)
class KeyOwner:
    """Whose provider key a call used, in the words a failure message needs."""

    whose: str  # "this server's" or "your"
    remedy: str  # what the reader should do when the provider refuses that key


# The daemon calls providers with the operator's keys; a remote user cannot fix them.
SERVER_KEY = KeyOwner("this server's", "tell the vibectld admin")


class Failure(NamedTuple):
    code: str
    message: str
    details: str


def _unchanged(text: str) -> str:
    return text


def classify(
    exc: BaseException,
    model_id: str,
    key: KeyOwner,
    redact: Callable[[str], str] = _unchanged,
) -> Failure:
    """Map whatever a provider or llm plugin raised to one failure with a stable code.

    `redact` removes secrets (provider key values) from everything quoted back.
    """
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    details = redact(f"{name}: {exc}")[:_MAX_DETAILS]
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        code = ErrorCode.PROVIDER_TIMEOUT
        message = f"the provider of '{model_id}' did not answer in time; try again later"
    elif status == 429 or "RateLimit" in name:
        code = ErrorCode.PROVIDER_RATE_LIMITED
        message = f"the provider of '{model_id}' is rate-limiting {key.whose} key; retry shortly"
    elif status in (401, 403) or name in _AUTH_EXCEPTION_NAMES:
        code = ErrorCode.PROVIDER_AUTH_ERROR
        message = (
            f"the provider of '{model_id}' refused {key.whose} key, or there is none; {key.remedy}"
        )
    else:
        code = ErrorCode.PROVIDER_ERROR
        quoted = redact(str(exc))[:_MAX_QUOTED] or name
        message = f"the provider of '{model_id}' failed: {quoted}"
    return Failure(code, message, details)
