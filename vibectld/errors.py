"""The errors that mean "this daemon cannot start as configured".

Each carries a message naming the file, key or port and what to do; the CLI
logs it as one line and exits 1 instead of printing a traceback.
"""

from __future__ import annotations

from vibectld.admin.server import AdminSocketError
from vibectld.config import ConfigError
from vibectld.pki.signing import SigningKeyError
from vibectld.pki.tls import TLSError
from vibectld.providers.keys import ProviderKeyError
from vibectld.startup import StartupError
from vibectld.store.registry import RegistryError

STARTUP_ERRORS: tuple[type[Exception], ...] = (
    AdminSocketError,
    ConfigError,
    ProviderKeyError,
    RegistryError,
    SigningKeyError,
    StartupError,
    TLSError,
    OSError,
)
