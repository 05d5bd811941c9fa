"""Secrets out of prompts: one engine, used by vibectl before a request leaves and by vibectld.

vibectl's prompts are kubectl output. `Redactor.redact(text)` replaces every secret it
finds with a labelled placeholder, ``[REDACTED:<kind>]``, and counts them by kind; the
values themselves are never returned, logged or counted. `Redactor.find(text)` only
counts (the server's ``refuse`` mode). The daemon imports this module (vibectl is the
lower layer), so a prompt reads the same after client- and server-side redaction.

The detectors are data: `DETECTORS` is one table of `Detector(name, pattern, group,
validator, ...)`. A row's pattern is run over the text (or over its lower-cased copy,
for keys written in any case); `group` says what is replaced (the whole match or a
named group); an optional validator rejects values that are not secrets (``true``,
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

import bisect
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

Span = tuple[int, int, str]  # start, end, kind
Scanner = Callable[[str, str, "re.Pattern[str]"], Iterator[tuple[int, int]]]

PLACEHOLDER = "[REDACTED:{kind}]"
_KIND_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_PLACEHOLDER = re.compile(r"\[REDACTED:[a-z0-9][a-z0-9_-]{0,39}\]")

# Values that sit where a secret would but are not one: booleans, empty markers, kubectl's
# own placeholders and references (`<set to the key ...>`, `16 bytes`), templates, small
# numbers, our own placeholder.
_NOT_A_SECRET = re.compile(
    r"""(?ix)
    | true | false | yes | no | on | off | null | none | nil | ~ | \*+ | -+
    | redacted | data\+omitted | <[^>]*> .* | \$\{[^}]*\} | \$\([^)]*\) | \{\{.*\}\}
    | \[REDACTED:[\w-]+\] | [|>][-+]? | \d{1,5} | \d+\ bytes | \{\} | \[\]
    """
)


# The characters a non-secret above can start with (any case); no other ASCII character
# can start one, so a value starting with one of those is real without running the regex.
_NOT_A_SECRET_FIRST = frozenset("tfynordTFYNORD~*-<${[|>0123456789")


def real_value(value: str) -> bool:
    """False for a value that is a placeholder, a reference or a boolean, not a secret."""
    value = value.strip().strip("\"'")
    if value and value[0].isascii() and value[0] not in _NOT_A_SECRET_FIRST:
        return True
    return _NOT_A_SECRET.fullmatch(value) is None


def _has_digit(value: str) -> bool:
    return any(map(str.isdigit, value))


@dataclass(frozen=True)
class Detector:
    """One row of the table: what a kind of secret looks like and what of it is replaced.

    `pattern` is searched in the text, or, with `lower`, in its lower-cased copy (write
    it in lower case then). `group` names what to replace: 0 the whole match, a group
    name, or several names of which the first that took part counts. `kinds` maps a
    group name to another kind when that group took part (one scan, two kinds).
    `scanner`, for structural detectors, yields the spans itself from the matches.
    """

    name: str
    pattern: str
    group: int | str | tuple[str, ...] = 0
    validator: Callable[[str], bool] | None = None
    lower: bool = False
    kinds: tuple[tuple[str, str], ...] = ()
    scanner: Scanner | None = None

    @property
    def all_kinds(self) -> tuple[str, ...]:
        return (self.name, *(k for _, k in self.kinds))


# A secret-looking key's end, then the separator: `key: v`, `key=v`, `"key": "v"`,
# `\"key\":\"v\"` (JSON inside a JSON string), and a container's environment variable,
# `- name: DB_PASSWORD` + `value: v` on the next line (YAML, JSON or describe output).
_SEP = r"""(?:\\?["'])?[ \t]*(?:[:=]|,?[ \t]*\r?\n\s*(?:\\?["'])?value(?:\\?["'])?[ \t]*:)[ \t]*"""
# The value: quoted (to the closing quote), or unquoted to the end of the line but not
# past a following `key=` / `key:` on the same line (log lines), a quote or an `&`.
# The unquoted value is the shortest run the lookahead accepts; the lookahead can only
# hold before a blank, `,`, `;`, a quote, `&`, a backslash or the line's end, so a run
# of other characters is taken whole (possessive) instead of testing it at each one.
_VALUE = (
    r"""(?:\\?"(?P<dq>[^"\\\n]*(?:\\[^"\n][^"\\\n]*)*)\\?"|'(?P<sq>[^'\n]+)'"""
    r"""|(?P<raw>[^\s"'&{\[<](?:[^ \t\r\n,;"'&\\]++|[^\n"'&])*?)"""
    r"""(?=[ \t\r]*(?:[,;]?[ \t\r]*$|[ \t]+[\w.-]+[:=]|["'&]|\\[nr])))"""
)
_FIELD_GROUPS = ("dq", "sq", "raw")


def _field(name: str, key: str, kinds: tuple[tuple[str, str], ...] = ()) -> Detector:
    """A `key: value` detector; `key` is the lower-case end of the key name."""
    pattern = f"(?m)(?:{key}){_SEP}{_VALUE}"
    return Detector(name, pattern, _FIELD_GROUPS, real_value, lower=True, kinds=kinds)


def _not_placeholder(value: str) -> bool:
    return real_value(value) and len(value) >= 16


# ---- Kubernetes Secrets: the values under data/stringData of an object of kind Secret ----

# A `data:` / `stringData:` key ending its line (YAML, or indented JSON opening its object),
# found from the literal (fast) in the lower-cased text, then what precedes it on the line
# (the lookbehind only drops early what that cannot be: `metadata:`, `userdata:`, ...).
_DATA_KEY_END = re.compile(r"""(?m)data(?<![^ \t"g\n]data)"?[ \t]*:[ \t]*(?:\{[ \t]*)?\r?$""")
_DATA_KEY_START = re.compile(r"""(?P<indent>[ \t]*(?:- )*)"?(?:string)?""")
# (Only its end is used: it starts at the quote, a literal sre skips ahead to, and the
# backslash of an escaped quote before it needs no matching.)
_COMPACT_DATA = re.compile(r""""(?:data|stringData)\\?"[ \t]*:[ \t]*\{""")
_COMPACT_PAIR = re.compile(
    r"""[ \t]*,?[ \t]*\\?"[^"\\]*(?:\\[^"][^"\\]*)*\\?"[ \t]*:[ \t]*"""
    r"""\\?"(?P<v>[^"\\]*(?:\\[^"][^"\\]*)*)\\?\""""
)
_CHILD_VALUE = re.compile(
    r"""[ \t]*(?:"[^"\\\n]*(?:\\.[^"\\\n]*)*"|'[^'\n]*'|[^\s:"'#][^:\n]*?)[ \t]*:[ \t]*"""
    r"""(?:(?P<v>[^\s|>][^\n]*)|[|>][-+]?\d?[ \t]*\r?$)?"""
)
_boundaries: dict[int, re.Pattern[str]] = {}


def _boundary(col: int) -> re.Pattern[str]:
    """A line that ends the object whose keys are at column `col`, seen between two of them.

    Deeper lines are the object's own; a line less indented, or the start of the next
    list item, ends it. At column 0 the object ends at `---`, at a line of prose, or at
    a second `apiVersion:` or `kind:` (the next object of a concatenated output).
    """
    if col not in _boundaries:
        # From the newline before the line (a literal: sre skips ahead to it).
        if col == 0:
            rule = r"""\n(?:---|(?:apiVersion|kind)[ \t]*:|(?![\w"./-]+[ \t]*:)[^\s{}\[\]])"""
        else:
            rule = rf"""\n(?:(?![ \t]{{{col}}})[ \t]*[^\s]|[ \t]{{{max(col - 2, 0)}}}- )"""
        _boundaries[col] = re.compile(rule)
    return _boundaries[col]


def _secret_spans(text: str, lowered: str, anchor: re.Pattern[str]) -> Iterator[tuple[int, int]]:
    """The values under data/stringData of every object of kind Secret."""
    kinds: dict[int, list[int]] = {}  # column of the `kind` key -> where its lines start
    for m in anchor.finditer(lowered):
        start = text.rfind("\n", 0, m.start()) + 1
        end = text.find("\n", m.start())
        end = len(text) if end < 0 else end
        before = text[start : m.start()]
        if before.strip(" \t-\"'{\\,"):
            yield from _compact(text, start, end)  # `kind` is not its line's first key
        else:
            col = len(before) - len(before.lstrip(" \t-"))
            kinds.setdefault(col, []).append(start)
    if not kinds:
        return
    ends: dict[tuple[int, int], int] = {}
    for d in _DATA_KEY_END.finditer(lowered):
        start = lowered.rfind("\n", 0, d.start()) + 1
        key = _DATA_KEY_START.fullmatch(lowered, start, d.start())
        if key is None:
            continue  # e.g. metadata:
        col = len(key.group("indent"))
        lines = kinds.get(col)
        if lines is None:
            continue
        i = bisect.bisect_left(lines, start)  # the nearest `kind` lines before and after
        if any(_same_object(text, start, k, col, ends) for k in lines[max(i - 1, 0) : i + 1]):
            yield from _children(text, d.end(), col)


def _same_object(text: str, a: int, b: int, col: int, ends: dict[tuple[int, int], int]) -> bool:
    """Whether the key lines starting at `a` and `b` (column `col`) are in one object.

    `ends` caches, per (column, line), where the first line that ends its object starts.
    """
    first, second = min(a, b), max(a, b)
    after_first = text.find("\n", first) + 1
    if after_first <= 0 or after_first > second:
        return after_first > second or first == second
    end = ends.get((col, first))
    if end is None:
        m = _boundary(col).search(text, after_first - 1)
        end = len(text) if m is None else m.start() + 1
        ends[col, first] = end
    return end >= second


def _compact(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Values of every data object on a one-line JSON (both of its quotings)."""
    for d in _COMPACT_DATA.finditer(text, start, end):
        pos = d.end()
        while (pair := _COMPACT_PAIR.match(text, pos, end)) is not None:
            vs, ve = pair.span("v")
            if ve > vs and real_value(text[vs:ve]):  # (as for the YAML form's values)
                yield vs, ve
            pos = pair.end()


def _children(text: str, pos: int, col: int) -> Iterator[tuple[int, int]]:
    """The values of the lines indented deeper than `col` that follow `pos`."""
    child_col = -1
    e = text.find("\n", pos)
    while 0 <= e < len(text):
        s = e + 1
        e = text.find("\n", s)
        e = len(text) if e < 0 else e
        line = text[s:e]
        stripped = line.strip()
        if not stripped:
            continue
        c = len(line) - len(line.lstrip(" \t"))
        if c <= col:
            return
        if child_col < 0:
            child_col = c
        if stripped.startswith("[REDACTED:") and _PLACEHOLDER.fullmatch(stripped):
            # Redacted already (by vibectl, before the server screens the prompt again):
            # found a second time it would be counted twice, or refused as a secret.
            continue
        m = _CHILD_VALUE.match(text, s, e) if c == child_col else None
        if m is None:  # a deeper line: part of a multi-line value (`key: |`)
            if stripped not in ("}", "},"):
                yield s + c, s + c + len(line.rstrip()) - c
        elif m.group("v") is not None:
            vs, ve = m.span("v")
            value = text[vs:ve].rstrip(" \t\r")
            ve = vs + len(value.removesuffix(",").rstrip(" \t"))
            if text[vs] in "\"'" and ve - vs >= 2:
                vs, ve = vs + 1, ve - 1
            if ve > vs and real_value(text[vs:ve]):
                yield vs, ve


# ---- The table ----
# Order matters only for the label: where finds overlap, the earlier row names the kind.

DETECTORS: tuple[Detector, ...] = (
    Detector(
        "private_key",
        r"(?s)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
        # (to the first END: runs without a `-` taken whole, where `.*?` tries each char)
        r"(?:(?:[^-]++|-)*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[^\n]*(?:\n[^\n]+)*)",
    ),
    Detector("jwt", r"eyJ(?<![\w-]eyJ)[\w-]{8,}\.[\w-]{8,}\.[\w-]*"),
    # (one scan for both prefixes: sre skips ahead to their common first letter)
    Detector("aws_access_key_id", r"A[KS]IA(?<![A-Z0-9]A[KS]IA)[A-Z0-9]{16}(?![A-Z0-9])"),
    Detector(
        "github_token",
        r"gh[pousr]_(?<![\w]gh[pousr]_)[A-Za-z0-9]{36,255}|github_pat_(?<!\wgithub_pat_)\w{22,255}",
    ),
    Detector("gitlab_token", r"glpat-(?<![\w-]glpat-)[\w-]{20,}"),
    Detector("slack_token", r"xox[abposre]-(?<![\w-]xox[abposre]-)[A-Za-z0-9-]{10,}"),
    Detector(
        "openai_key",
        r"sk-(?<![\w-]sk-)(?:(?P<ant>ant-(?:api|admin)\d\d-)|(?:proj-|svcacct-|admin-)?)"
        r"[\w-]{20,}",
        validator=_has_digit,
        kinds=(("ant", "anthropic_key"),),
    ),
    Detector("google_api_key", r"AIza(?<![\w-]AIza)[\w-]{35}(?![\w-])"),
    Detector(
        "url_password",
        r"://(?:hooks\.slack\.com/(?P<hook>(?:services|workflows|triggers)/[\w/-]+)"
        r"|[^\s:/@\"'<>]*:(?P<pw>[^\s@/\"'<>]+)@)",
        group=("hook", "pw"),
        validator=real_value,
        kinds=(("hook", "slack_token"),),
    ),
    Detector(
        "auth_header",
        r"bearer[ \t]+(?P<v>[a-z0-9._~+/-]{8,}=*)",
        group="v",
        validator=_has_digit,
        lower=True,
    ),
    Detector(
        "kubeconfig",
        r"""client-(?:key|certificate)-data["']?[ \t]*:[ \t]*["']?(?P<v>[A-Za-z0-9+/=]+)""",
        group="v",
        validator=_not_placeholder,
    ),
    Detector(
        "k8s_secret",
        r"""kind(?:\\?["'])?[ \t]*:[ \t]*(?:\\?["'])?secret(?![\w-])""",
        lower=True,
        scanner=_secret_spans,
    ),
    _field("password", r"passw(?:or)?d|passphrase"),
    _field(
        "secret",
        r"secret(?:(?P<aws>[_-]?access[_-]?key)|[_-]?key)?",
        kinds=(("aws", "aws_secret_key"),),
    ),
    _field("token", r"token"),
    _field("api_key", r"api[_-]?key"),
)

KINDS: tuple[str, ...] = tuple(dict.fromkeys(k for d in DETECTORS for k in d.all_kinds))


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
