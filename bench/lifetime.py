"""One shape for the benchmark's and the tests' helpers that own a process or a server."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class ClosedOnExit:
    """A context manager whose exit calls `close()`; entering returns the object itself."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
