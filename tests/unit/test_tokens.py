"""Signing and verifying client secrets with real keys on disk."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vibectld.pki.signing import (
    Claims,
    SigningKeyError,
    SigningKeyInUse,
    SigningKeys,
    TokenError,
    UnknownSigningKey,
    is_kid,
)

ISS, AUD = "vibectld", "vibectl-llm-proxy"
NOW = 1_800_000_000


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys.load_or_create(tmp_path / "signing-keys")


def issue(keys: SigningKeys, **overrides: Any) -> str:
    claims: dict[str, Any] = {
        "sub": "alice",
        "jti": "0123456789abcdef0123456789abcdef",
        "iat": NOW,
        "exp": NOW + 3600,
        "iss": ISS,
        "aud": AUD,
    }
    claims.update(overrides)
    return keys.sign(**claims)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def payload_of(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def sign_raw(tmp_path: Path, keys: SigningKeys, payload: dict[str, Any]) -> str:
    """Sign any payload with the active key, bypassing SigningKeys.sign's own checks."""
    pem = (tmp_path / "signing-keys" / f"{keys.active_kid}.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": keys.active_kid})


def reject(keys: SigningKeys, token: str, reason: str, **kwargs: Any) -> TokenError:
    kwargs.setdefault("now", NOW)
    with pytest.raises(TokenError) as err:
        keys.verify(token, iss=kwargs.pop("iss", ISS), aud=kwargs.pop("aud", AUD), **kwargs)
    assert err.value.reason == reason
    # A secret must never be echoed back, not even in part.
    for piece in token.split("."):
        if len(piece) > 8:
            assert piece not in str(err.value)
    return err.value


def test_round_trip(keys: SigningKeys) -> None:
    token = issue(keys)
    claims = keys.verify(token, iss=ISS, aud=AUD, now=NOW + 10)
    assert claims == Claims(
        sub="alice",
        jti="0123456789abcdef0123456789abcdef",
        iat=NOW,
        exp=NOW + 3600,
        iss=ISS,
        aud=AUD,
        kid=keys.active_kid,
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": keys.active_kid, "typ": "JWT"}


def test_verify_uses_the_clock_by_default(keys: SigningKeys) -> None:
    now = int(time.time())
    token = issue(keys, iat=now, exp=now + 60)
    assert keys.verify(token, iss=ISS, aud=AUD).sub == "alice"


def test_expired(keys: SigningKeys) -> None:
    token = issue(keys)
    err = reject(keys, token, "expired", now=NOW + 3600 + 31)
    assert str(err) == "secret has expired — ask your vibectld admin for a new one"
    # Within the leeway it still passes.
    keys.verify(token, iss=ISS, aud=AUD, now=NOW + 3600 + 29)
    reject(keys, token, "expired", now=NOW + 3600, leeway=0)


def test_not_yet_valid(keys: SigningKeys) -> None:
    token = issue(keys, iat=NOW + 120, exp=NOW + 3600)
    reject(keys, token, "not_yet_valid")
    keys.verify(token, iss=ISS, aud=AUD, now=NOW + 100)  # 20 s ahead: within leeway


def test_wrong_audience(keys: SigningKeys) -> None:
    err = reject(keys, issue(keys), "audience", aud="another-server")
    assert "another server (aud)" in str(err)


def test_audience_list_is_refused(keys: SigningKeys) -> None:
    reject(keys, issue(keys, aud=[AUD, "x"]), "audience")


def test_wrong_issuer(keys: SigningKeys) -> None:
    reject(keys, issue(keys), "issuer", iss="someone-else")


def test_tampered_payload(keys: SigningKeys) -> None:
    header, _, signature = issue(keys).split(".")
    payload = payload_of(issue(keys))
    payload["sub"] = "mallory"
    tampered = f"{header}.{b64(json.dumps(payload).encode())}.{signature}"
    err = reject(keys, tampered, "signature")
    assert str(err) == "secret signature does not verify"


def test_tampered_signature(keys: SigningKeys) -> None:
    header, payload, signature = issue(keys).split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    reject(keys, f"{header}.{payload}.{flipped}", "signature")


def test_alg_none(keys: SigningKeys) -> None:
    payload = payload_of(issue(keys))
    for alg in ("none", "None", "NONE"):
        token = forge({"alg": alg, "typ": "JWT", "kid": keys.active_kid}, payload)
        reject(keys, token, "algorithm")
        reject(keys, token.rstrip("."), "malformed")


def test_hs256_with_public_key_as_secret(keys: SigningKeys, tmp_path: Path) -> None:
    private_pem = next((tmp_path / "signing-keys").glob("*.pem")).read_bytes()
    private = serialization.load_pem_private_key(private_pem, password=None)
    for secret in (
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ),
    ):
        token = forge(
            {"alg": "HS256", "typ": "JWT", "kid": keys.active_kid},
            payload_of(issue(keys)),
            lambda data, key=secret: hmac.new(key, data, hashlib.sha256).digest(),
        )
        reject(keys, token, "algorithm")


def test_signed_by_another_key_store(keys: SigningKeys, tmp_path: Path) -> None:
    other = SigningKeys.load_or_create(tmp_path / "other")
    token = issue(other)
    # Borrow our kid so the token is checked against our key.
    header, payload, signature = token.split(".")
    header = b64(json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": keys.active_kid}).encode())
    reject(keys, f"{header}.{payload}.{signature}", "signature")
    if other.active_kid != keys.active_kid:
        reject(keys, token, "unknown_key")


def test_unknown_or_missing_kid(keys: SigningKeys) -> None:
    _, payload, signature = issue(keys).split(".")
    for header, reason in (
        ({"alg": "EdDSA", "kid": "20000101T000000Z-000000"}, "unknown_key"),
        ({"alg": "EdDSA"}, "unknown_key"),
        ({"alg": "EdDSA", "kid": 7}, "malformed"),
    ):
        reject(keys, f"{b64(json.dumps(header).encode())}.{payload}.{signature}", reason)


@pytest.mark.parametrize("claim", ["sub", "jti", "iat", "exp", "iss", "aud"])
def test_missing_claim(keys: SigningKeys, tmp_path: Path, claim: str) -> None:
    payload = payload_of(issue(keys))
    del payload[claim]
    # Signed for real, so only the missing claim is wrong.
    token = sign_raw(tmp_path, keys, payload)
    err = reject(keys, token, "missing_claim")
    assert repr(claim) in str(err)


@pytest.mark.parametrize("value", ["1800000000", 1.8e9, True, None])
def test_non_integer_times(keys: SigningKeys, tmp_path: Path, value: Any) -> None:
    payload = payload_of(issue(keys))
    payload["iat"] = value
    token = sign_raw(tmp_path, keys, payload)
    reject(keys, token, "missing_claim" if value is None else "malformed")


@pytest.mark.parametrize(
    "token", ["", "abc", "a.b.c", "a.b", "....", "x" * 5000, "eyJhbGciOiJFZERTQSJ9.e30."]
)
def test_malformed(keys: SigningKeys, token: str) -> None:
    with pytest.raises(TokenError) as err:
        keys.verify(token, iss=ISS, aud=AUD, now=NOW)
    assert err.value.reason in ("malformed", "unknown_key")
    if token:
        assert token not in str(err.value)


def test_rotation(keys: SigningKeys, tmp_path: Path) -> None:
    old_kid = keys.active_kid
    old_token = issue(keys)
    new_kid = keys.rotate()
    assert new_kid != old_kid and keys.active_kid == new_kid
    assert new_kid > old_kid  # names sort by age, even within one second
    new_token = issue(keys)
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert keys.verify(old_token, iss=ISS, aud=AUD, now=NOW).kid == old_kid
    assert keys.verify(new_token, iss=ISS, aud=AUD, now=NOW).kid == new_kid
    third = keys.rotate()
    assert third > new_kid

    # A restart sees all three keys and signs with the newest.
    reloaded = SigningKeys.load_or_create(tmp_path / "signing-keys")
    assert reloaded.active_kid == third
    assert reloaded.kids == (old_kid, new_kid, third)
    assert reloaded.verify(old_token, iss=ISS, aud=AUD, now=NOW).kid == old_kid


def test_key_files_and_directory_modes(keys: SigningKeys, tmp_path: Path) -> None:
    keys.rotate()
    directory = tmp_path / "signing-keys"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.iterdir())
    assert [f.name for f in files] == [f"{kid}.pem" for kid in keys.kids]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_reload_is_stable(tmp_path: Path) -> None:
    first = SigningKeys.load_or_create(tmp_path / "k")
    second = SigningKeys.load_or_create(tmp_path / "k")
    assert second.kids == first.kids
    token = issue(first)
    assert second.verify(token, iss=ISS, aud=AUD, now=NOW).sub == "alice"


def test_kid_format(keys: SigningKeys) -> None:
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", keys.active_kid)


def test_corrupt_key_file(tmp_path: Path) -> None:
    directory = tmp_path / "k"
    SigningKeys.load_or_create(directory)
    bad = directory / "29990101T000000Z-abcdef.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningKeyError, match=str(bad)) as err:
        SigningKeys.load_or_create(directory)
    assert "AAAA" not in str(err.value)


def test_repr_shows_no_key_material(keys: SigningKeys) -> None:
    text = repr(keys)
    assert keys.active_kid in text
    assert "PRIVATE" not in text


def test_sign_refuses_inverted_times(keys: SigningKeys) -> None:
    with pytest.raises(ValueError):
        issue(keys, exp=NOW)


def test_retire_refuses_its_secrets_now_and_after_a_restart(
    keys: SigningKeys, tmp_path: Path
) -> None:
    old_kid = keys.active_kid
    old_token = issue(keys)
    new_kid = keys.rotate()
    new_token = issue(keys)
    keys.retire(old_kid)
    assert not keys.verifies(old_kid) and keys.verifies(new_kid)
    assert keys.kids == (new_kid,) and keys.retired_kids == (old_kid,)
    error = reject(keys, old_token, "retired_key")
    assert "retired key" in str(error) and "ask your vibectld admin" in str(error)
    assert keys.verify(new_token, iss=ISS, aud=AUD, now=NOW).kid == new_kid

    # The file moved to retired/ (still 0600, in a 0700 directory), so a restart
    # loads only the new key and names the old one as retired.
    directory = tmp_path / "signing-keys"
    assert not (directory / f"{old_kid}.pem").exists()
    moved = directory / "retired" / f"{old_kid}.pem"
    assert stat.S_IMODE(moved.stat().st_mode) == 0o600
    assert stat.S_IMODE(moved.parent.stat().st_mode) == 0o700
    reloaded = SigningKeys.load_or_create(directory)
    assert reloaded.kids == (new_kid,) and reloaded.retired_kids == (old_kid,)
    assert reloaded.active_kid == new_kid
    reject(reloaded, old_token, "retired_key")


def test_the_current_or_only_key_cannot_be_retired(keys: SigningKeys, tmp_path: Path) -> None:
    only = keys.active_kid
    with pytest.raises(SigningKeyInUse, match=r"current and only one.*rotate-signing-key"):
        keys.retire(only)
    newer = keys.rotate()
    with pytest.raises(SigningKeyInUse, match=f"{newer} is the current one"):
        keys.retire(newer)
    keys.retire(only)
    with pytest.raises(SigningKeyInUse, match="already retired"):
        keys.retire(only)
    with pytest.raises(UnknownSigningKey, match="list-signing-keys"):
        keys.retire("20200101T000000Z-000000")
    # Nothing refused moved a file.
    assert (tmp_path / "signing-keys" / f"{newer}.pem").exists()


def test_a_retired_key_put_back_by_hand_stays_retired(keys: SigningKeys, tmp_path: Path) -> None:
    old_kid = keys.active_kid
    old_token = issue(keys)
    keys.rotate()
    keys.retire(old_kid)
    directory = tmp_path / "signing-keys"
    (directory / f"{old_kid}.pem").write_bytes(
        (directory / "retired" / f"{old_kid}.pem").read_bytes()
    )
    reloaded = SigningKeys.load_or_create(directory)
    assert old_kid not in reloaded.kids
    reject(reloaded, old_token, "retired_key")


def test_a_new_key_sorts_after_retired_ones(tmp_path: Path) -> None:
    # Every key file was retired (by hand: the daemon refuses to retire the current
    # key); the key made at the next start must still be the newest kid.
    directory = tmp_path / "signing-keys"
    (directory / "retired").mkdir(parents=True)
    future = "29990101T000000Z-abcdef"
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "retired" / f"{future}.pem").write_bytes(pem)
    keys = SigningKeys.load_or_create(directory)
    assert keys.active_kid > future and keys.retired_kids == (future,)


def test_sign_with_a_named_key(keys: SigningKeys) -> None:
    old_kid = keys.active_kid
    keys.rotate()
    token = issue(keys, kid=old_kid)
    assert jwt.get_unverified_header(token)["kid"] == old_kid
    keys.rotate()
    keys.retire(old_kid)
    with pytest.raises(SigningKeyError, match="retired before this secret was signed"):
        issue(keys, kid=old_kid)


def test_kid_shape_and_creation_time(keys: SigningKeys) -> None:
    assert is_kid(keys.active_kid)
    assert not is_kid("20260101T000000Z-ABCDEF") and not is_kid(None) and not is_kid("x")
    assert SigningKeys.created_at("20260131T120000Z-0a1b2c") == 1769860800
    assert SigningKeys.created_at("nope") is None
