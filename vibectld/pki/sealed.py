"""The cluster key: how private keys are kept in a database every node shares.

`vibectld --generate-cluster-key` prints a new key; the operator puts the same file on
every node as the `cluster-key` credential. What the database holds of a private key is
sealed with it: AES-256-GCM, with the row's purpose (say "signing_key 20260131T120000Z-0a1b2c")
as associated data, so a sealed value copied into another row does not open there. Anyone
with the database but not the key learns nothing of the private keys; a node with a
different key is refused at start (the "check" row does not open).
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "vck1:"  # "vibectld cluster key", format 1
_FORMAT = b"\x01"
_NONCE_BYTES = 12
# What a node seals under the purpose "check" when it creates the cluster's state: a node
# whose key opens it uses the same key.
CHECK_PLAINTEXT = b"vibectld cluster key check"


class ClusterKeyError(Exception):
    """The key is malformed, or a sealed value does not open with it; never quotes it."""


class ClusterKey:
    """An AES-256-GCM key; the value stays in this object (repr shows nothing of it)."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ClusterKeyError("a cluster key is 32 bytes")
        self._aead = AESGCM(raw)

    def __repr__(self) -> str:
        return "ClusterKey(...)"

    @classmethod
    def generate(cls) -> tuple[ClusterKey, str]:
        """A new key, and its text for the credential file."""
        raw = AESGCM.generate_key(bit_length=256)
        return cls(raw), PREFIX + base64.urlsafe_b64encode(raw).decode("ascii")

    @classmethod
    def parse(cls, text: str) -> ClusterKey:
        """The key of a credential file's text (surrounding whitespace ignored)."""
        text = text.strip()
        fix = "make one with: vibectld --generate-cluster-key, and use the same file on every node"
        if not text.startswith(PREFIX):
            raise ClusterKeyError(f"the cluster-key credential does not start with {PREFIX}; {fix}")
        try:
            raw = base64.urlsafe_b64decode(text[len(PREFIX) :].encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ClusterKeyError(
                f"the cluster-key credential is not valid base64; {fix}"
            ) from None
        if len(raw) != 32:
            raise ClusterKeyError(f"the cluster-key credential is not a 32-byte key; {fix}")
        return cls(raw)

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _FORMAT + nonce + self._aead.encrypt(nonce, plaintext, purpose.encode())

    def open(self, sealed: bytes, purpose: str) -> bytes:
        """The plaintext; ClusterKeyError if `sealed` was not sealed by this key for `purpose`."""
        sealed = bytes(sealed)
        if len(sealed) < 1 + _NONCE_BYTES + 16 or sealed[:1] != _FORMAT:
            raise ClusterKeyError(f"the stored {purpose} is not a sealed value of this vibectld")
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, purpose.encode())
        except InvalidTag:
            raise ClusterKeyError(
                f"the stored {purpose} does not open with this node's cluster-key: every node "
                "needs the same cluster-key file as the node that created the cluster"
            ) from None
