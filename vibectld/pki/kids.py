"""What every backing of the signing keys shares: the kid format, the errors, the interface.

A kid starts with its UTC creation time, so sorting kids sorts keys by age: the newest
signs, and every key not retired verifies. Two backings keep the keys: files in
``state_dir/signing-keys/`` (one node, key_files.py) and sealed rows in the cluster's
PostgreSQL database (several nodes, cluster.py). `SigningKeys` (signing.py) holds the
loaded keys in memory and asks its backing only to load, add and retire.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_KID = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]{6}$")
_KID_TIME = "%Y%m%dT%H%M%SZ"
KID_RULE = (
    "a kid looks like 20260131T120000Z-0a1b2c; list them with: vibectl-admin list-signing-keys"
)


class SigningKeyError(Exception):
    """The signing keys' store or a key in it is unusable; the message names which."""


class UnknownSigningKey(SigningKeyError):
    """No signing key, present or retired, has that kid."""


class SigningKeyInUse(SigningKeyError):
    """The key cannot be retired: it is the one that signs, or already retired."""


class RetiredNotSynced(SigningKeyError):
    """The key is retired, but the record of it may not survive a crash of the machine."""


def already_retired(kid: str) -> SigningKeyInUse:
    return SigningKeyInUse(f"the signing key {kid} is already retired")


def unknown(kid: str) -> UnknownSigningKey:
    return UnknownSigningKey(f"no signing key has the kid {kid!r}; {KID_RULE}")


def current_key(kid: str, *, only: bool) -> SigningKeyInUse:
    return SigningKeyInUse(
        f"the signing key {kid} is the current{' and only' if only else ''} one, which "
        "signs new secrets; make a new one first with: vibectl-admin rotate-signing-key"
    )


@dataclass(frozen=True)
class LoadedKeys:
    """What a backing holds: the keys that verify, and the kids of retired keys."""

    keys: dict[str, Ed25519PrivateKey] = field(repr=False)
    retired: frozenset[str]


class KeyBacking(Protocol):
    """Where the signing keys are kept. Calls come one at a time (SigningKeys serialises
    them), from worker threads: each may write and wait for the disk or the database."""

    # Whether other processes (nodes) change the same keys, so that memory can be behind.
    shared: bool

    def load(self) -> LoadedKeys:
        """Every key, creating a first one when none verifies."""
        ...

    def add(self, latest: str | None) -> tuple[str, Ed25519PrivateKey]:
        """Create and keep a new key whose kid sorts after `latest` (and every kid kept)."""
        ...

    def retire(self, kid: str) -> None:
        """Record that `kid` no longer verifies; UnknownSigningKey or SigningKeyInUse when
        the backing's own record refuses it."""
        ...


def new_kid(latest: str | None, now: dt.datetime | None = None) -> str:
    """A kid that sorts after `latest`, even if the clock went back."""
    when = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    latest_match = _KID.fullmatch(latest) if latest else None
    if latest_match:
        when = max(when, _kid_time(latest_match.group(1)) + dt.timedelta(seconds=1))
    return f"{when:{_KID_TIME}}-{secrets.token_hex(3)}"


def is_kid(text: object) -> bool:
    """Whether `text` has the shape of a kid (not whether such a key exists)."""
    return isinstance(text, str) and _KID.fullmatch(text) is not None


def kid_created_at(kid: str) -> int | None:
    """The creation time (unix seconds) a kid carries, or None if it carries none."""
    match = _KID.fullmatch(kid)
    if match is None:
        return None
    return int(_kid_time(match.group(1)).timestamp())


def private_der(key: Ed25519PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 DER: what the cluster database seals."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _kid_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, _KID_TIME).replace(tzinfo=dt.UTC)
