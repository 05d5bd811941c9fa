"""Custom redaction rules: refused at load when they would match everything or run away.

A rule is a (name, regex) pair from the server's ``redaction.custom``. `validate_custom`
refuses a bad name, a regex that does not compile, one that matches the empty string or
most of ordinary kubectl text, and one whose running time explodes on adversarial
inputs (a timing probe bounds the regex engine's work, so no linear-time engine is
needed as a dependency).
"""

from __future__ import annotations

import re
import time

from vibectl.redaction_table import KIND_NAME, KINDS

BENIGN_SAMPLE = """\
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c8f6d-x2k9p
  namespace: default
  resourceVersion: "123456"
  uid: 3f1c2a4e-8b7d-4c1e-9f0a-2b3c4d5e6f70
spec:
  containers:
  - image: registry.example.com/web@sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2
    name: web
Events:
  Normal  Pulled  12s  kubelet  Successfully pulled image "nginx:1.25" in 1.2s
2024-05-01T10:00:03Z INFO listening on 0.0.0.0:8080
"""
MAX_BENIGN_COVERAGE = 0.5  # of the sample's characters
PROBE_BUDGET_SECONDS = 0.02  # one probe; a linear pattern takes microseconds
PROBE_SIZES = (*range(4, 33, 2), 64, 256, 1024, 4096)


class CustomRuleError(ValueError):
    """A custom rule that cannot be used; the message names the rule and the problem."""


def validate_name(name: str) -> None:
    """CustomRuleError unless `name` can name a custom rule (and its placeholder)."""
    if not isinstance(name, str) or not KIND_NAME.fullmatch(name):
        raise CustomRuleError(
            f"custom rule name {name!r}: 1 to 40 lower-case letters, digits, '_' or '-', "
            "starting with a letter or digit (it is shown in [REDACTED:<name>])"
        )
    if name in KINDS:
        raise CustomRuleError(f"custom rule {name!r}: that is a built-in detector's name")


def validate_custom(name: str, regex: str) -> re.Pattern[str]:
    """The compiled rule, or CustomRuleError saying what is wrong with it."""
    validate_name(name)
    if not isinstance(regex, str) or not regex:
        raise CustomRuleError(f"custom rule {name!r}: the regex is empty")
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise CustomRuleError(f"custom rule {name!r}: not a valid regex: {e}") from None
    except (OverflowError, RecursionError) as e:
        # re.compile's other refusals: a{1,4294967295}, or groups nested thousands deep.
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CustomRuleError(f"custom rule {name!r}: not a valid regex: {what}") from None
    if pattern.search("") is not None:
        raise CustomRuleError(
            f"custom rule {name!r}: {regex!r} matches the empty string, so it would match "
            "everywhere; make it require at least one character"
        )
    covered = sum(m.end() - m.start() for m in pattern.finditer(BENIGN_SAMPLE))
    if covered > MAX_BENIGN_COVERAGE * len(BENIGN_SAMPLE):
        raise CustomRuleError(
            f"custom rule {name!r}: {regex!r} matches {covered / len(BENIGN_SAMPLE):.0%} of "
            "ordinary kubectl output (a pod, an event, a log line); it would redact almost "
            "everything. Make it specific to the secret's format"
        )
    slow = _slow_input(pattern, regex)
    if slow is not None:
        raise CustomRuleError(
            f"custom rule {name!r}: {regex!r} is catastrophically slow: {slow}; avoid nested "
            "or adjacent repetitions that can match the same text (such as (a+)+ or .*.*)"
        )
    return pattern


def _alphabets(regex: str) -> list[str]:
    """Strings to repeat: the regex's own characters, then a few common ones and pairs."""
    own = [c for c in dict.fromkeys(regex) if c.isprintable() and c not in "()[]{}|*+?^$\\"]
    return [*own[:12], "a", "A", "0", " ", "-", "ab", "a0", "a ", "\t", "\n"]


def _slow_input(pattern: re.Pattern[str], regex: str) -> str | None:
    """A description of an input on which `pattern` exceeds the budget, else None.

    Inputs grow step by step, so a runaway is caught within about twice the budget
    instead of running for hours: doubling input length at most doubles a linear
    pattern's time, while a backtracking one's time multiplies. The time is this
    thread's CPU time, not the clock's: a daemon reloading on a busy host may wait
    for a CPU in the middle of a probe, and that wait must not refuse a good rule.
    """
    for unit in _alphabets(regex):
        for size in PROBE_SIZES:
            for subject in (unit * size + "\x00", "\x00" + unit * size):
                t0 = time.thread_time()
                for _ in pattern.finditer(subject):
                    pass
                elapsed = time.thread_time() - t0
                if elapsed > PROBE_BUDGET_SECONDS:
                    return (
                        f"{elapsed * 1000:.0f} ms on {size} repetitions of {unit!r} "
                        f"(the bound is {PROBE_BUDGET_SECONDS * 1000:.0f} ms)"
                    )
    return None
