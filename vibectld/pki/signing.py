"""Client secrets: EdDSA (Ed25519) JWTs signed with rotating keys.

The newest key signs; every key not retired verifies. `rotate` adds a key that signs
from then on; `retire` stops a key verifying, so every secret it signed is refused from
then on, after a restart too. Where the keys are kept is a backing (kids.py): files on
one node (key_files.py), or sealed rows of the cluster's database when several nodes
share one (cluster.py).

Verification runs on every request, so the keys are loaded once and held in memory,
and a token is checked without touching the disk or the database.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vibectld.pki.key_files import RETIRED_DIR, KeyDirectory
from vibectld.pki.kids import (
    KID_RULE,
    KeyBacking,
    LoadedKeys,
    RetiredNotSynced,
    SigningKeyError,
    SigningKeyInUse,
    UnknownSigningKey,
    already_retired,
    current_key,
    is_kid,
    kid_created_at,
    unknown,
)

__all__ = [
    "ALGORITHM",
    "KID_RULE",
    "RETIRED_DIR",
    "Claims",
    "SigningKeyError",
    "SigningKeyInUse",
    "SigningKeys",
    "TokenError",
    "UnknownSigningKey",
    "is_kid",
]

ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ("sub", "jti", "iat", "exp", "iss", "aud")
# Far above any secret we issue (about 400 bytes); refuses absurd input before parsing it.
MAX_TOKEN_LENGTH = 4096


class TokenError(Exception):
    """A secret failed a check. The message says which one; it never quotes the secret."""

    MALFORMED = "malformed"
    ALGORITHM = "algorithm"
    SIGNATURE = "signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    AUDIENCE = "audience"
    ISSUER = "issuer"
    UNKNOWN_KEY = "unknown_key"
    RETIRED_KEY = "retired_key"
    MISSING_CLAIM = "missing_claim"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    sub: str
    jti: str
    iat: int
    exp: int
    iss: str
    aud: str
    kid: str


_MESSAGES = {
    TokenError.MALFORMED: "secret is malformed; paste the whole URL your vibectld admin gave you",
    TokenError.ALGORITHM: "secret uses a disallowed algorithm",
    TokenError.SIGNATURE: "secret signature does not verify",
    TokenError.EXPIRED: "secret has expired — ask your vibectld admin for a new one",
    TokenError.NOT_YET_VALID: (
        "secret is not valid yet (issued in the future); check the server's clock"
    ),
    TokenError.AUDIENCE: "secret was issued for another server (aud)",
    TokenError.ISSUER: "secret was issued by another server (iss)",
    TokenError.UNKNOWN_KEY: (
        "secret was signed by an unknown key — ask your vibectld admin for a new one"
    ),
    TokenError.RETIRED_KEY: (
        "secret was signed by a retired key — ask your vibectld admin for a new one"
    ),
}


def _fail(reason: str) -> TokenError:
    return TokenError(reason, _MESSAGES[reason])


@dataclass(frozen=True)
class _KeySet:
    """One consistent view of the keys, replaced whole: a verify or sign that reads
    `SigningKeys._set` once never sees a kid without its key, or a retired key verifying."""

    private: dict[str, Ed25519PrivateKey] = field(repr=False)
    public: dict[str, Ed25519PublicKey] = field(repr=False)
    retired: frozenset[str]
    active: str

    @classmethod
    def of(cls, loaded: LoadedKeys) -> _KeySet:
        keys = loaded.keys
        public = {kid: key.public_key() for kid, key in keys.items()}
        return cls(dict(keys), public, loaded.retired, max(keys))

    def without(self, kid: str) -> _KeySet:
        private = {k: v for k, v in self.private.items() if k != kid}
        public = {k: v for k, v in self.public.items() if k != kid}
        return _KeySet(private, public, self.retired | {kid}, self.active)


class SigningKeys:
    """The Ed25519 keys that sign and verify client secrets, held in memory."""

    def __init__(self, backing: KeyBacking) -> None:
        self._backing = backing
        self._set = _KeySet.of(backing.load())
        # Rotations, retirements and refreshes run in worker threads (they write to the
        # disk or the database): one at a time, so two rotations cannot pick their kids
        # from the same `active`.
        self._changing = threading.Lock()
        # Time checks are ours (they take `now`); PyJWT checks signature, iss, aud, presence.
        self._jwt = jwt.PyJWT(
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "strict_aud": True,
            }
        )

    def __repr__(self) -> str:
        return f"SigningKeys({self._backing!r}, kids={sorted(self._set.public)!r})"

    @classmethod
    def load_or_create(cls, directory: Path) -> SigningKeys:
        """A single node's keys, in `directory`, created with a first key if needed."""
        return cls(KeyDirectory(directory))

    @property
    def shared(self) -> bool:
        """Whether other nodes change these keys (the cluster's database)."""
        return self._backing.shared

    @property
    def active_kid(self) -> str:
        return self._set.active

    @property
    def kids(self) -> tuple[str, ...]:
        """The kids that verify, oldest first (the last one signs)."""
        return tuple(sorted(self._set.public))

    @property
    def retired_kids(self) -> tuple[str, ...]:
        return tuple(sorted(self._set.retired))

    def loaded(self) -> LoadedKeys:
        """The keys as held now, as a backing gives them (for a worker process's copy)."""
        keys = self._set
        return LoadedKeys(dict(keys.private), keys.retired)

    def verifies(self, kid: str) -> bool:
        """Whether secrets signed by `kid` are accepted now (a dict lookup; per request)."""
        return kid in self._set.public

    def refresh(self) -> frozenset[str]:
        """Load the keys again from the backing (another node rotated or retired one);
        the kids that verified before and no longer do."""
        with self._changing:
            before, self._set = self._set, _KeySet.of(self._backing.load())
            return frozenset(before.public.keys() - self._set.public.keys())

    def rotate(self) -> str:
        """Create a new signing key; it signs from now on, and older keys still verify."""
        with self._changing:
            if self._backing.shared:
                # Another node may have made a newer key: the new one must sort after it.
                self._set = _KeySet.of(self._backing.load())
            current = self._set
            kid, key = self._backing.add(max((current.active, *current.retired)))
            self._set = _KeySet(
                {**current.private, kid: key},
                {**current.public, kid: key.public_key()},
                current.retired,
                kid,
            )
            return kid

    def retire(self, kid: str) -> None:
        """Stop accepting secrets signed by `kid`, now and after a restart.

        Refused (SigningKeyInUse) for the key that signs, which is also the case when it
        is the only key; UnknownSigningKey if no key has that kid.
        """
        with self._changing:
            if self._backing.shared:
                # Decided on the cluster's keys, not on what this node last heard of them.
                self._set = _KeySet.of(self._backing.load())
            current = self._set
            if kid in current.retired:
                raise already_retired(kid)
            if kid not in current.public:
                raise unknown(kid)
            if kid == current.active:
                raise current_key(kid, only=len(current.public) == 1)
            # The backing records it before memory changes: once the daemon refuses the
            # key, a restart refuses it too. A failure leaves both as they were.
            try:
                self._backing.retire(kid)
            except RetiredNotSynced:
                self._set = current.without(kid)
                raise
            self._set = current.without(kid)

    @staticmethod
    def created_at(kid: str) -> int | None:
        """The creation time (unix seconds) a kid carries, or None if it carries none."""
        return kid_created_at(kid)

    def sign(
        self,
        *,
        sub: str,
        jti: str,
        iat: int,
        exp: int,
        iss: str,
        aud: str,
        kid: str | None = None,
    ) -> str:
        """A secret signed by `kid` (default: the current key).

        A caller that records the kid before signing passes it, so a rotation in
        between cannot make the record name another key than the one that signed.
        """
        if exp <= iat:
            raise ValueError("a secret's expiry must come after its issue time")
        payload = {"sub": sub, "jti": jti, "iat": iat, "exp": exp, "iss": iss, "aud": aud}
        keys = self._set
        kid = keys.active if kid is None else kid
        key = keys.private.get(kid)
        if key is None:
            raise SigningKeyError(
                f"the signing key {kid} was retired before this secret was signed"
            )
        return jwt.encode(
            payload,
            key,
            algorithm=ALGORITHM,
            headers={"kid": kid, "typ": "JWT"},
        )

    def verify(
        self, token: str, *, iss: str, aud: str, now: int | None = None, leeway: int = 30
    ) -> Claims:
        """Check a secret's signature and claims; raise TokenError saying which check failed."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise _fail(TokenError.MALFORMED)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _fail(TokenError.MALFORMED) from None
        # Decided before any key is touched: "none", or HS256 keyed with our public key,
        # must never reach a verifier.
        if header.get("alg") != ALGORITHM:
            raise _fail(TokenError.ALGORITHM)
        kid = header.get("kid")
        keys = self._set
        key = keys.public.get(kid) if isinstance(kid, str) else None
        if key is None or not isinstance(kid, str):
            retired = isinstance(kid, str) and kid in keys.retired
            raise _fail(TokenError.RETIRED_KEY if retired else TokenError.UNKNOWN_KEY)
        payload = self._decode(token, key, iss=iss, aud=aud)
        return _claims(payload, kid, now=int(time.time()) if now is None else now, leeway=leeway)

    def _decode(self, token: str, key: Ed25519PublicKey, *, iss: str, aud: str) -> dict[str, Any]:
        try:
            return self._jwt.decode(token, key, algorithms=[ALGORITHM], issuer=iss, audience=aud)
        except jwt.InvalidSignatureError:
            raise _fail(TokenError.SIGNATURE) from None
        except jwt.InvalidAlgorithmError:
            raise _fail(TokenError.ALGORITHM) from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(
                TokenError.MISSING_CLAIM, f"secret lacks the required claim {e.claim!r}"
            ) from None
        except jwt.InvalidAudienceError:
            raise _fail(TokenError.AUDIENCE) from None
        except jwt.InvalidIssuerError:
            raise _fail(TokenError.ISSUER) from None
        except jwt.ExpiredSignatureError:
            raise _fail(TokenError.EXPIRED) from None
        except jwt.ImmatureSignatureError:
            raise _fail(TokenError.NOT_YET_VALID) from None
        except jwt.PyJWTError:
            raise _fail(TokenError.MALFORMED) from None


def _claims(payload: dict[str, Any], kid: str, *, now: int, leeway: int) -> Claims:
    times = {name: payload.get(name) for name in ("iat", "exp", "nbf")}
    for name, value in times.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TokenError(TokenError.MALFORMED, f"secret has a non-integer {name!r} claim")
    texts = {name: payload[name] for name in ("sub", "jti", "iss", "aud")}
    for name, value in texts.items():
        if not isinstance(value, str) or not value:
            raise TokenError(TokenError.MALFORMED, f"secret has an invalid {name!r} claim")
    iat, exp, nbf = payload["iat"], payload["exp"], payload.get("nbf")
    if exp <= now - leeway:
        raise _fail(TokenError.EXPIRED)
    if iat > now + leeway or (nbf is not None and nbf > now + leeway):
        raise _fail(TokenError.NOT_YET_VALID)
    return Claims(iat=iat, exp=exp, kid=kid, **texts)
