"""Precision and recall of the redaction engine on the committed corpus of kubectl output.

Recall: every character of every seeded secret (tests/redaction_corpus/ground_truth.json)
is inside a redacted span. Precision: every redacted span lies inside a seeded secret,
so nothing else (digests, UIDs, resourceVersions, pod-template hashes, CA certificates,
a ConfigMap's base64) is touched, and documents without a seeded secret come through
byte for byte. Both are required to be exactly 1.0.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.redaction_corpus import generate
from vibectl.redaction import PLACEHOLDER, Redactor

CORPUS = Path(__file__).resolve().parents[1] / "redaction_corpus"
DOCS = CORPUS / "docs"


@cache
def truth() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CORPUS / "ground_truth.json").read_text())
    return loaded


def seeded(doc: str) -> list[tuple[str, list[str]]]:
    out = []
    for s in truth()["secrets"]:
        if s["document"] == doc:
            value = s["value"]
            out.append((s["kind"], value if isinstance(value, list) else [value]))
    return out


def regions(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Every occurrence of every piece in `text`."""
    found = []
    for piece in pieces:
        start = text.find(piece)
        assert start >= 0, piece
        while start >= 0:
            found.append((start, start + len(piece)))
            start = text.find(piece, start + 1)
    return found


def covered(span: tuple[int, int], by: list[tuple[int, int]], text: str) -> bool:
    """Whether each non-blank character of `span` lies inside one of `by`."""
    return all(text[i].isspace() or any(s <= i < e for s, e in by) for i in range(span[0], span[1]))


def measure() -> tuple[Counter[str], Counter[str], list[str], list[str]]:
    """Per kind: seeded and found; the misses and the false positives, described."""
    redactor = Redactor()
    seeded_by_kind: Counter[str] = Counter()
    found_by_kind: Counter[str] = Counter()
    misses: list[str] = []
    false_positives: list[str] = []
    for path in sorted(DOCS.glob("*.txt")):
        text = path.read_text()
        spans = redactor.spans(text)
        hit = [(s, e) for s, e, _ in spans]
        secret_regions: list[tuple[int, int]] = []
        for kind, pieces in seeded(path.name):
            seeded_by_kind[kind] += 1
            where = regions(text, pieces)
            secret_regions += where
            if all(covered(r, hit, text) for r in where):
                found_by_kind[kind] += 1
            else:
                misses.append(f"{path.name}: {kind} {pieces[0][:24]}...")
        for s, e, kind in spans:
            if not covered((s, e), secret_regions, text):
                false_positives.append(f"{path.name}: {kind} redacted {text[s:e][:60]!r}")
        redacted, _ = redactor.redact(text)
        for value in truth()["keep"][path.name]:
            if redacted.count(value) != text.count(value):
                false_positives.append(f"{path.name}: a non-secret was altered: {value[:60]!r}")
    return seeded_by_kind, found_by_kind, misses, false_positives


def test_the_corpus_is_large_enough() -> None:
    docs = list(DOCS.glob("*.txt"))
    assert len(docs) >= 200
    kinds = Counter(s["kind"] for s in truth()["secrets"])
    assert min(kinds.values()) >= 100, kinds
    for kind in ("pod", "deployment", "service", "configmap", "secret", "node", "events"):
        assert any(kind in d.name for d in docs), kind
    for kind in ("describe-pod", "describe-secret", "logs", "kubeconfig", "-json", "-yaml"):
        assert any(kind in d.name for d in docs), kind
    clean = [d for d in docs if not seeded(d.name)]
    assert len(clean) >= 50


def test_recall_and_precision_are_total() -> None:
    seeded_by_kind, found_by_kind, misses, false_positives = measure()
    assert not misses, "\n".join(misses[:20])
    assert not false_positives, "\n".join(false_positives[:20])
    assert found_by_kind == seeded_by_kind


def test_documents_without_secrets_are_unchanged() -> None:
    redactor = Redactor()
    for path in sorted(DOCS.glob("*.txt")):
        if not seeded(path.name):
            text = path.read_text()
            assert redactor.redact(text) == (text, Counter()), path.name


def test_no_seeded_value_survives_redaction() -> None:
    redactor = Redactor()
    for path in sorted(DOCS.glob("*.txt")):
        redacted, counts = redactor.redact(path.read_text())
        for kind, pieces in seeded(path.name):
            for piece in pieces:
                assert piece.strip() not in redacted, (path.name, kind)
        assert sum(counts.values()) == redacted.count(PLACEHOLDER.split("{")[0])


@pytest.mark.timeout(120)
def test_the_committed_corpus_is_what_the_generator_writes(tmp_path: Path) -> None:
    generate.write(tmp_path)
    assert (tmp_path / "ground_truth.json").read_text() == (
        CORPUS / "ground_truth.json"
    ).read_text()
    written = sorted(p.name for p in (tmp_path / "docs").glob("*.txt"))
    assert written == sorted(p.name for p in DOCS.glob("*.txt"))
    for name in written:
        assert (tmp_path / "docs" / name).read_text() == (DOCS / name).read_text(), name
