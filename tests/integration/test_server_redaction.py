"""The server's redaction policy (redaction.* in vibectld.yaml(5)), end to end.

Every request here is sent by a plain gRPC client, as vibectl 0.11 or any other client
would send it: nothing was redacted before it left. The `echo` model returns the prompt
it received, so each test sees exactly what reached the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from tests.conftest import RunningDaemon, admin_cli
from tests.integration.conftest import write
from tests.integration.test_reload import base_config
from tests.unit.test_logs import parse_entry
from tests.unit.test_redaction import APPLIED_SECRET
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl.redaction import KINDS, Redactor
from vibectld.config import ConfigError
from vibectld.config_file import load_config
from vibectld.ops.journal import encode

PASSWORD_B64 = "c3VwZXItc2VjcmV0LXB3LTQyMQ=="
USERNAME_B64 = "YWRtaW4="
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
VALUES = (PASSWORD_B64, USERNAME_B64, JWT)
# What `kubectl get secret db -o yaml | vibectl ask --no-redact ...` would send.
SECRET_YAML = f"""\
apiVersion: v1
data:
  password: {PASSWORD_B64}
  username: {USERNAME_B64}
kind: Secret
metadata:
  name: db
  namespace: default
type: Opaque
"""
SYSTEM = f"The caller's own credentials, for context: Authorization: Bearer {JWT}"
FOUND = {"jwt": 1, "k8s_secret": 2}


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def request(*user: str, system: tuple[str, ...] = (SYSTEM,)) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(
        user_fragments=[*user], system_fragments=list(system), request_id="red-1"
    )


def ask(daemon: RunningDaemon, secret: str, req: pb.ExecuteRequest) -> dict[str, Any]:
    reply = daemon.stub().Execute(req, metadata=auth(secret), timeout=10)
    assert reply.WhichOneof("result") == "success", reply
    echoed: dict[str, Any] = json.loads(reply.success.response_text)
    return echoed


def streamed(daemon: RunningDaemon, secret: str, req: pb.ExecuteRequest) -> dict[str, Any]:
    chunks = list(daemon.stub().StreamExecute(req, metadata=auth(secret), timeout=10))
    text = "".join(c.text_chunk for c in chunks)
    assert chunks[-1].WhichOneof("chunk_type") == "final_metrics", chunks
    echoed: dict[str, Any] = json.loads(text)
    return echoed


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


@contextmanager
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as records:
        yield records


def request_record(records: list[MutableMapping[str, Any]]) -> MutableMapping[str, Any]:
    """The call's `request` record, written just after the reply; waits for it."""
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in records if r.get("event") == "request"]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, records
        time.sleep(0.01)


def redactions_metric(daemon: RunningDaemon, kind: str, action: str) -> float:
    value = daemon.runtime.metrics.registry.get_sample_value(
        "vibectld_redactions_total", {"kind": kind, "action": action}
    )
    return value or 0.0


def usage_row(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    rows = daemon.admin("usage", {"name": name})["usage"]
    assert len(rows) == 1, rows
    row: dict[str, Any] = rows[0]
    return row


def assert_no_values(text: str) -> None:
    for value in VALUES:
        assert value not in text


# -- redact (the default) ------------------------------------------------------------------


def test_a_plain_grpc_client_s_secrets_arrive_redacted(daemon: RunningDaemon) -> None:
    assert daemon.runtime.generation.redaction.mode == "redact"
    secret = daemon.issue("alice")
    prompt = f"why can't my pod read this?\n{SECRET_YAML}"
    with logs() as records:
        echoed = ask(daemon, secret, request(prompt))
        record = request_record(records)
    assert_no_values(json.dumps(echoed))
    assert echoed["prompt"].count("[REDACTED:k8s_secret]") == 2
    assert "name: db" in echoed["prompt"] and "why can't my pod" in echoed["prompt"]
    assert echoed["system"] == "The caller's own credentials, for context: " + (
        "Authorization: Bearer [REDACTED:jwt]"
    )
    # The journal entry: REDACTIONS=3 KINDS=jwt,k8s_secret, and never the prompt.
    assert (record["redactions"], record["kinds"], record["status"]) == (3, "jwt,k8s_secret", "ok")
    entry = parse_entry(encode(dict(record)))
    assert (entry["REDACTIONS"], entry["KINDS"], entry["CLIENT"]) == (
        "3",
        "jwt,k8s_secret",
        "alice",
    )
    everything = repr(records)
    assert_no_values(everything)
    assert "why can't my pod" not in everything
    # Usage per client and kind; the metric by kind.
    row = usage_row(daemon, "alice")
    assert (row["requests"], row["redactions"], row["redaction_kinds"]) == (1, 3, FOUND)
    assert redactions_metric(daemon, "k8s_secret", "redacted") == 2
    assert redactions_metric(daemon, "jwt", "redacted") == 1


def test_streamed_calls_are_redacted_too(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    echoed = streamed(daemon, secret, request(SECRET_YAML))
    assert_no_values(json.dumps(echoed))
    assert echoed["prompt"].count("[REDACTED:k8s_secret]") == 2


def test_a_prompt_of_only_secrets_is_sent_as_placeholders(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    echoed = ask(daemon, secret, request(JWT, system=()))
    assert echoed["prompt"] == "[REDACTED:jwt]"


def test_what_the_client_redacted_is_not_counted_again(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    echoed = ask(daemon, secret, request("token: [REDACTED:jwt]\nhello", system=()))
    assert echoed["prompt"] == "token: [REDACTED:jwt]\nhello"
    time.sleep(0.1)  # the call is counted on the loop's next turn
    assert usage_row(daemon, "alice")["redactions"] == 0


def test_the_response_schema_is_left_as_sent(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    req = request("hello", system=())
    schema = {"type": "object", "properties": {"password": {"const": "hunter2-hunter2"}}}
    req.response_model_schema = json.dumps(schema)
    # echo cannot follow a schema (an in-band error), but the call is screened and counted.
    daemon.stub().Execute(req, metadata=auth(secret), timeout=10)
    time.sleep(0.1)
    assert usage_row(daemon, "alice")["redactions"] == 0


def test_custom_rules_and_a_chosen_set_of_detectors(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(
        redaction={
            "detectors": ["k8s_secret"],
            "custom": [{"name": "ticket-id", "regex": "TKT-[0-9]{6}"}],
        }
    )
    secret = daemon.issue("alice")
    echoed = ask(daemon, secret, request(f"see TKT-123456 and TKT-654321\n{SECRET_YAML}"))
    assert echoed["prompt"].startswith("see [REDACTED:ticket-id] and [REDACTED:ticket-id]\n")
    assert PASSWORD_B64 not in echoed["prompt"]
    assert JWT in echoed["system"]  # the jwt detector is not among the chosen
    row = usage_row(daemon, "alice")
    assert row["redaction_kinds"] == {"k8s_secret": 2, "ticket-id": 2}
    assert redactions_metric(daemon, "ticket-id", "redacted") == 2


# -- refuse and off ------------------------------------------------------------------------


def test_refuse_names_the_kinds_and_costs_nothing(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(redaction={"mode": "refuse"})
    secret = daemon.issue("alice", tokens_per_day=1000)
    for call in (
        lambda: daemon.stub().Execute(request(SECRET_YAML), metadata=auth(secret), timeout=10),
        lambda: list(
            daemon.stub().StreamExecute(request(SECRET_YAML), metadata=auth(secret), timeout=10)
        ),
    ):
        with logs() as records:
            err = refused(call)
            record = request_record(records)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        message = err.details()
        assert "3 secrets (jwt 1, k8s_secret 2)" in message and "redaction.mode: refuse" in message
        assert_no_values(message)
        assert (record["status"], record["redactions"], record["kinds"]) == (
            "secrets_refused",
            3,
            "jwt,k8s_secret",
        )
        assert_no_values(repr(records))
    # No model ran and no budget moved: the refused calls are not requests.
    rt = daemon.runtime
    assert rt.registry.tokens_used(daemon.runtime.registry.find("alice").id, int(time.time())) == 0
    assert (
        rt.metrics.registry.get_sample_value(
            "vibectld_requests_total", {"client": "alice", "model": "echo", "outcome": "ok"}
        )
        is None
    )
    row = usage_row(daemon, "alice")
    assert (row["requests"], row["input_tokens"], row["redactions"]) == (0, 0, 6)
    assert row["redaction_kinds"] == {"jwt": 2, "k8s_secret": 4}
    assert redactions_metric(daemon, "k8s_secret", "refused") == 4
    # A clean prompt is served as sent.
    assert ask(daemon, secret, request("hello", system=()))["prompt"] == "hello"


def test_what_vibectl_redacted_passes_a_refusing_server_and_counts_nothing(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    """`kubectl get secret -o yaml` of an applied Secret (its data again in the
    last-applied annotation's JSON, a stringData file as a block), as vibectl sends it."""
    daemon = start_daemon(redaction={"mode": "refuse"})
    secret = daemon.issue("alice")
    sent, counts = Redactor().redact(APPLIED_SECRET)  # vibectl's own hook: ModelAdapter
    assert counts.total() == 4
    assert ask(daemon, secret, request(sent, system=()))["prompt"] == sent
    time.sleep(0.1)  # the call is counted on the loop's next turn
    assert usage_row(daemon, "alice")["redactions"] == 0
    err = refused(lambda: ask(daemon, secret, request(APPLIED_SECRET, system=())))
    assert "4 secrets (k8s_secret 4)" in err.details()


def test_refuse_comes_before_the_model_is_authorized_and_the_budgets_are_read(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    """DESIGN.md's order: validate → redaction policy → authorize the model → budgets.
    A prompt with secrets is refused as such even where the model or a spent budget
    would refuse it too, so the refusal says what to fix first and never moves a budget."""
    daemon = start_daemon(
        redaction={"mode": "refuse"},
        models={"prices": {"faults": {"input": 1000, "output": 1000}}},
    )
    only_faults = daemon.issue("restricted", models=["faults"])
    spent = daemon.issue("spent", usd_per_month=0.01)

    def code(secret: str, model: str, *user: str) -> tuple[grpc.StatusCode, str]:
        req = pb.ExecuteRequest(user_fragments=list(user), model_name=model)
        try:
            daemon.stub().Execute(req, metadata=auth(secret), timeout=10)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""

    # faults: 10 words in + 3 out at $1000 per million tokens = $0.013, over $0.01.
    assert code(spent, "faults", "a b c d e f g h i j")[0] == grpc.StatusCode.OK
    for secret, model in ((only_faults, "echo"), (spent, "faults")):
        status, details = code(secret, model, SECRET_YAML)
        assert status == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "2 secrets (k8s_secret 2)" in details
    # Without secrets, the model's and the budget's own refusals.
    assert code(only_faults, "echo", "hello")[0] == grpc.StatusCode.PERMISSION_DENIED
    assert code(spent, "faults", "hello")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_off_passes_prompts_as_sent(start_daemon: Callable[..., RunningDaemon]) -> None:
    daemon = start_daemon(redaction={"mode": "off"})
    assert daemon.runtime.generation.redaction.redactor is None
    secret = daemon.issue("alice")
    with logs() as records:
        echoed = ask(daemon, secret, request(SECRET_YAML))
        record = request_record(records)
    assert PASSWORD_B64 in echoed["prompt"] and JWT in echoed["system"]
    assert "redactions" not in record
    assert usage_row(daemon, "alice")["redactions"] == 0


# -- usage as vibectl-admin shows it -------------------------------------------------------


def test_vibectl_admin_usage_shows_redactions_per_client(daemon: RunningDaemon) -> None:
    alice, bob = daemon.issue("alice"), daemon.issue("bob")
    ask(daemon, alice, request(SECRET_YAML))
    ask(daemon, bob, request("hello", system=()))
    time.sleep(0.1)
    out = admin_cli(daemon, "--json", "usage")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert (rows["alice"]["redactions"], rows["alice"]["redaction_kinds"]) == (3, FOUND)
    assert (rows["bob"]["redactions"], rows["bob"]["redaction_kinds"]) == (0, {})
    out = admin_cli(daemon, "usage")
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert header.split()[-1] == "REDACTIONS"
    by_name = {line.split()[0]: line.split()[-1] for line in lines}
    assert by_name == {"alice": "3", "bob": "0"}


# -- bad custom rules: refused at load and at reload, the key named --------------------------

BAD_RULES = [
    (".*", "matches the empty string"),
    ("(a+)+$", "catastrophically slow"),
    ("TKT-(", "not a valid regex"),
    # re.compile raises OverflowError and RecursionError too, not only re.error.
    ("a{1,4294967295}", "not a valid regex: the repetition number is too large"),
    ("(" * 1000 + "a" + ")" * 1000, "not a valid regex: nested too deeply"),
    ("[^\\n]+", "of ordinary kubectl output"),
]


@pytest.mark.parametrize(("regex", "problem"), BAD_RULES)
def test_a_bad_custom_rule_is_refused_at_load_with_its_key(
    tmp_path: Path, regex: str, problem: str
) -> None:
    path = tmp_path / "config.yaml"
    good = {"name": "ticket-id", "regex": "TKT-[0-9]{6}"}
    write(path, {"redaction": {"custom": [good, {"name": "bad", "regex": regex}]}})
    with pytest.raises(ConfigError, match=problem) as caught:
        load_config(path)
    assert str(caught.value).startswith("redaction.custom[1].regex: custom rule 'bad': ")


def test_bad_detector_names_and_modes_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    for section, key in (
        ({"detectors": ["jwt", "passwords"]}, "redaction.detectors[1]: unknown detector"),
        ({"mode": "strict"}, "redaction.mode: must be one of redact, refuse, off"),
        ({"custom": [{"name": "jwt", "regex": "x{9}"}]}, "redaction.custom[0].name: "),
        ({"custom": [{"name": "a", "regex": "x{9}", "flags": "i"}]}, "redaction.custom[0].flags"),
    ):
        write(path, {"redaction": section})
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_config(path)


def test_a_bad_custom_rule_is_refused_at_reload_and_the_old_policy_keeps_serving(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    raw = base_config(
        tmp_path, sock_dir, redaction={"custom": [{"name": "ticket-id", "regex": "TKT-[0-9]{6}"}]}
    )
    daemon, path = from_file(raw)
    secret = daemon.issue("alice")
    before = daemon.runtime.generation
    raw["redaction"] = {"mode": "off", "custom": [{"name": "slow", "regex": "(a+)+$"}]}
    write(path, raw)
    out = admin_cli(daemon, "reload", "--wait")
    assert out.returncode == 1
    assert "redaction.custom[0].regex: custom rule 'slow'" in out.stderr
    assert "catastrophically slow" in out.stderr
    assert daemon.runtime.generation is before
    assert ask(daemon, secret, request("TKT-123456", system=()))["prompt"] == "[REDACTED:ticket-id]"
    # A good change is applied by the next reload, with its redactor built once.
    raw["redaction"] = {"mode": "refuse"}
    write(path, raw)
    assert admin_cli(daemon, "reload", "--wait").returncode == 0
    after = daemon.runtime.generation
    assert after.redaction.mode == "refuse" and after.redaction.redactor is not None
    err = refused(lambda: ask(daemon, secret, request(SECRET_YAML)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_man_page_names_every_detector() -> None:
    from tests.docs.test_config_keys import documented

    body = documented()["redaction.detectors"]
    assert [k for k in KINDS if k not in body] == []
