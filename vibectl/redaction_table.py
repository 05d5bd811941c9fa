"""The detectors, as data: what each kind of secret looks like, and the Kubernetes Secret scanner.

`DETECTORS` is the one table vibectl.redaction's engine runs (see its docstring for
how, and for the speed each pattern is written for): a row per kind, or per family of
kinds found in one scan. A new detector is a new row here. `real_value` is the rule
every `key: value` row shares for values that sit where a secret would but are not one.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Span = tuple[int, int, str]  # start, end, kind
Scanner = Callable[[str, str, "re.Pattern[str]"], Iterator[tuple[int, int]]]

PLACEHOLDER = "[REDACTED:{kind}]"
KIND_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
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
