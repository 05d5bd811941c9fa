"""What every `vibectl` command shares: the invocation state and error handling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from vibectl.config import ClientConfig, ClientConfigError, ConfigStore
from vibectl.errors import VibectlError

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """What every command needs: the config store and the per-invocation proxy choice."""

    def __init__(self, proxy: str | None, no_proxy: bool) -> None:
        self.proxy = proxy
        self.no_proxy = no_proxy
        self.store = ConfigStore()
        self._config: ClientConfig | None = None

    def config(self) -> ClientConfig:
        if self._config is None:
            self._config = self.store.load()
            if self.store.migration_notice:
                click.echo(f"vibectl: {self.store.migration_notice}", err=True)
        return self._config


def fail(message: str, code: int) -> None:
    click.echo(f"vibectl: {message}", err=True)
    sys.exit(code)


def handles_errors(fn: F) -> F:
    """Turn the client's errors into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientConfigError as e:
            fail(str(e), 3)
        except VibectlError as e:
            hint = " (this may pass; retry later)" if e.recoverable else ""
            fail(f"{e.message}{hint}", e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def command(group: click.Group, name: str) -> Callable[[Callable[..., None]], click.Command]:
    """Declare a `vibectl` command: it is given the State and its errors become exit codes.

    Its arguments and options go below this decorator, as with click's own.
    """

    def declare(fn: Callable[..., None]) -> click.Command:
        return group.command(name)(click.pass_obj(handles_errors(fn)))

    return declare
