"""Secrets out of prompts: one engine, used by vibectl before a request leaves and by vibectld.

vibectl's prompts are kubectl output. `Redactor.redact(text)` replaces every secret it
finds with a labelled placeholder, ``[REDACTED:<kind>]``, and counts them by kind; the
values themselves are never returned, logged or counted. `Redactor.find(text)` only
counts (the server's ``refuse`` mode). The daemon imports this module (vibectl is the
lower layer), so a prompt reads the same after client- and server-side redaction.

The detectors are data: `DETECTORS` (vibectl.redaction_table) is one table of
`Detector(name, pattern, group, validator, ...)`. A row's pattern is run over the text
(or over its lower-cased copy, for keys written in any case); `group` says what is
replaced (the whole match or a named group); an optional validator rejects values that
are not secrets (``true``,
``<set to the key 'password' in secret 'db'>``, ``DATA+OMITTED``, a path, ...). Kubernetes
Secrets are one structural row: its scanner finds each object of ``kind: Secret`` (YAML,
indented JSON, or compact JSON such as a last-applied-configuration annotation) and
redacts the values under its ``data:`` and ``stringData:``, never a ConfigMap's.

Speed. A 10 kB prompt must cost at most 0.2 ms and a 200 kB one 4 ms (``make bench``,
section redaction), about 50 MB/s, which Python's regex engine reaches only when it can
skip ahead: every built-in pattern starts with a literal (``eyJ``, ``AKIA``, ``ghp_`` via
``gh``, ``://``, ``pass``, ``secret``, ``token``, ...), so each row is one fast scan for
its literal and the regex proper runs only where the literal occurs. Keys in any case
are matched in one ``str.lower()`` copy of the text (same length, so spans map back).
Overlapping finds (a JWT in a ``token:`` field) are merged and counted once, under the
earlier row of the table. What runs after a literal is written not to test a lookahead or
a tail at every character (possessive runs up to the next character where it could
hold), and the Secret scanner's searches start at a literal too and are cached per
object, so a dense prompt (a secret per 500 bytes) meets the same targets.

Libraries considered. Yelp's detect-secrets (1.5.0, the best kept of them) has the right
token formats but is a line-by-line scanner for source files: every line goes through
about 25 plugins, entropy scoring included. On the bench's typical 10 kB kubectl prompt
(4 secrets) it took 84 ms, 400 times the 0.2 ms target, and flagged 601 strings, nearly
all image digests, UIDs and ConfigMap base64 (its entropy plugins); it has no notion of a
Kubernetes Secret's data, so a short base64 password there is missed while every
ConfigMap value is suspect. trufflehog3 and whispers are file and repository scanners of
the same shape; llm-guard's secret scanner wraps detect-secrets inside a machine-learning
stack; presidio and scrubadub target personal data (names, e-mails) through NLP
pipelines. None is stdlib-only, which the client needs (proxy mode starts fast and
vibectl's dependencies stay few). google-re2 would make custom rules linear-time, but a
timing probe at load (`validate_custom`) bounds them without a compiled dependency.

Custom rules (the server's ``redaction.custom``) are (name, regex) pairs, checked at
load by vibectl.redaction_rules.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vibectl.redaction_table import DETECTORS, KINDS, PLACEHOLDER, Detector, Span

__all__ = ["DETECTORS", "KINDS", "PLACEHOLDER", "Detector", "Redactor", "Span", "summary"]


@dataclass(frozen=True)
class _Compiled:
    detector: Detector
    regex: re.Pattern[str]
    groups: tuple[int, ...]
    kinds: tuple[tuple[int, str], ...]
    enabled: frozenset[str] = field(default_factory=frozenset)


def _compile(detector: Detector, enabled: frozenset[str]) -> _Compiled:
    group = detector.group
    names: tuple[int | str, ...] = group if isinstance(group, tuple) else (group,)
    regex = re.compile(detector.pattern)
    index = regex.groupindex  # group numbers, not names, at match time (cheaper)
    groups = tuple(index[g] if isinstance(g, str) else g for g in names)
    kinds = tuple((index[g], k) for g, k in detector.kinds)
    return _Compiled(detector, regex, groups, kinds, enabled)


class Redactor:
    """Finds and replaces secrets; build one and reuse it (it holds compiled patterns).

    `detectors` is "all" or the kinds to look for (see `KINDS`); `custom` adds
    (name, regex) rules whose whole match is replaced (check them with
    `validate_custom` first: this constructor only compiles them).
    """

    def __init__(
        self,
        detectors: str | Iterable[str] = "all",
        custom: Iterable[tuple[str, str]] = (),
    ) -> None:
        if isinstance(detectors, str):
            if detectors != "all":
                raise ValueError(f"detectors must be 'all' or a list of kinds ({', '.join(KINDS)})")
            wanted = frozenset(KINDS)
        else:
            wanted = frozenset(detectors)
            unknown = sorted(wanted - set(KINDS))
            if unknown:
                raise ValueError(
                    f"unknown detector(s) {', '.join(unknown)}; known: {', '.join(KINDS)}"
                )
        rows = [d for d in DETECTORS if wanted & set(d.all_kinds)]
        rows += [Detector(name, regex) for name, regex in custom]
        self.kinds = tuple(
            dict.fromkeys([*(k for k in KINDS if k in wanted), *(n for n, _ in custom)])
        )
        enabled = frozenset(self.kinds)
        self._rows = [_compile(d, enabled) for d in rows]
        self._need_lower = any(r.detector.lower for r in self._rows)

    def spans(self, text: str) -> list[Span]:
        """The secrets in `text`: (start, end, kind), sorted, not overlapping."""
        lowered = _lower(text) if self._need_lower else text
        found: list[tuple[int, int, int, str]] = []  # start, priority, end, kind
        append = found.append
        for priority, row in enumerate(self._rows):
            d = row.detector
            name = d.name
            if d.scanner is not None:
                found += [(s, priority, e, name) for s, e in d.scanner(text, lowered, row.regex)]
                continue
            subject = lowered if d.lower else text
            validator = d.validator
            if row.groups == (0,) and not row.kinds:  # the whole match, one kind
                if name not in row.enabled:
                    continue
                for m in row.regex.finditer(subject):
                    s, e = m.span()
                    if e > s and (validator is None or validator(text[s:e])):
                        append((s, priority, e, name))
                continue
            groups, kinds, enabled = row.groups, row.kinds, row.enabled
            for m in row.regex.finditer(subject):
                for g in groups:
                    s, e = m.span(g)
                    if s >= 0:
                        break
                if e <= s or (validator is not None and not validator(text[s:e])):
                    continue
                kind = name
                for g, k in kinds:
                    if m.start(g) >= 0:
                        kind = k
                        break
                if kind in enabled:
                    append((s, priority, e, kind))
        return _merge(found)

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """`text` with each secret replaced by [REDACTED:<kind>], and the count per kind."""
        spans = self.spans(text)
        if not spans:
            return text, Counter()
        parts: list[str] = []
        pos = 0
        for start, end, kind in spans:
            parts += (text[pos:start], _placeholder(kind))
            pos = end
        parts.append(text[pos:])
        return "".join(parts), Counter(kind for _, _, kind in spans)

    def find(self, text: str) -> Counter[str]:
        """How many secrets of each kind `text` holds (nothing is replaced)."""
        return Counter(kind for _, _, kind in self.spans(text))

    def redact_all(self, fragments: Sequence[str]) -> tuple[list[str], Counter[str]]:
        """Each fragment redacted, and the counts over all of them."""
        total: Counter[str] = Counter()
        out = []
        for fragment in fragments:
            text, counts = self.redact(fragment)
            out.append(text)
            total += counts
        return out, total


_placeholders: dict[str, str] = {}


def _placeholder(kind: str) -> str:
    if kind not in _placeholders:
        _placeholders[kind] = PLACEHOLDER.format(kind=kind)
    return _placeholders[kind]


def _lower(text: str) -> str:
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    # A character whose lower case is longer (U+0130) would shift every later offset.
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _merge(found: list[tuple[int, int, int, str]]) -> list[Span]:
    """Overlapping finds become one span, named by the table's earliest row among them.

    `found` holds (start, priority, end, kind); finds of one row never share a start
    (and have one kind per start), so the plain tuple order is (start, priority)'s.
    """
    if not found:
        return []
    found.sort()
    merged: list[Span] = []
    rest = iter(found)
    start, priority, end, kind = next(rest)
    for s, p, e, k in rest:
        if s < end:
            if e > end:
                end = e
            if p < priority:
                priority, kind = p, k
            continue
        merged.append((start, end, kind))
        start, priority, end, kind = s, p, e, k
    merged.append((start, end, kind))
    return merged


def summary(counts: Counter[str]) -> str:
    """'3 secrets (jwt 1, k8s_secret 2)': how many, of which kinds; never a value."""
    total = sum(counts.values())
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
    return f"{total} secret{'' if total == 1 else 's'} ({kinds})"


_default: Redactor | None = None


def default_redactor() -> Redactor:
    """The shared Redactor with every built-in detector, compiled on first use."""
    global _default
    if _default is None:
        _default = Redactor()
    return _default
