"""Readers of single configuration values: each checks one kind of value and names the key.

config_file.py composes them into sections; they know nothing of sections or defaults.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from vibectl.redaction import KINDS
from vibectl.redaction_rules import CustomRuleError, validate_custom, validate_name
from vibectl.util.durations import parse_duration
from vibectl.util.limits import check_limit, check_usd


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the problem."""


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{key}: must be a non-empty string, got {v!r}")
    return v


def _opt_str(key: str, v: Any) -> str | None:
    return None if v is None else _str(key, v)


def _opt_path(key: str, v: Any) -> Path | None:
    return None if v is None else _path(key, v)


def _path(key: str, v: Any) -> Path:
    p = Path(_str(key, v))
    if not p.is_absolute():
        raise ConfigError(f"{key}: must be an absolute path, got {v!r}")
    return p


def _int(key: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key}: must be a whole number, got {v!r}")
    if v < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {v}")
    return v


def _workers(key: str, v: Any) -> int | Literal["auto"]:
    """`auto` (the CPUs this process may use) or a number of serving processes."""
    if v == "auto":
        return "auto"
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 256:
        raise ConfigError(f"{key}: must be auto or a whole number from 1 to 256, got {v!r}")
    return v


def _opt_int(key: str, v: Any) -> int | None:
    return None if v is None else _int(key, v)


def _limit(key: str, v: Any) -> int | None:
    """A default rate or budget limit: the same rule as a client's own (None: no limit)."""
    return check_limit(v, f"{key}:", ConfigError)


def _usd(key: str, v: Any) -> float | None:
    """A dollar budget: the same rule as a client's own (None: no budget)."""
    return check_usd(v, f"{key}:", ConfigError)


def _finite(v: Any) -> float | None:
    """`v` as a finite float, or None when it is not a plain number that fits one."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        number = float(v)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _seconds(key: str, v: Any) -> float:
    number = _finite(v)
    if number is None or number < 0:
        raise ConfigError(f"{key}: must be a number of seconds (0 or more), got {v!r}")
    return number


def _duration(key: str, v: Any) -> int:
    try:
        return parse_duration(_str(key, v))
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


# A short interval: a number (a decimal point allowed) and ms, s, m or h.
_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_INTERVAL_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _interval(key: str, v: Any) -> float:
    """A short duration such as 5s, 500ms or 2m, in seconds (more than zero).

    `_duration` reads lifetimes (30m to years), which have no seconds unit; this one
    reads how long something may wait or lag.
    """
    match = _INTERVAL.match(v) if isinstance(v, str) else None
    if match is None:
        raise ConfigError(
            f"{key}: must be a duration: a number and a unit, one of ms, s, m, h "
            f"(e.g. 5s, 1500ms, 1m), got {v!r}"
        )
    seconds = float(match.group(1)) * _INTERVAL_SECONDS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key}: must be longer than zero, got {v!r}")
    return seconds


def _str_list(key: str, v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ConfigError(f"{key}: must be a list of strings, got {v!r}")
    return tuple(_str(f"{key}[{i}]", item) for i, item in enumerate(v))


def _str_map(key: str, v: Any) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: must be a mapping of names to names, got {v!r}")
    return {_str(key, k): _str(f"{key}.{k}", val) for k, val in v.items()}


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def conv(key: str, v: Any) -> str:
        if v not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {v!r}")
        return str(v)

    return conv


def _listen(key: str, v: Any) -> str:
    text = _str(key, v)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ConfigError(f"{key}: must be HOST:PORT (e.g. 0.0.0.0:50051), got {v!r}")
    return text


def _public_url(key: str, v: Any) -> str | None:
    if v is None:
        return None
    text = _str(key, v)
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise ConfigError(f"{key}: is not a valid URL ({e}): {v!r}") from None
    if parts.scheme not in ("vibectl-server", "vibectl-server-insecure") or not parts.hostname:
        raise ConfigError(
            f"{key}: must look like vibectl-server://HOST:PORT (the address clients use), got {v!r}"
        )
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"{key}: has an invalid port: {v!r}") from None
    return text


def _price(key: str, v: Any) -> float:
    number = _finite(v)
    if number is None or number < 0:
        raise ConfigError(
            f"{key}: must be a price in USD per million tokens (0 or more), got {v!r}"
        )
    return number


def _opt_listen(key: str, v: Any) -> str | None:
    return None if v is None else _listen(key, v)


def _detectors(key: str, v: Any) -> str | tuple[str, ...]:
    """`all`, or a list of built-in detector names (vibectl.redaction.KINDS)."""
    if v == "all":
        return "all"
    if not isinstance(v, list):
        raise ConfigError(f"{key}: must be 'all' or a list of detector names, got {v!r}")
    for i, name in enumerate(v):
        if name not in KINDS:
            raise ConfigError(f"{key}[{i}]: unknown detector {name!r}; known: {', '.join(KINDS)}")
    return tuple(dict.fromkeys(v))


def _custom_rules(key: str, v: Any) -> tuple[tuple[str, str], ...]:
    """Custom redaction rules, `[{name, regex}]`, each checked by vibectl.redaction.

    A regex that does not compile, matches the empty string or most of ordinary kubectl
    output, or backtracks catastrophically is refused here, at load and at reload.
    """
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ConfigError(f"{key}: must be a list of {{name: NAME, regex: REGEX}} entries")
    rules: dict[str, str] = {}
    for i, item in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a mapping {{name: NAME, regex: REGEX}}")
        unknown = sorted(set(map(str, item)) - {"name", "regex"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key; a rule has a name and a regex")
        for required in ("name", "regex"):
            if required not in item:
                raise ConfigError(f"{where}.{required}: is required")
        name, regex = item["name"], item["regex"]
        try:
            validate_name(name)
        except CustomRuleError as e:
            raise ConfigError(f"{where}.name: {e}") from None
        if name in rules:
            raise ConfigError(f"{where}.name: {name!r} names an earlier rule too; rename one")
        try:
            validate_custom(name, regex)
        except CustomRuleError as e:
            raise ConfigError(f"{where}.regex: {e}") from None
        rules[name] = regex
    return tuple(rules.items())
