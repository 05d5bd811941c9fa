"""The client's error types. Each knows its exit code and whether a retry may help.

Exit codes of `vibectl`:
  0   ok
  1   the model failed (provider error, unknown model, …)
  2   usage error (bad flags, a malformed URL)
  3   client configuration problem (a corrupted or missing file)
  4   the server refused the secret (missing, revoked, expired)
  5   the secret may not do this (e.g. a model outside its allow-list)
  65  the server rejected the request as invalid (too large, bad schema)
  69  vibectld cannot be reached
  75  a limit was hit; retry later
"""

from __future__ import annotations

from vibectl.model_errors import RECOVERABLE_CODES


class VibectlError(Exception):
    exit_code = 1
    # A recoverable error may go away by itself: retrying later can succeed.
    recoverable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# One small class per exit code, on purpose (the `duplicates` tool sees their shared
# shape): callers catch them by type, and tests/docs/test_reference_drift.py checks the
# man page against their exit codes. A table of codes would hide them from both.


class UsageError(VibectlError):
    exit_code = 2


class ConfigurationError(VibectlError):
    exit_code = 3


class AuthenticationError(VibectlError):
    exit_code = 4


class PermissionDeniedError(VibectlError):
    exit_code = 5


class InvalidRequestError(VibectlError):
    exit_code = 65


class ServerUnavailableError(VibectlError):
    exit_code = 69
    recoverable = True


class LimitExceededError(VibectlError):
    exit_code = 75
    recoverable = True

    def __init__(self, message: str, limit_type: str | None, retry_after_ms: int | None) -> None:
        super().__init__(message)
        self.limit_type = limit_type
        self.retry_after_ms = retry_after_ms


class ModelError(VibectlError):
    """The model could not answer (reported in-band by the server, or by llm directly)."""

    exit_code = 1

    def __init__(self, code: str, message: str, details: str | None = None) -> None:
        super().__init__(message)
        # A vibectl.model_errors.ErrorCode, the same in direct and proxy mode.
        self.code = code
        self.details = details
        self.recoverable = code in RECOVERABLE_CODES
