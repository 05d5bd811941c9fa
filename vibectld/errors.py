"""The errors that mean "this daemon cannot start as configured".

Each carries a message naming the file, key or port and what to do; the CLI
logs it as one line and exits 1 instead of printing a traceback.
"""

from __future__ import annotations

from vibectld.admin.server import AdminSocketError
from vibectld.config import ConfigError
from vibectld.daemon import StartupError
from vibectld.provider_keys import ProviderKeyError
from vibectld.registry import RegistryError
from vibectld.tls import TLSError
from vibectld.tokens import SigningKeyError

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
