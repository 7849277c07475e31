"""The usage ledger through the real server, on SQLite and on PostgreSQL: one record per request however
it ends, engine time that adds up to the engine's busy time, /v1/usage per tenant, the per-tenant cost
metrics, backups restored with the CLI, one owner of the jobs among workers, and a start refused when
the ledger cannot be opened."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from llmserve.keys import FileKeyStore
from llmserve.ledger.owner import JOBS_LOCK, OwnerLock
from llmserve.ledger.settings import default_url
from llmserve.ledger.store import Ledger, usage_records
from tests.integration.conftest import (
    LLMSERVE,
    MODEL,
    NO_EOS,
    Server,
    cli_env,
    free_port,
    long_stream_body,
    start_server,
    stop_server,
    wait_for,
)
from tests.ledger_support import POSTGRES_URL, postgres_object

pytestmark = pytest.mark.slow

CONFIG = """
queue_timeout = 4

[ledger]
flush_interval = 0.2

[prices]
version = "test-1"

[prices.models."*"]
prompt_per_1k = 1.0
completion_per_1k = 2.0
engine_second = 0.5

[tenants.alpha]

[tenants.beta]
max_running = 1
max_queued = 4
"""
RECORD_TIMEOUT = 15.0
FORCE_EOS = {"1": 100}  # the end-of-generation token wins at once: finish_reason stop after one token


@dataclass
class Deployment:
    backend: str
    directory: Path
    server: Server
    url: str
    ledger: Ledger
    keys: dict[str, str]
    key_ids: dict[str, str]

    def post(
        self, who: str, path: str, body: dict[str, Any], *, request_id: str, timeout: float = 120
    ) -> httpx.Response:
        url = f"{self.server.url}{path}"
        return httpx.post(url, json=body, headers=self.headers(who, request_id), timeout=timeout)

    def headers(self, who: str, request_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}", "X-Request-ID": request_id}

    def records(self, request_id: str) -> list[dict[str, Any]]:
        """The records of requests sent with this X-Request-ID (the ledger makes a client's id unique)."""
        column = usage_records.c.request_id
        statement = select(usage_records).where(column.startswith(f"{request_id}~", autoescape=True))
        with self.ledger.engine.connect() as connection:
            return [dict(row) for row in connection.execute(statement).mappings()]

    def record(self, request_id: str) -> dict[str, Any]:
        """The one record of the request, waited for: records are written every flush_interval."""
        assert wait_for(lambda: bool(self.records(request_id)), RECORD_TIMEOUT), f"no record for {request_id}"
        time.sleep(0.5)  # a second record, if there were one, would have been written by now
        found = self.records(request_id)
        assert len(found) == 1, found
        return found[0]

    def wait_idle(self) -> None:
        def idle() -> bool:
            stats = self.server.engine_stats()
            return stats["slots_busy"] == 0 and stats["queued"] == 0

        assert wait_for(idle, 60)


def new_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a database created for this module, dropped afterwards."""
    with postgres_object("DATABASE", "llmserve_usage") as name:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp(f"usage-{request.param}")
    store = FileKeyStore(directory / "state")
    issued = {"alpha": store.create("alpha"), "beta": store.create("beta"), "admin": store.create(None, admin=True)}
    keys = {who: key for who, (_, key) in issued.items()}
    key_ids = {who: record.id for who, (record, _) in issued.items()}
    database = fresh_postgres_database() if request.param == "postgresql" else sqlite_file(directory)
    with database as url:
        settings = {"model__parallel": "4"} | ({"ledger__url": url} if request.param == "postgresql" else {})
        server = start_server(directory, config=CONFIG, **settings)
        ledger = Ledger.open(url, migrate=False)
        try:
            yield Deployment(request.param, directory, server, url, ledger, keys, key_ids)
        finally:
            stop_server(server)
            ledger.close()


@contextmanager
def sqlite_file(directory: Path) -> Iterator[str]:
    """The default ledger: a SQLite file in the state directory."""
    yield default_url(directory / "state")


def expected_cost(record: dict[str, Any]) -> float:
    return record["prompt_tokens"] / 1000 + record["completion_tokens"] * 2 / 1000 + record["engine_seconds"] * 0.5


def assert_timings_are_ordered(record: dict[str, Any]) -> None:
    assert 0 <= record["queue_seconds"] <= record["ttft_seconds"] <= record["total_seconds"]
    assert 0 < record["engine_seconds"] < record["total_seconds"]


# -- one record per request, however it ends ----------------------------------------------------------------


def test_a_completed_request_leaves_one_priced_record(deployment: Deployment) -> None:
    rid = new_id("done")
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "logit_bias": FORCE_EOS}
    response = deployment.post("alpha", "/v1/completions", body, request_id=rid)
    assert response.status_code == 200
    usage = response.json()["usage"]
    record = deployment.record(rid)
    assert record["tenant"] == "alpha" and record["key_id"] == deployment.key_ids["alpha"]
    assert (record["model"], record["endpoint"], record["status"]) == (MODEL, "completions", 200)
    assert record["finish_reason"] == "stop"
    assert record["prompt_tokens"] == usage["prompt_tokens"]
    assert record["completion_tokens"] == usage["completion_tokens"] == 1
    assert record["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert_timings_are_ordered(record)
    assert record["price_version"] == "test-1"
    assert record["cost"] == pytest.approx(expected_cost(record))


def test_a_request_that_reaches_max_tokens_is_recorded_as_length(deployment: Deployment) -> None:
    rid = new_id("length")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "logit_bias": NO_EOS}
    assert deployment.post("alpha", "/v1/completions", body, request_id=rid).status_code == 200
    record = deployment.record(rid)
    assert (record["finish_reason"], record["completion_tokens"]) == ("length", 6)


def test_a_completed_chat_stream_leaves_one_record(deployment: Deployment) -> None:
    rid = new_id("chatstream")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 12,
        "logit_bias": NO_EOS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    url = f"{deployment.server.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=deployment.headers("alpha", rid), timeout=120) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    record = deployment.record(rid)
    assert (record["endpoint"], record["finish_reason"], record["status"]) == ("chat.completions", "length", 200)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (usage["prompt_tokens"], 12)
    assert_timings_are_ordered(record)


def test_a_reply_that_calls_a_tool_is_recorded_as_tool_calls(deployment: Deployment) -> None:
    rid = new_id("tools")
    parameters = {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 12}},
        "required": ["zone"],
        "additionalProperties": False,
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What time is it in Tokyo?"}],
        "tools": [{"type": "function", "function": {"name": "get_time", "parameters": parameters}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 120,
    }
    response = deployment.post("alpha", "/v1/chat/completions", body, request_id=rid)
    assert response.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert deployment.record(rid)["finish_reason"] == "tool_calls"  # what the client was told


def test_a_stop_sequence_is_recorded_with_the_tokens_generated(deployment: Deployment) -> None:
    rid = new_id("stopseq")
    body = {
        "model": MODEL,
        "prompt": "One, two, three, four,",
        "max_tokens": 40,
        "stop": [","],
        "temperature": 0,  # " five," for certain: a random draw could miss the comma for 40 tokens
        "logit_bias": NO_EOS,
    }
    response = deployment.post("alpha", "/v1/completions", body, request_id=rid)
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    record = deployment.record(rid)
    assert record["finish_reason"] == "stop"
    assert record["completion_tokens"] == response.json()["usage"]["completion_tokens"] < 40
    assert record["engine_seconds"] > 0  # reported by the engine after the response was complete


def test_a_stream_the_client_abandons_is_recorded_as_cancelled(deployment: Deployment) -> None:
    rid = new_id("abandoned")
    url = f"{deployment.server.url}/v1/completions"
    with httpx.stream(
        "POST", url, json=long_stream_body(300), headers=deployment.headers("alpha", rid), timeout=120
    ) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received == 8:
                break  # and leave: the connection closes with the block
    record = deployment.record(rid)
    assert (record["finish_reason"], record["status"]) == ("cancelled", 200)
    assert 5 <= record["completion_tokens"] < 300
    assert record["engine_seconds"] > 0


def test_queued_requests_that_are_left_or_time_out_are_recorded(deployment: Deployment) -> None:
    """beta may run one sequence: while its stream runs, its next requests wait in the queue."""
    holder, left, timed_out = new_id("holder"), new_id("left"), new_id("queuetimeout")
    url = f"{deployment.server.url}/v1/completions"
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    with httpx.stream(
        "POST", url, json=long_stream_body(2000), headers=deployment.headers("beta", holder), timeout=120
    ) as running:
        assert running.status_code == 200
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while the request is queued
            deployment.post("beta", "/v1/completions", body, request_id=left, timeout=1.5)
        response = deployment.post("beta", "/v1/completions", body, request_id=timed_out)
        assert (response.status_code, response.json()["error"]["code"]) == (503, "queue_timeout")
    for rid, status, reason in ((left, 499, "cancelled"), (timed_out, 503, "timeout")):
        record = deployment.record(rid)
        assert (record["status"], record["finish_reason"]) == (status, reason)
        assert (record["prompt_tokens"], record["completion_tokens"], record["queue_seconds"]) == (0, 0, None)
        assert record["tenant"] == "beta" and record["cost"] == pytest.approx(expected_cost(record))
    assert deployment.record(holder)["finish_reason"] == "cancelled"


def test_embeddings_are_recorded_with_their_engine_time(deployment: Deployment) -> None:
    rid = new_id("embed")
    body = {"model": MODEL, "input": ["first text to embed", "and a second one"]}
    response = deployment.post("alpha", "/v1/embeddings", body, request_id=rid)
    assert response.status_code == 200
    record = deployment.record(rid)
    assert (record["endpoint"], record["finish_reason"], record["status"]) == ("embeddings", "stop", 200)
    assert record["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert (record["completion_tokens"], record["ttft_seconds"]) == (0, None)
    assert 0 < record["engine_seconds"] < record["total_seconds"]


def test_requests_refused_at_the_door_leave_no_record(deployment: Deployment) -> None:
    refused = {new_id("badkey"): 401, new_id("badparam"): 400, new_id("adminkey"): 403}
    url = f"{deployment.server.url}/v1/completions"
    bad_key, bad_param, admin = refused
    assert httpx.post(url, json={}, headers={"X-Request-ID": bad_key, "x-api-key": "nope"}).status_code == 401
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
    assert deployment.post("alpha", "/v1/completions", body | {"top_p": 0}, request_id=bad_param).status_code == 400
    assert deployment.post("admin", "/v1/completions", body, request_id=admin).status_code == 403
    marker = new_id("after")  # written after the refusals: once it is there, they would be too
    assert deployment.post("alpha", "/v1/completions", body, request_id=marker).status_code == 200
    deployment.record(marker)
    assert all(deployment.records(rid) == [] for rid in refused)


def test_a_reused_request_id_still_records_every_request(deployment: Deployment) -> None:
    rid = new_id("reused")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for _ in range(2):
        assert deployment.post("alpha", "/v1/completions", body, request_id=rid).headers["X-Request-ID"] == rid
    assert wait_for(lambda: len(deployment.records(rid)) == 2, RECORD_TIMEOUT)


def test_a_server_generated_request_id_is_the_record_id(deployment: Deployment) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    response = httpx.post(
        f"{deployment.server.url}/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {deployment.keys['alpha']}"},
        timeout=120,
    )
    rid = response.headers["X-Request-ID"]
    statement = select(func.count()).select_from(usage_records).where(usage_records.c.request_id == rid)

    def recorded() -> bool:
        with deployment.ledger.engine.connect() as connection:
            return connection.execute(statement).scalar_one() == 1

    assert wait_for(recorded, RECORD_TIMEOUT)


# -- engine time, metrics and /v1/usage ------------------------------------------------------------------


def test_attributed_engine_time_adds_up_to_the_engines_busy_time(deployment: Deployment) -> None:
    """Streams decoded together, a long prompt prefilled in chunks beside them, embeddings and an abandoned
    stream: what the records carry sums to what the engine spent."""
    deployment.wait_idle()
    busy_before = deployment.server.engine_stats()["busy_seconds"]
    ids: list[str] = []
    errors: list[BaseException] = []

    def send(path: str, body: dict[str, Any]) -> None:
        rid = new_id("busy")
        ids.append(rid)
        try:
            assert deployment.post("alpha", path, body, request_id=rid).status_code == 200
        except BaseException as exc:
            errors.append(exc)

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 70  # about 700 tokens: two prefill chunks
    stories = [{"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 30, "logit_bias": NO_EOS} for i in range(2)]
    work = [("/v1/completions", body) for body in stories] + [
        ("/v1/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 5}),
        ("/v1/embeddings", {"model": MODEL, "input": ["one", "two", "three"]}),
    ]
    threads = [threading.Thread(target=send, args=item) for item in work]
    for thread in threads:
        thread.start()
    abandoned = new_id("busy")
    ids.append(abandoned)
    url = f"{deployment.server.url}/v1/completions"
    headers = deployment.headers("alpha", abandoned)
    with httpx.stream("POST", url, json=long_stream_body(200), headers=headers, timeout=120) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    records = [deployment.record(rid) for rid in ids]
    deployment.wait_idle()
    busy = deployment.server.engine_stats()["busy_seconds"] - busy_before
    attributed = sum(record["engine_seconds"] for record in records)
    assert busy > 0
    assert attributed == pytest.approx(busy, rel=0.01)


def test_cost_and_engine_time_are_exported_per_tenant(deployment: Deployment) -> None:
    rid = new_id("metrics")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3}
    assert deployment.post("beta", "/v1/completions", body, request_id=rid).status_code == 200
    deployment.record(rid)
    with deployment.ledger.engine.connect() as connection:
        totals = connection.execute(
            select(func.sum(usage_records.c.cost), func.sum(usage_records.c.engine_seconds)).where(
                usage_records.c.tenant == "beta"
            )
        ).one()
    metrics = httpx.get(f"{deployment.server.url}/metrics", timeout=10).text
    labels = f'{{model="{MODEL}",tenant="beta"}}'
    exported = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if labels in line}
    assert exported[f"llmserve_cost_total{labels}"] == pytest.approx(totals[0])
    assert exported[f"llmserve_engine_seconds_total{labels}"] == pytest.approx(totals[1])


def _usage(deployment: Deployment, who: str, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {deployment.keys[who]}"}
    return httpx.get(f"{deployment.server.url}/v1/usage", params=params, headers=headers, timeout=30)


def test_a_tenant_reads_only_its_own_usage_and_the_admin_reads_all(deployment: Deployment) -> None:
    for who in ("alpha", "beta"):
        rid = new_id(f"usage{who}")
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert deployment.post(who, "/v1/completions", body, request_id=rid).status_code == 200
        deployment.record(rid)
    mine = _usage(deployment, "alpha")
    assert mine.status_code == 200 and mine.json()["object"] == "list"
    rows = mine.json()["data"]
    assert {row["tenant"] for row in rows} == {"alpha"}
    with deployment.ledger.engine.connect() as connection:
        alpha = connection.execute(
            select(func.count(), func.sum(usage_records.c.completion_tokens)).where(usage_records.c.tenant == "alpha")
        ).one()
    assert (sum(row["requests"] for row in rows), sum(row["completion_tokens"] for row in rows)) == tuple(alpha)
    assert set(rows[0]) >= {"period", "model", "prompt_tokens", "cached_tokens", "engine_seconds", "cost"}
    assert rows[0]["period"].endswith("T00:00:00Z")  # grouped by UTC day unless asked otherwise

    denied = _usage(deployment, "alpha", tenant="beta")
    assert (denied.status_code, denied.json()["error"]["code"]) == (403, "permission_denied")
    assert _usage(deployment, "alpha", tenant="alpha").json() == mine.json()

    everyone = _usage(deployment, "admin", group_by="hour").json()["data"]
    assert {row["tenant"] for row in everyone} == {"alpha", "beta"}
    assert all(row["period"].endswith(":00:00Z") for row in everyone)
    only_beta = _usage(deployment, "admin", tenant="beta", model=MODEL, start="2000-01-01", end=str(time.time() + 60))
    assert {row["tenant"] for row in only_beta.json()["data"]} == {"beta"}
    assert _usage(deployment, "admin", end="2000-01-01T00:00:00Z").json()["data"] == []


@pytest.mark.parametrize(
    ("params", "param"),
    [({"start": "yesterday"}, "start"), ({"group_by": "week"}, "group_by"), ({"colour": "red"}, "colour")],
)
def test_bad_usage_parameters_get_400_naming_the_parameter(
    deployment: Deployment, params: dict[str, str], param: str
) -> None:
    response = _usage(deployment, "admin", **params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


# -- backups and restore, with the CLI -------------------------------------------------------------------


def _cli(deployment: Deployment, *args: str, directory: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = cli_env(directory or deployment.directory, deployment.url if deployment.backend == "postgresql" else None)
    return subprocess.run([LLMSERVE, *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_backup_restored_into_a_fresh_state_dir_holds_the_same_ledger(deployment: Deployment, tmp_path: Path) -> None:
    if deployment.backend == "postgresql":
        refused = _cli(deployment, "backup")
        assert refused.returncode != 0 and "pg_dump" in refused.stderr
        return
    deployment.wait_idle()
    time.sleep(1)  # every record written
    taken = _cli(deployment, "backup", "--dir", str(tmp_path / "backups"))
    assert taken.returncode == 0, taken.stderr
    backup_file = Path(taken.stdout.strip().splitlines()[-1])
    assert backup_file.is_file() and backup_file.parent == tmp_path / "backups"

    in_use = _cli(deployment, "restore", str(backup_file))
    assert in_use.returncode != 0 and "stop it before restoring" in in_use.stderr

    fresh = tmp_path / "fresh"
    (fresh / "state").mkdir(parents=True)
    (fresh / "llmserve.toml").write_text(CONFIG)
    restored = _cli(deployment, "restore", str(backup_file), directory=fresh)
    assert restored.returncode == 0, restored.stderr
    assert "restored" in restored.stdout and str(fresh / "state" / "ledger.db") in restored.stdout

    def rows(url: str) -> list[dict[str, Any]]:
        ledger = Ledger.open(url, migrate=False)
        try:
            with ledger.engine.connect() as connection:
                return [dict(row) for row in connection.execute(select(usage_records).order_by("id")).mappings()]
        finally:
            ledger.close()

    assert rows(default_url(fresh / "state")) == rows(deployment.url) != []
    reports = [
        _cli(deployment, "usage", "report", "--format", "json", "--group-by", "hour", directory=where).stdout
        for where in (deployment.directory, fresh)
    ]
    assert reports[0] == reports[1] and json.loads(reports[0])


def test_the_usage_report_cli_filters_like_the_api(deployment: Deployment) -> None:
    deployment.wait_idle()
    time.sleep(1)
    report = _cli(deployment, "usage", "report", "--tenant", "beta", "--since", "2000-01-01", "--format", "csv")
    assert report.returncode == 0, report.stderr
    header, *lines = report.stdout.splitlines()
    assert header.startswith("period,tenant,model,requests")
    assert lines and all(line.split(",")[1] == "beta" for line in lines)
    api = _usage(deployment, "admin", tenant="beta", start="2000-01-01").json()["data"]
    assert sum(int(line.split(",")[3]) for line in lines) == sum(row["requests"] for row in api)


# -- several workers, and a ledger that cannot be opened --------------------------------------------------------


def test_with_two_workers_exactly_one_runs_the_ledger_jobs(tmp_path: Path) -> None:
    server = start_server(tmp_path, workers="2", model__id=MODEL, model__parallel="2", model__threads="1")
    try:
        assert wait_for(lambda: server.log.read_text().count("ready in") == 2, timeout=120)  # one model each
        assert wait_for(lambda: "now runs the ledger jobs" in server.log.read_text(), timeout=30)
        time.sleep(2)  # both workers have tried to claim the jobs by now
        assert server.log.read_text().count("now runs the ledger jobs") == 1
        assert not OwnerLock(tmp_path / "state" / JOBS_LOCK).try_acquire()
        assert wait_for(lambda: any((tmp_path / "state" / "backups").glob("ledger-*.db.sha256")), timeout=30)
    finally:
        stop_server(server)
    lock = OwnerLock(tmp_path / "state" / JOBS_LOCK)
    assert lock.try_acquire()  # released when the workers exit
    lock.release()


def test_a_stream_ended_by_a_shutdown_is_recorded_before_the_worker_exits(tmp_path: Path) -> None:
    config = "[ledger]\nflush_interval = 5\n"  # longer than the drain: only the writer's close can write it
    server = start_server(tmp_path, config=config, graceful_timeout="4")
    rid = new_id("shutdown")
    url = f"{server.url}/v1/completions"
    headers = {"X-Request-ID": rid}
    with httpx.stream("POST", url, json=long_stream_body(3000), headers=headers, timeout=120) as response:
        events = response.iter_lines()
        next(line for line in events if line.startswith("data: "))
        server.process.send_signal(signal.SIGTERM)
        last = [line for line in events if line.startswith("data: ")][-1]
    assert "error" in json.loads(last[6:])  # the drain deadline ended it with an error event
    assert server.process.wait(timeout=30) == 0
    ledger = Ledger.open(default_url(tmp_path / "state"), migrate=False)
    try:
        with ledger.engine.connect() as connection:
            statement = select(usage_records).where(usage_records.c.request_id.startswith(f"{rid}~"))
            [record] = connection.execute(statement).mappings().all()
    finally:
        ledger.close()
    assert (record["finish_reason"], record["status"]) == ("shutting_down", 200)
    assert record["completion_tokens"] > 0 and record["engine_seconds"] > 0


def test_a_ledger_that_cannot_be_opened_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    env = cli_env(tmp_path, "postgresql+psycopg://postgres:secret@127.0.0.1:1/nothing")
    env.pop("LLMSERVE_CONFIG")
    env["LLMSERVE_PORT"] = str(free_port())
    result = subprocess.run([LLMSERVE, "serve"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert "cannot open the usage ledger at postgresql+psycopg://postgres:***@127.0.0.1:1/nothing" in result.stderr
    assert "secret" not in result.stderr
