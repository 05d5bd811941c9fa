"""`vibectl-admin`: the operator's CLI, a thin client of the admin socket.

It imports nothing of the daemon beyond `vibectld.admin.protocol`,
`vibectld.admin.client` and `vibectld.version` (an import contract and a test
prove it). Each module of this package adds its commands to the one group.
"""

from __future__ import annotations

from vibectld.admin.cli import clients, keys, reports, storage  # noqa: F401 - they register commands
from vibectld.admin.cli.base import (
    DEFAULT_SOCKET as DEFAULT_SOCKET,
)
from vibectld.admin.cli.base import (
    EX_FAILED as EX_FAILED,
)
from vibectld.admin.cli.base import (
    EX_NOPERM as EX_NOPERM,
)
from vibectld.admin.cli.base import (
    EX_OK as EX_OK,
)
from vibectld.admin.cli.base import (
    EX_UNAVAILABLE as EX_UNAVAILABLE,
)
from vibectld.admin.cli.base import (
    EX_USAGE as EX_USAGE,
)
from vibectld.admin.cli.base import (
    SOCKET_ENV as SOCKET_ENV,
)
from vibectld.admin.cli.base import cli as cli


def main() -> None:
    cli.main(prog_name="vibectl-admin")
