"""Who is calling: the bearer secret, checked cryptographically and against the registry.

A secret is honoured only if its signature, expiry, audience and issuer check
out, its signing key is not retired, *and* its id is in the registry and not
revoked. The registry and key checks run on every call, so a revocation or a
retired key applies to the very next request.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

from vibectld.pki.signing import Claims, SigningKeys, TokenError
from vibectld.service.refusals import Unauthenticated
from vibectld.store.registry import ClientRecord

ASK_ADMIN = "ask your vibectld admin for a new one"
_CACHE_SIZE = 4096


class ClientLookup(Protocol):
    """The part of the registry authentication reads: one record by secret id."""

    def get(self, jti: str) -> ClientRecord | None: ...


def check_registered(record: ClientRecord | None, now: int) -> ClientRecord:
    """`record`, if its client may call at `now`; else Unauthenticated saying why."""
    if record is None:
        raise Unauthenticated(f"secret is not registered on this server — {ASK_ADMIN}")
    if record.revoked_at is not None:
        raise Unauthenticated(f"secret was revoked — {ASK_ADMIN}")
    if record.expires_at <= now:
        raise Unauthenticated(f"secret has expired — {ASK_ADMIN}")
    return record


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, secret = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise Unauthenticated(
                    "authorization metadata must be 'Bearer <secret>'; "
                    "configure the client with: vibectl setup-proxy configure - (and paste the URL)"
                )
            return secret.strip()
    raise Unauthenticated(
        "no client secret was sent; "
        "configure one with: vibectl setup-proxy configure - (and paste the URL)"
    )


class Authenticator:
    """Turns call metadata into the calling client's registry record, or refuses.

    Built once per configuration generation with the issuer and audience it
    checks, so its cache of verified secrets can never outlive a change of
    either: a reload builds a new Authenticator with an empty cache.
    """

    def __init__(
        self, signing: SigningKeys, clients: ClientLookup, *, issuer: str, audience: str
    ) -> None:
        self._signing = signing
        self._clients = clients
        self._issuer = issuer
        self._audience = audience
        # Verified signatures are remembered (never the verdict on the client,
        # which is re-read from the registry every time) so a busy client costs
        # one Ed25519 verification, not one per request.
        self._verified: OrderedDict[str, Claims] = OrderedDict()

    def _verify(self, secret: str, now: int) -> Claims:
        claims = self._verified.get(secret)
        if claims is not None:
            # A key retired since the secret was verified refuses it on this very
            # request: the cache remembers a signature, not that its key is still good.
            if claims.exp > now and self._signing.verifies(claims.kid):
                self._verified.move_to_end(secret)
                return claims
            del self._verified[secret]
        try:
            claims = self._signing.verify(secret, iss=self._issuer, aud=self._audience, now=now)
        except TokenError as e:
            raise Unauthenticated(str(e)) from None
        self._verified[secret] = claims
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> ClientRecord:
        now = int(time.time())
        claims = self._verify(_bearer(metadata), now)
        return check_registered(self._clients.get(claims.jti), now)
