"""The API fuzzed from its own OpenAPI document: schemathesis, run as an operator would run it, against a
real server with a tenant, so that every operation needs a key and the fuzzer also tries each without one.

Every generated request, valid or not, must get a status the document lists, with a documented content
type, an OpenAI error object for every error, and never a 5xx. The one check left out is
``positive_data_acceptance``: rules that span fields (``stream_options`` needs ``stream``, a tool message
answers an earlier call) or parse text (a time in /v1/usage) are beyond JSON Schema, so a schema-valid
request may rightly get a 400. Each message role is its own schema (what a role requires is in the
document), so generated conversations are mostly valid and the run reaches generation, not only
validation; the test checks that it does.

The run is made cheap by configuration rather than by skipping anything: a 256-token context and a tenant
allowed at most 4 output tokens (larger ``max_tokens`` get the documented 400). The seed is fixed so that a
failure reproduces; ``st replay`` with the case id in the output replays it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.conftest import create_key, start_server, stop_server

pytestmark = pytest.mark.slow

SCHEMATHESIS = str(Path(sys.executable).parent / "st")
CONFIG = """
[model]
context_length = 256
parallel = 4

[tenants.fuzz]
max_tokens = 4
"""
EXAMPLES = 50
SEED = 1


def test_every_generated_request_gets_a_documented_answer(tmp_path: Path) -> None:
    server = start_server(tmp_path, CONFIG)
    try:
        key = create_key(tmp_path, "fuzz")
        workers = server.worker_pids()
        command = [
            SCHEMATHESIS,
            "run",
            f"{server.url}/openapi.json",
            f"--header=Authorization: Bearer {key}",
            f"--max-examples={EXAMPLES}",
            f"--seed={SEED}",
            "--workers=1",
            "--request-timeout=120",
            "--exclude-checks=positive_data_acceptance",
            "--no-color",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-2000:]
        assert "passed" in result.stdout and not re.search(r"\b0 generated", result.stdout)
        assert server.worker_pids() == workers, "a worker was replaced while being fuzzed"
        assert "Traceback" not in server.log.read_text(errors="replace"), server.log_tail()
        served = answered(server.log)
        # The fuzzer reaches the generation paths, not only their validation (messages are a union per role).
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            assert served[path, 200] >= 10, served
    finally:
        stop_server(server)


def answered(log: Path) -> Counter[tuple[str, int]]:
    """How many requests of each path got each status, from the server's request log."""
    lines = (json.loads(line) for line in log.read_text(errors="replace").splitlines() if line.startswith("{"))
    return Counter((line["path"], line["status"]) for line in lines if line.get("logger") == "llmserve.requests")
