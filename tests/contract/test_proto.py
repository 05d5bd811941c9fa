"""The committed stubs are exactly what protoc makes of proto/, and the wire contract holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from vibectl._proto import llm_proxy_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("llm_proxy_pb2.py", "llm_proxy_pb2.pyi", "llm_proxy_pb2_grpc.py")


def test_stubs_are_fresh(tmp_path: Path) -> None:
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        env={"PATH": env_path},
        cwd=ROOT,
    )
    for name in STUBS:
        fresh = (tmp_path / "vibectl" / "_proto" / name).read_text()
        committed = (ROOT / "vibectl" / "_proto" / name).read_text()
        assert fresh == committed, f"vibectl/_proto/{name} is stale: run scripts/gen-proto"


T = FieldDescriptor
# (message, field number, name, type, repeated) from DESIGN.md: the 0.11.x wire contract.
CONTRACT = [
    ("ExecuteRequest", 1, "system_fragments", T.TYPE_STRING, True),
    ("ExecuteRequest", 2, "user_fragments", T.TYPE_STRING, True),
    ("ExecuteRequest", 3, "model_name", T.TYPE_STRING, False),
    ("ExecuteRequest", 4, "response_model_schema", T.TYPE_STRING, False),
    ("ExecuteRequest", 5, "request_id", T.TYPE_STRING, False),
    ("ExecuteResponse", 1, "request_id", T.TYPE_STRING, False),
    ("ExecuteResponse", 2, "success", T.TYPE_MESSAGE, False),
    ("ExecuteResponse", 3, "error", T.TYPE_MESSAGE, False),
    ("ExecuteSuccess", 1, "response_text", T.TYPE_STRING, False),
    ("ExecuteSuccess", 2, "metrics", T.TYPE_MESSAGE, False),
    ("ExecuteSuccess", 3, "actual_model_used", T.TYPE_STRING, False),
    ("ExecuteError", 1, "error_code", T.TYPE_STRING, False),
    ("ExecuteError", 2, "error_message", T.TYPE_STRING, False),
    ("ExecuteError", 3, "error_details", T.TYPE_STRING, False),
    ("StreamChunk", 1, "request_id", T.TYPE_STRING, False),
    ("StreamChunk", 2, "text_chunk", T.TYPE_STRING, False),
    ("StreamChunk", 3, "final_metrics", T.TYPE_MESSAGE, False),
    ("StreamChunk", 4, "error", T.TYPE_MESSAGE, False),
    ("StreamChunk", 5, "complete", T.TYPE_MESSAGE, False),
    ("StreamComplete", 1, "actual_model_used", T.TYPE_STRING, False),
    ("ExecutionMetrics", 1, "duration_ms", T.TYPE_INT64, False),
    ("ExecutionMetrics", 2, "input_tokens", T.TYPE_INT32, False),
    ("ExecutionMetrics", 3, "output_tokens", T.TYPE_INT32, False),
    ("ExecutionMetrics", 4, "total_tokens", T.TYPE_INT32, False),
    ("ExecutionMetrics", 5, "cost_usd", T.TYPE_DOUBLE, False),
    ("ExecutionMetrics", 6, "retry_count", T.TYPE_INT32, False),
    ("ExecutionMetrics", 7, "timestamp", T.TYPE_INT64, False),
    ("GetServerInfoResponse", 1, "available_models", T.TYPE_MESSAGE, True),
    ("GetServerInfoResponse", 2, "default_model", T.TYPE_STRING, False),
    ("GetServerInfoResponse", 3, "limits", T.TYPE_MESSAGE, False),
    ("GetServerInfoResponse", 4, "server_version", T.TYPE_STRING, False),
    ("GetServerInfoResponse", 5, "model_aliases", T.TYPE_MESSAGE, True),
    ("GetServerInfoResponse", 6, "server_name", T.TYPE_STRING, False),
    ("ModelInfo", 1, "model_id", T.TYPE_STRING, False),
    ("ModelInfo", 2, "display_name", T.TYPE_STRING, False),
    ("ModelInfo", 3, "provider", T.TYPE_STRING, False),
    ("ModelInfo", 4, "supports_streaming", T.TYPE_BOOL, False),
    ("ModelInfo", 5, "max_context_length", T.TYPE_INT32, False),
    ("ModelInfo", 6, "aliases", T.TYPE_STRING, True),
    ("ServerLimits", 1, "max_requests_per_minute", T.TYPE_INT32, False),
    ("ServerLimits", 2, "max_concurrent_requests", T.TYPE_INT32, False),
    ("ServerLimits", 3, "max_input_length", T.TYPE_INT32, False),
    ("ServerLimits", 4, "request_timeout_seconds", T.TYPE_INT32, False),
    # Added by the second release (issue 13): the calling client's dollar budget.
    ("ServerLimits", 5, "usd_per_month", T.TYPE_DOUBLE, False),
    ("ServerLimits", 6, "usd_left_this_month", T.TYPE_DOUBLE, False),
]


def test_wire_contract_matches_vibectl_0_11() -> None:
    file = pb.DESCRIPTOR
    assert file.package == "vibectl.llm_proxy"
    for message, number, name, ftype, repeated in CONTRACT:
        field = file.message_types_by_name[message].fields_by_number[number]
        assert (field.name, field.type) == (name, ftype), f"{message}.{number}"
        assert field.is_repeated == repeated if hasattr(field, "is_repeated") else True
    optional = {
        ("ExecuteRequest", "model_name"),
        ("ExecuteRequest", "response_model_schema"),
        ("ExecuteError", "error_details"),
        ("ModelInfo", "max_context_length"),
        ("ServerLimits", "usd_per_month"),
        ("ServerLimits", "usd_left_this_month"),
    }
    for message, name in optional:
        assert file.message_types_by_name[message].fields_by_name[name].has_presence
    service = file.services_by_name["VibectlLLMProxy"]
    methods = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods
    }
    assert methods == {
        "Execute": ("ExecuteRequest", "ExecuteResponse", False),
        "StreamExecute": ("ExecuteRequest", "StreamChunk", True),
        "GetServerInfo": ("GetServerInfoRequest", "GetServerInfoResponse", False),
    }
