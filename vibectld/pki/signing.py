"""Client secrets: EdDSA (Ed25519) JWTs signed with rotating keys.

Keys live in ``<state_dir>/signing-keys/<kid>.pem``. A kid starts with its UTC
creation time, so sorting the names sorts the keys by age: the newest signs, and
every key still present verifies. `rotate` adds a key that signs from then on;
`retire` moves a key's file to ``signing-keys/retired/``, which is never loaded, so
every secret it signed is refused from then on, after a restart too. The file's
place is the one record of retirement: there is no second copy (in the registry,
say) that a restored backup could contradict. Deleting a retired file is safe.

Verification runs on every request, so the keys are loaded once and held in memory,
and a token is checked without touching the disk.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import threading
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
RETIRED_DIR = "retired"
KID_RULE = (
    "a kid looks like 20260131T120000Z-0a1b2c; list them with: vibectl-admin list-signing-keys"
)


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


class SigningKeyError(Exception):
    """The signing-key directory or a key in it is unusable; the message names the file."""


class UnknownSigningKey(SigningKeyError):
    """No signing key, present or retired, has that kid."""


class SigningKeyInUse(SigningKeyError):
    """The key cannot be retired: it is the one that signs, or already retired."""


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


class SigningKeys:
    """The Ed25519 keys that sign and verify client secrets."""

    def __init__(
        self,
        directory: Path,
        keys: dict[str, Ed25519PrivateKey],
        retired: frozenset[str] = frozenset(),
    ) -> None:
        self._dir = directory
        self._private = keys
        self._public = {kid: key.public_key() for kid, key in keys.items()}
        self._retired = retired
        self._active = max(keys)
        # Rotations and retirements run in worker threads (they write and fsync files):
        # one at a time, so two rotations cannot pick their kids from the same `_active`.
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
        return f"SigningKeys(directory={str(self._dir)!r}, kids={sorted(self._public)!r})"

    @classmethod
    def load_or_create(cls, directory: Path) -> SigningKeys:
        """Load every key in `directory`, creating the directory and a first key if needed.

        Keys in ``directory/retired/`` are not loaded, only named; a kid found in both
        places counts as retired (a copy put back by hand must not revive it).
        """
        try:
            ensure_private_dir(directory)
            paths = sorted(p for p in directory.glob("*.pem") if _KID.fullmatch(p.stem))
            retired = frozenset(
                p.stem for p in (directory / RETIRED_DIR).glob("*.pem") if _KID.fullmatch(p.stem)
            )
        except OSError as e:
            raise SigningKeyError(
                f"cannot use the signing-key directory {directory}: {e.strerror or e}; check "
                "that it belongs to the vibectld user"
            ) from None
        keys = {path.stem: _load_key(path) for path in paths if path.stem not in retired}
        if not keys:
            kid, key = _new_key(directory, latest=max(retired, default=None))
            keys[kid] = key
        return cls(directory, keys, retired)

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> tuple[str, ...]:
        """The kids that verify, oldest first (the last one signs)."""
        return tuple(sorted(self._public))

    @property
    def retired_kids(self) -> tuple[str, ...]:
        return tuple(sorted(self._retired))

    def verifies(self, kid: str) -> bool:
        """Whether secrets signed by `kid` are accepted now (a dict lookup; per request)."""
        return kid in self._public

    def rotate(self) -> str:
        """Create a new signing key; it signs from now on, and older keys still verify."""
        with self._changing:
            kid, key = _new_key(self._dir, latest=max((self._active, *self._retired)))
            # Replaced rather than mutated, so a concurrent verify sees either set whole;
            # `_active` last, so a concurrent sign never picks a kid without its key.
            self._private = {**self._private, kid: key}
            self._public = {**self._public, kid: key.public_key()}
            self._active = kid
            return kid

    def retire(self, kid: str) -> None:
        """Stop accepting secrets signed by `kid`, now and after a restart.

        Refused (SigningKeyInUse) for the key that signs, which is also the case when it
        is the only key; UnknownSigningKey if no key has that kid.
        """
        with self._changing:
            if kid in self._retired:
                raise SigningKeyInUse(f"the signing key {kid} is already retired")
            if kid not in self._public:
                raise UnknownSigningKey(f"no signing key has the kid {kid!r}; {KID_RULE}")
            if kid == self._active:
                only = " and only" if len(self._public) == 1 else ""
                raise SigningKeyInUse(
                    f"the signing key {kid} is the current{only} one, which signs new "
                    "secrets; make a new one first with: vibectl-admin rotate-signing-key"
                )
            # The file moves before memory changes: once the daemon refuses the key, a
            # restart refuses it too. A failed move leaves both as they were.
            _move_to_retired(self._dir, kid)
            self._public = {k: v for k, v in self._public.items() if k != kid}
            self._private = {k: v for k, v in self._private.items() if k != kid}
            self._retired = self._retired | {kid}
            _sync_dirs(self._dir, self._dir / RETIRED_DIR)

    @staticmethod
    def created_at(kid: str) -> int | None:
        """The creation time (unix seconds) a kid carries, or None if it carries none."""
        match = _KID.fullmatch(kid)
        if match is None:
            return None
        return int(_kid_time(match.group(1)).timestamp())

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
        kid = self._active if kid is None else kid
        key = self._private.get(kid)
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
        key = self._public.get(kid) if isinstance(kid, str) else None
        if key is None or not isinstance(kid, str):
            retired = isinstance(kid, str) and kid in self._retired
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


def _new_key(directory: Path, *, latest: str | None) -> tuple[str, Ed25519PrivateKey]:
    """Create and store a key whose kid sorts after `latest`, even if the clock went back."""
    when = dt.datetime.now(dt.UTC).replace(microsecond=0)
    latest_match = _KID.fullmatch(latest) if latest else None
    if latest_match:
        when = max(when, _kid_time(latest_match.group(1)) + dt.timedelta(seconds=1))
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


def is_kid(text: object) -> bool:
    """Whether `text` has the shape of a kid (not whether such a key exists)."""
    return isinstance(text, str) and _KID.fullmatch(text) is not None


def _kid_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, _KID_TIME).replace(tzinfo=dt.UTC)


def _move_to_retired(directory: Path, kid: str) -> None:
    """Move the key's file into ``retired/``; SigningKeyError if it did not move."""
    retired = directory / RETIRED_DIR
    source, target = directory / f"{kid}.pem", retired / f"{kid}.pem"
    try:
        ensure_private_dir(retired)
        os.replace(source, target)
    except OSError as e:
        raise SigningKeyError(
            f"cannot move the signing key {source} to {retired}: {e.strerror or e}; the key "
            "still verifies — check that the directory belongs to the vibectld user"
        ) from None


def _sync_dirs(*paths: Path) -> None:
    """Make a rename between these directories durable (it is done either way)."""
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        raise SigningKeyError(
            f"the signing key was retired, but {path} could not be synced to disk "
            f"({e.strerror or e}); check the disk before the next restart"
        ) from None


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
