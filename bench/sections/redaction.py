"""Redaction: what replacing secrets costs a prompt, on the client and on the server.

Both sides run the one engine (vibectl/redaction.py). The client path is ModelAdapter's
hook that every request goes through (both modes); the server path is the daemon's own
policy (vibectld/service/redaction.py, `RedactionPolicy.screen`, as the servicer calls
it) on the fragments of an ExecuteRequest as the daemon receives it (parsed from the
wire), in `redact` mode (replace) and in `refuse` mode (only count, then refuse).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bench import common as c
from bench.common import Context, Section
from bench.result import median, percentile
from bench.servers import REPO
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl.adapters.base import ModelAdapter, Prompt, Reply
from vibectl.redaction import Redactor
from vibectld.config import RedactionConfig
from vibectld.service.redaction import RedactionPolicy, SecretsRefused

CORPUS = REPO / "tests" / "redaction_corpus" / "docs"
SIZES = {"10 kB": (10_000, 0.2), "200 kB": (200_000, 4.0)}  # prompt size, p50 target in ms
TYPICAL_SECRET_EVERY = 10_000  # characters of secret-free output between secret-bearing ones
QUICK_SECONDS = 0.3
SECONDS = 2.0  # measured per path and size

INTRO = """\
The prompts are kubectl output from the redaction corpus (`tests/redaction_corpus/docs`:
pods, secrets, logs, kubeconfigs, ... in file order), cut to 10 kB and 200 kB, sent as one
user fragment with a short system prompt. *typical* (graded): the documents without
secrets, with one secret-bearing document (a Secret, a leaky pod spec, a kubeconfig, ...)
every 10 kB; *dense* (graded too): every document, about one secret per 500 bytes, the
worst case the corpus holds. *client*:
`ModelAdapter`'s hook that builds every outgoing request (redaction on, the shared
Redactor); *server redact* / *server refuse*: the daemon's `RedactionPolicy.screen` with
`redaction.mode: redact` / `refuse` (its default detectors, built as a reload builds it)
on the fragments of an `ExecuteRequest` parsed from its wire bytes. The three take turns, one
call each per round, for {seconds:g} s each on one core; the table shows the per-call p50
and p99."""


class _Outgoing(ModelAdapter):
    """An adapter whose only work is building the request: the client's redaction cost."""

    mode = "bench"

    def get_model(self, name: str | None) -> Any:
        return name

    async def _execute(self, model: Any, prompt: Prompt) -> Reply:
        raise NotImplementedError

    def _stream(self, model: Any, prompt: Prompt) -> AsyncIterator[str]:
        raise NotImplementedError

    def validate_model_key(self, name: str | None) -> str | None:
        return None

    async def validate_model_name(self, name: str) -> str | None:
        return None

    async def list_models(self) -> list[dict[str, Any]]:
        return []

    def outgoing(self, system: list[str], user: list[str]) -> Prompt:
        return self._outgoing(system, user, None)


def prompt_of(size: int, dense: bool, corpus: Path = CORPUS) -> str:
    """`size` characters of the corpus's documents, in file order.

    Dense: every document (about one seeded secret per 500 bytes, the corpus's purpose).
    Typical: the documents without secrets, and one with secrets every 10 kB.
    """
    truth = json.loads((corpus.parent / "ground_truth.json").read_text())
    with_secrets = {s["document"] for s in truth["secrets"]}
    parts: list[str] = []
    total = 0
    since_secret = TYPICAL_SECRET_EVERY
    while total < size:
        for path in sorted(corpus.glob("*.txt")):
            if not dense and path.name in with_secrets:
                if since_secret < TYPICAL_SECRET_EVERY:
                    continue
                since_secret = 0
            text = path.read_text()
            parts.append(text)
            total += len(text)
            since_secret += len(text)
            if total >= size:
                break
    return "".join(parts)[:size]


def timed(calls: dict[str, Callable[[], object]], seconds: float) -> dict[str, list[float]]:
    """Milliseconds per call of each, for `seconds` per call (at least 20 calls each).

    The calls take turns, one call each per round, so that the machine's drift (another
    process, the CPU's clock) weighs on each path alike and the rows compare.
    """
    out: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + seconds * len(calls)
    rounds = 0
    while time.perf_counter() < deadline or rounds < 20:
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            out[name].append((time.perf_counter() - t0) * 1000)
        rounds += 1
    return out


def run(ctx: Context) -> Section:
    seconds = QUICK_SECONDS if ctx.settings.quick else SECONDS
    section = Section("redaction", "Redaction", INTRO.format(seconds=seconds))
    adapter = _Outgoing()
    adapter.on_redacted = lambda counts: None
    redactor = Redactor()
    redact = RedactionPolicy.build(RedactionConfig(mode="redact"))
    refuse = RedactionPolicy.build(RedactionConfig(mode="refuse"))
    system = ["You are a Kubernetes expert. Answer briefly."]
    rows = []
    for (label, (size, target_ms)), dense in itertools.product(SIZES.items(), (False, True)):
        mix = "dense" if dense else "typical"
        text = prompt_of(size, dense)
        wire = pb.ExecuteRequest(
            system_fragments=system, user_fragments=[text], request_id="bench"
        ).SerializeToString()
        request = pb.ExecuteRequest.FromString(wire)

        def client(text: str = text) -> None:
            adapter.outgoing(system, [text])

        def server_redact(request: Any = request) -> None:
            redact.screen(request.system_fragments, request.user_fragments)

        def server_refuse(request: Any = request) -> None:
            with contextlib.suppress(SecretsRefused):
                refuse.screen(request.system_fragments, request.user_fragments)

        paths: dict[str, Callable[[], object]] = {
            "client": client,
            "server redact": server_redact,
            "server refuse": server_refuse,
        }
        found = sum(redactor.find(text).values())
        ctx.log(f"  {label} {mix}: {found} secrets in the prompt")
        for call in paths.values():
            call()  # compiled patterns and caches warm
        for path, ms in timed(paths, seconds).items():
            p50, p99 = median(ms), percentile(ms, 99)
            rows.append(
                [label, mix, path, str(found), f"{p50:.3f}", f"{p99:.3f}", f"{target_ms:g}"]
            )
            name = f"redaction {path}, {label} {mix} prompt"
            detail = (
                f"p50 {p50:.3f} ms, p99 {p99:.3f} ms over {len(ms)} calls "
                f"({found} secrets; target p50 <= {target_ms:g} ms)"
            )
            measure = f"{path}: {label} {'dense ' if dense else ''}prompt, p50"
            row = ("Redaction", measure, f"{p50:.3f} ms", f"<= {target_ms:g} ms")
            section.graded(name, p50 <= target_ms, detail, row)
    header = ["prompt", "mix", "path", "secrets", "p50 ms", "p99 ms", "target p50 ms"]
    section.tables.append(c.md_table(header, rows))
    return section
