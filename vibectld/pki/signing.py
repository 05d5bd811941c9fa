"""Client secrets: EdDSA (Ed25519) JWTs signed with rotating keys.

Keys live in ``<state_dir>/signing-keys/<kid>.pem``. A kid starts with its UTC
creation time, so sorting the names sorts the keys by age: the newest signs, and
every key still present verifies. Retiring a key (deleting its file) invalidates
every secret it signed.

Verification runs on every request, so the keys are loaded once and held in memory,
and a token is checked without touching the disk.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vibectl.util.files import atomic_write, ensure_private_dir

ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ("sub", "jti", "iat", "exp", "iss", "aud")
# Far above any secret we issue (about 400 bytes); refuses absurd input before parsing it.
MAX_TOKEN_LENGTH = 4096

_KID = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]{6}$")
_KID_TIME = "%Y%m%dT%H%M%SZ"


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
    MISSING_CLAIM = "missing_claim"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SigningKeyError(Exception):
    """The signing-key directory or a key in it is unusable; the message names the file."""


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
}


def _fail(reason: str) -> TokenError:
    return TokenError(reason, _MESSAGES[reason])


class SigningKeys:
    """The Ed25519 keys that sign and verify client secrets."""

    def __init__(self, directory: Path, keys: dict[str, Ed25519PrivateKey]) -> None:
        self._dir = directory
        self._private = keys
        self._public = {kid: key.public_key() for kid, key in keys.items()}
        self._active = max(keys)
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
        return f"SigningKeys(directory={str(self._dir)!r}, kids={sorted(self._public)!r})"

    @classmethod
    def load_or_create(cls, directory: Path) -> SigningKeys:
        """Load every key in `directory`, creating the directory and a first key if needed."""
        try:
            ensure_private_dir(directory)
            paths = sorted(p for p in directory.glob("*.pem") if _KID.fullmatch(p.stem))
        except OSError as e:
            raise SigningKeyError(
                f"cannot use the signing-key directory {directory}: {e.strerror or e}; check "
                "that it belongs to the vibectld user"
            ) from None
        keys = {path.stem: _load_key(path) for path in paths}
        if not keys:
            kid, key = _new_key(directory, latest=None)
            keys[kid] = key
        return cls(directory, keys)

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(sorted(self._public))

    def rotate(self) -> str:
        """Create a new signing key; it signs from now on, and older keys still verify."""
        kid, key = _new_key(self._dir, latest=self._active)
        # Replaced rather than mutated, so a concurrent verify sees either set whole.
        self._private = {**self._private, kid: key}
        self._public = {**self._public, kid: key.public_key()}
        self._active = kid
        return kid

    def sign(self, *, sub: str, jti: str, iat: int, exp: int, iss: str, aud: str) -> str:
        if exp <= iat:
            raise ValueError("a secret's expiry must come after its issue time")
        payload = {"sub": sub, "jti": jti, "iat": iat, "exp": exp, "iss": iss, "aud": aud}
        kid = self._active
        return jwt.encode(
            payload,
            self._private[kid],
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
        key = self._public.get(kid) if isinstance(kid, str) else None
        if key is None or not isinstance(kid, str):
            raise _fail(TokenError.UNKNOWN_KEY)
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


def _new_key(directory: Path, *, latest: str | None) -> tuple[str, Ed25519PrivateKey]:
    """Create and store a key whose kid sorts after `latest`, even if the clock went back."""
    when = dt.datetime.now(dt.UTC).replace(microsecond=0)
    latest_match = _KID.fullmatch(latest) if latest else None
    if latest_match:
        latest_time = dt.datetime.strptime(latest_match.group(1), _KID_TIME).replace(tzinfo=dt.UTC)
        when = max(when, latest_time + dt.timedelta(seconds=1))
    kid = f"{when:{_KID_TIME}}-{secrets.token_hex(3)}"
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = directory / f"{kid}.pem"
    try:
        atomic_write(path, pem, 0o600)
    except OSError as e:
        raise SigningKeyError(f"cannot write the signing key {path}: {e.strerror or e}") from None
    return kid, key


def _load_key(path: Path) -> Ed25519PrivateKey:
    what_to_do = "restore it from a backup, or delete it (secrets it signed stop working)"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read the signing key {path}: {e.strerror or e}") from None
    # The loader's own errors are not shown: they could quote parts of the key.
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningKeyError(
            f"the signing key {path} is not an unencrypted PEM private key; {what_to_do}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the signing key {path} is not an Ed25519 key; {what_to_do}")
    return key
