"""Dollar budgets (issue 13, item 5) against a real daemon: per client per UTC month,
for the whole server per UTC day, priced from the model's reported usage.

The `faults` fake model reports input = the prompt's words and output = 3 tokens; at
1000 USD per million tokens each way, "a b c d e" costs 8 tokens = $0.008 and
"sleep:1" (one word) costs 4 tokens = $0.004.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.client.test_cli import User
from tests.conftest import RunningDaemon
from tests.conftest import admin_cli as admin
from tests.integration.test_usage_controls import burst, call, issue
from vibectl._proto import llm_proxy_pb2 as pb
from vibectld.store import spend

BIN = Path(sys.executable).parent


def priced_models() -> dict[str, Any]:
    return {"default": "faults", "prices": {"faults": {"input": 1000, "output": 1000}}}


PRICED = priced_models()
CALL_USD = 0.008  # "a b c d e" on faults


@pytest.fixture
def priced(start_daemon: Callable[..., RunningDaemon]) -> RunningDaemon:
    return start_daemon(models=PRICED)


def usage_row(daemon: RunningDaemon, name: str) -> dict[str, Any]:
    out = admin(daemon, "--json", "usage", name)
    assert out.returncode == 0, out.stderr
    [row] = json.loads(out.stdout)
    assert isinstance(row, dict)
    return row


def info(daemon: RunningDaemon, secret: str) -> pb.GetServerInfoResponse:
    reply: pb.GetServerInfoResponse = daemon.stub().GetServerInfo(
        pb.GetServerInfoRequest(), metadata=[("authorization", f"Bearer {secret}")], timeout=30
    )
    return reply


def assert_until(retry_ms: str, at: int) -> None:
    """retry-after-ms points at `at` (a period's start), give or take the test's own time."""
    expected_ms = (at - time.time()) * 1000
    assert int(retry_ms) > 0 and abs(int(retry_ms) - expected_ms) < 30_000


def test_a_client_over_its_monthly_budget_is_refused_until_the_first_of_next_month(
    priced: RunningDaemon,
) -> None:
    secret = issue(priced, "olga", "--usd-per-month", "0.01")
    # $0 and then $0.008 are under $0.01: both start. The second finishes over it.
    for _ in range(2):
        code, _, reply = call(priced, secret, "a b c d e")
        assert code == "OK" and reply is not None
        assert reply.success.metrics.cost_usd == pytest.approx(CALL_USD)
    code, trailers, _ = call(priced, secret, "a b c d e")
    assert (code, trailers["limit-type"]) == ("RESOURCE_EXHAUSTED", "usd_per_month")
    assert_until(trailers["retry-after-ms"], spend.next_month_start(time.time()))
    # A second past the point it names is 00:00:01 UTC on the first of a month.
    retry_at = datetime.fromtimestamp(time.time() + int(trailers["retry-after-ms"]) / 1000 + 1, UTC)
    assert (retry_at.day, retry_at.hour, retry_at.minute) == (1, 0, 0)
    # Streams are refused the same way, and refused calls cost nothing.
    stream = priced.stub().StreamExecute(
        pb.ExecuteRequest(user_fragments=["a b c d e"], model_name="faults"),
        metadata=[("authorization", f"Bearer {secret}")],
        timeout=30,
    )
    with pytest.raises(grpc.RpcError) as refused:
        list(stream)
    assert dict(refused.value.trailing_metadata())["limit-type"] == "usd_per_month"
    row = usage_row(priced, "olga")
    assert row["requests"] == 2 and row["cost_usd"] == pytest.approx(2 * CALL_USD)
    assert (row["usd_budget"], row["usd_left"]) == (0.01, 0)
    assert row["usd_month"] == pytest.approx(2 * CALL_USD)
    # Raising the budget applies to the next request; 'default' goes back to none.
    assert admin(priced, "update-client", "olga", "--usd-per-month", "1").returncode == 0
    assert call(priced, secret, "a b c d e")[0] == "OK"
    out = admin(priced, "update-client", "olga", "--usd-per-month", "default")
    assert out.returncode == 0 and "usd_per_month=default" in out.stdout
    assert "usd_budget" not in usage_row(priced, "olga")


def test_the_month_s_spend_survives_a_restart(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    first = start_daemon(state_dir=tmp_path / "kept", models=PRICED)
    secret = issue(first, "pia", "--usd-per-month", "0.01")
    assert [call(first, secret, "a b c d e")[0] for _ in range(3)] == [
        "OK",
        "OK",
        "RESOURCE_EXHAUSTED",
    ]
    first.stop()
    second = start_daemon(state_dir=tmp_path / "kept", models=PRICED)
    code, trailers, _ = call(second, secret, "a b c d e")
    assert (code, trailers["limit-type"]) == ("RESOURCE_EXHAUSTED", "usd_per_month")


def test_a_default_budget_applies_to_every_client_without_its_own(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(models=PRICED, limits={"usd_per_month": 0.01})
    own = issue(daemon, "quin", "--usd-per-month", "0.02")
    default = issue(daemon, "rex")
    # $0.01: calls start at $0 and $0.008 spent. $0.02: at $0, $0.008 and $0.016.
    codes = [call(daemon, default, "a b c d e")[0] for _ in range(3)]
    assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED"]
    codes = [call(daemon, own, "a b c d e")[0] for _ in range(4)]
    assert codes == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED"]


def test_concurrent_calls_at_the_edge_follow_the_in_flight_overrun_rule(
    priced: RunningDaemon,
) -> None:
    """Calls admitted under the budget all run and are all counted; the next is refused."""
    secret = issue(priced, "sam", "--usd-per-month", "0.01")
    outcomes = burst(priced, secret, 6, prompt="sleep:1", model="faults")
    # Each started with $0 spent (none had finished): all six ran, $0.024 in all.
    assert [code for code, _, _ in outcomes] == ["OK"] * 6
    row = usage_row(priced, "sam")
    assert row["requests"] == 6 and row["cost_usd"] == pytest.approx(6 * 0.004)
    assert row["usd_left"] == 0
    code, trailers, _ = call(priced, secret, "a b c d e")
    assert (code, trailers["limit-type"]) == ("RESOURCE_EXHAUSTED", "usd_per_month")
    # One at a time, calls stop at the budget: at $0, $0.004 and $0.008 spent a call
    # starts; at $0.012 none does.
    other = issue(priced, "tia", "--usd-per-month", "0.01")
    codes = [call(priced, other, "sleep:0")[0] for _ in range(4)]
    assert codes == ["OK", "OK", "OK", "RESOURCE_EXHAUSTED"]


def test_the_server_cap_sums_every_client_and_renews_at_midnight(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(models=PRICED, limits={"server_usd_per_day": 0.015})
    ann, ben = issue(daemon, "ann"), issue(daemon, "ben", "--usd-per-month", "100")
    assert call(daemon, ann, "a b c d e")[0] == "OK"
    assert call(daemon, ben, "a b c d e")[0] == "OK"
    for secret in (ann, ben):
        code, trailers, _ = call(daemon, secret, "a b c d e")
        assert (code, trailers["limit-type"]) == ("RESOURCE_EXHAUSTED", "server_usd_per_day")
        assert_until(trailers["retry-after-ms"], spend.next_day_start(time.time()))
    status = json.loads(admin(daemon, "--json", "status").stdout)
    assert status["usd_today"] == pytest.approx(2 * CALL_USD)
    assert status["server_usd_per_day"] == 0.015
    human = admin(daemon, "status").stdout
    assert "spend today:   $0.0160 of $0.0150 (UTC day; $0.00 left)" in human


def test_an_unpriced_model_is_refused_where_a_budget_must_count_it(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(models=PRICED)
    budgeted = issue(daemon, "uma", "--usd-per-month", "5")
    free = issue(daemon, "vic")
    code, _, _ = call(daemon, budgeted, "hi", model="echo")
    assert code == "PERMISSION_DENIED"
    assert call(daemon, free, "hi", model="echo")[0] == "OK"
    assert call(daemon, budgeted, "hi", model="faults")[0] == "OK"
    # The message names the missing price and what the client may use instead.
    stub = daemon.stub()
    with pytest.raises(grpc.RpcError) as refused:
        stub.Execute(
            pb.ExecuteRequest(user_fragments=["hi"], model_name="echo"),
            metadata=[("authorization", f"Bearer {budgeted}")],
            timeout=30,
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no price" in refused.value.details() and "faults" in refused.value.details()


def test_with_a_server_cap_unpriced_models_are_refused_to_everyone(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(models=PRICED, limits={"server_usd_per_day": 10})
    secret = issue(daemon, "wes")
    assert call(daemon, secret, "hi", model="echo")[0] == "PERMISSION_DENIED"
    assert call(daemon, secret, "hi", model="faults")[0] == "OK"


def test_usage_shows_spend_against_budget(priced: RunningDaemon) -> None:
    budgeted = issue(priced, "xia", "--usd-per-month", "20")
    plain = issue(priced, "yul")
    call(priced, budgeted, "a b c d e")
    call(priced, plain, "a b c d e")
    rows = {r["name"]: r for r in json.loads(admin(priced, "--json", "usage").stdout)}
    assert rows["xia"]["usd_budget"] == 20
    assert rows["xia"]["usd_left"] == pytest.approx(20 - CALL_USD)
    assert "usd_budget" not in rows["yul"] and "usd_left" not in rows["yul"]
    table = admin(priced, "usage").stdout.splitlines()
    assert "BUDGET USD" in table[0] and "LEFT USD" in table[0]
    [xia] = [line for line in table if line.startswith("xia")]
    assert xia.split()[-2:] == ["20.0000", "19.9920"]
    [yul] = [line for line in table if line.startswith("yul")]
    assert yul.split()[-2:] == ["-", "-"]
    listed = {c["name"]: c for c in json.loads(admin(priced, "--json", "list-clients").stdout)}
    assert (listed["xia"]["usd_per_month"], listed["yul"]["usd_per_month"]) == (20, None)


def test_get_server_info_tells_a_client_its_budget_and_what_is_left(
    priced: RunningDaemon,
) -> None:
    budgeted = issue(priced, "zed", "--usd-per-month", "0.05")
    plain = issue(priced, "amy")
    limits = info(priced, budgeted).limits
    assert (limits.usd_per_month, limits.usd_left_this_month) == (0.05, 0.05)
    call(priced, budgeted, "a b c d e")
    limits = info(priced, budgeted).limits
    assert limits.usd_left_this_month == pytest.approx(0.05 - CALL_USD)
    limits = info(priced, plain).limits
    assert not limits.HasField("usd_per_month") and not limits.HasField("usd_left_this_month")


def test_setup_proxy_status_prints_the_budget_line(priced: RunningDaemon, tmp_path: Path) -> None:
    user = User(tmp_path / "home")
    url = priced.admin("issue_client", {"name": "bea", "usd_per_month": 20})["url"]
    assert user.run("setup-proxy", "configure", "-", stdin=url).returncode == 0
    assert user.run("ask", "--model", "faults", "a b c d e").returncode == 0
    status = user.run("setup-proxy", "status")
    assert status.returncode == 0, status.stderr
    assert "budget: $19.99 of $20.00 left this month" in status.stdout
    plain = User(tmp_path / "plain")
    url = priced.admin("issue_client", {"name": "cal"})["url"]
    assert plain.run("setup-proxy", "configure", "-", stdin=url).returncode == 0
    assert "budget" not in plain.run("setup-proxy", "status").stdout


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("-1", "from 0.01 to 1000000"),
        ("0", "from 0.01 to 1000000"),
        ("1e9", "from 0.01 to 1000000"),
        ("nan", "from 0.01 to 1000000"),
        ("lots", "is not a number of US dollars"),
    ],
)
def test_bad_budgets_are_refused_by_the_cli(priced: RunningDaemon, value: str, words: str) -> None:
    out = admin(priced, "issue-client", "dee", "--usd-per-month", value)
    assert out.returncode == 2 and "--usd-per-month" in out.stderr and words in out.stderr
    issue(priced, "eve")
    out = admin(priced, "update-client", "eve", "--usd-per-month", value)
    assert out.returncode == 2 and "--usd-per-month" in out.stderr and words in out.stderr


def test_bad_budgets_are_refused_by_the_daemon(priced: RunningDaemon) -> None:
    """The admin protocol checks too, for a caller other than vibectl-admin."""
    from vibectld.admin.client import AdminClientError

    for value in (-1, 0, 10**12, "5", True):
        with pytest.raises(AdminClientError) as refused:
            priced.admin("issue_client", {"name": "fay", "usd_per_month": value})
        assert "usd_per_month must be a number of US dollars" in refused.value.message


def check_config(path: Path, raw: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(raw))
    return subprocess.run(
        [str(BIN / "vibectld"), "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_warns_about_budgets_with_unpriced_models(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "models": {"allowed": ["faults", "echo"], **priced_models()},
        "limits": {"usd_per_month": 20},
    }
    out = check_config(tmp_path / "c.yaml", raw)
    assert out.returncode == 0 and "valid" in out.stdout
    assert "warning: models.prices: no price for echo" in out.stderr
    assert "limits.usd_per_month" in out.stderr
    raw["models"]["prices"]["echo"] = {"input": 0, "output": 0}  # a free model, said so
    assert check_config(tmp_path / "c.yaml", raw).stderr == ""
    del raw["limits"]
    del raw["models"]["prices"]
    assert check_config(tmp_path / "c.yaml", raw).stderr == ""  # no budget, no warning


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("usd_per_month", -5),
        ("usd_per_month", 0),
        ("usd_per_month", 1e7),
        ("usd_per_month", "20"),
        ("server_usd_per_day", -0.5),
        ("server_usd_per_day", float("inf")),
        ("server_usd_per_day", True),
    ],
)
def test_check_config_refuses_bad_budgets(tmp_path: Path, key: str, value: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"limits:\n  {key}: {json.dumps(value).replace('Infinity', '.inf')}\n")
    out = subprocess.run(
        [str(BIN / "vibectld"), "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"limits.{key}:" in out.stderr and "number of US dollars" in out.stderr
