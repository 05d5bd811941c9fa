"""Issue 13's guardrails with `server.workers: 2` (the default, auto, on a 2-core host).

tests/integration/test_server_redaction.py and test_budgets.py prove redaction and
dollar budgets on one process. Here a real vibectld runs two serving processes on one
port (tests/reliability/_procs.py), and every call opens its own connection, so the
kernel spreads the calls over both workers. Redaction runs in the worker that serves a
call and its counts travel to the main process; a dollar budget is decided by the main
process at admission (vibectld/workers/admission.py). Both must read the same as on one
process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.integration.test_server_redaction import SECRET_YAML, VALUES
from tests.integration.test_workers import ca_of, wait_until, workers
from tests.reliability._procs import DaemonProcess, auth
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.store import spend

pytestmark = pytest.mark.timeout(300)

# faults reports input = the prompt's words and output = 3 tokens: at $1000 per million
# tokens each way, "a b c d e" is 8 tokens, $0.008.
PRICES = {"faults": {"input": 1000, "output": 1000}}
CALL_USD = 0.008


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("workers-guardrails")
    with DaemonProcess(
        root, fake_models=True, server={"workers": 2}, models={"prices": PRICES}
    ) as d:
        d.start()
        assert len(workers(d)) == 2
        yield d


def connection(d: DaemonProcess) -> grpc.Channel:
    """A connection of its own (a local subchannel pool), so calls land on either worker."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_of(d))
    options = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(f"localhost:{d.port}", creds, options=options)


def execute(
    d: DaemonProcess, secret: str, prompt: str, model: str
) -> tuple[str, dict[str, str], pb.ExecuteResponse | None]:
    """One call: its status name, its trailers, and the reply when it was served."""
    with connection(d) as channel:
        request = pb.ExecuteRequest(user_fragments=[prompt], model_name=model)
        try:
            reply, call = pb_grpc.VibectlLLMProxyStub(channel).Execute.with_call(
                request, metadata=auth(secret), timeout=30
            )
        except grpc.RpcError as e:
            return e.code().name, dict(e.trailing_metadata() or ()), None
    return "OK", dict(call.trailing_metadata() or ()), reply


def usage_row(d: DaemonProcess, name: str) -> dict[str, Any]:
    [row] = d.admin("usage", {"name": name})["usage"]
    assert isinstance(row, dict)
    return row


def test_every_worker_redacts_and_the_main_process_counts_it(daemon: DaemonProcess) -> None:
    secret = daemon.issue("redacted")
    calls = 6
    for _ in range(calls):
        code, _, reply = execute(daemon, secret, SECRET_YAML, "echo")
        assert code == "OK" and reply is not None
        prompt = json.loads(reply.success.response_text)["prompt"]
        assert prompt.count("[REDACTED:k8s_secret]") == 2
        assert not [v for v in VALUES if v in prompt]
    # The main process writes its counts every 2 s; usage reads the database.
    assert wait_until(lambda: usage_row(daemon, "redacted")["redactions"] == 2 * calls, 10)
    row = usage_row(daemon, "redacted")
    assert (row["requests"], row["redaction_kinds"]) == (calls, {"k8s_secret": 2 * calls})


def test_a_dollar_budget_holds_across_workers(daemon: DaemonProcess) -> None:
    secret = daemon.issue("dollars", usd_per_month=0.01)
    # Calls start at $0 and $0.008 spent, whichever worker serves them; then none does.
    outcomes = [execute(daemon, secret, "a b c d e", "faults") for _ in range(6)]
    assert [code for code, _, _ in outcomes] == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 4
    next_month_ms = (spend.next_month_start(time.time()) - time.time()) * 1000
    for _, trailers, _ in outcomes[2:]:
        assert trailers["limit-type"] == "usd_per_month"
        assert abs(int(trailers["retry-after-ms"]) - next_month_ms) < 30_000
    assert wait_until(lambda: usage_row(daemon, "dollars")["requests"] == 2, 10)
    row = usage_row(daemon, "dollars")
    assert row["cost_usd"] == pytest.approx(2 * CALL_USD)
    assert (row["usd_budget"], row["usd_left"]) == (0.01, 0)
    # A model without a price is refused to the budgeted client on every worker too.
    assert {execute(daemon, secret, "hi", "echo")[0] for _ in range(4)} == {"PERMISSION_DENIED"}


def test_get_server_info_tells_what_is_left_whichever_worker_answers(
    daemon: DaemonProcess,
) -> None:
    secret = daemon.issue("info", usd_per_month=0.05)
    for _ in range(2):
        assert execute(daemon, secret, "a b c d e", "faults")[0] == "OK"
    left = []
    for _ in range(6):
        with connection(daemon) as channel:
            reply = pb_grpc.VibectlLLMProxyStub(channel).GetServerInfo(
                pb.GetServerInfoRequest(), metadata=auth(secret), timeout=30
            )
        left.append(round(reply.limits.usd_left_this_month, 6))
    assert left == [round(0.05 - 2 * CALL_USD, 6)] * 6
