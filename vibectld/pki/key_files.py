"""The signing keys of a single node: one PEM file per key in ``state_dir/signing-keys/``.

`retire` moves a key's file to ``signing-keys/retired/``, which is never loaded, so every
secret it signed is refused from then on, after a restart too. The file's place is the one
record of retirement: there is no second copy (in the registry, say) that a restored
backup could contradict. Deleting a retired file is safe.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vibectl.util.files import atomic_write, ensure_private_dir
from vibectld.pki.kids import LoadedKeys, RetiredNotSynced, SigningKeyError, is_kid, new_kid

RETIRED_DIR = "retired"


class KeyDirectory:
    """The KeyBacking of one node: files, and the directory each file is in."""

    shared = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __repr__(self) -> str:
        return f"KeyDirectory({str(self.directory)!r})"

    def load(self) -> LoadedKeys:
        """Every key in the directory, creating the directory and a first key if needed.

        Keys in ``retired/`` are not loaded, only named; a kid found in both places
        counts as retired (a copy put back by hand must not revive it).
        """
        directory = self.directory
        try:
            ensure_private_dir(directory)
            paths = sorted(p for p in directory.glob("*.pem") if is_kid(p.stem))
            retired = frozenset(
                p.stem for p in (directory / RETIRED_DIR).glob("*.pem") if is_kid(p.stem)
            )
        except OSError as e:
            raise SigningKeyError(
                f"cannot use the signing-key directory {directory}: {e.strerror or e}; check "
                "that it belongs to the vibectld user"
            ) from None
        keys = {path.stem: load_key(path) for path in paths if path.stem not in retired}
        if not keys:
            kid, key = self.add(max(retired, default=None))
            keys[kid] = key
        return LoadedKeys(keys, retired)

    def add(self, latest: str | None) -> tuple[str, Ed25519PrivateKey]:
        kid = new_kid(latest)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.directory / f"{kid}.pem"
        try:
            atomic_write(path, pem, 0o600)
        except OSError as e:
            raise SigningKeyError(
                f"cannot write the signing key {path}: {e.strerror or e}"
            ) from None
        return kid, key

    def retire(self, kid: str) -> None:
        """Move the key's file into ``retired/`` and make the move durable."""
        retired = self.directory / RETIRED_DIR
        source, target = self.directory / f"{kid}.pem", retired / f"{kid}.pem"
        try:
            ensure_private_dir(retired)
            os.replace(source, target)
        except OSError as e:
            raise SigningKeyError(
                f"cannot move the signing key {source} to {retired}: {e.strerror or e}; the "
                "key still verifies — check that the directory belongs to the vibectld user"
            ) from None
        _sync_dirs(self.directory, retired)


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
        raise RetiredNotSynced(
            f"the signing key was retired, but {path} could not be synced to disk "
            f"({e.strerror or e}); check the disk before the next restart"
        ) from None


def load_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key in a key file; SigningKeyError says what is wrong, never quoting it."""
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
