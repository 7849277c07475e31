"""HAProxy's agent check: the reply for each state of an instance, and the listener over a real socket."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from llmserve.agent import AgentServer, InstanceLoad, InstanceState, agent_reply, instance_load
from llmserve.models.state import WorkerStatus
from llmserve.standby import Standby


def model(status: str, slots: int = 4, busy: int = 0, queued: int = 0) -> dict[str, object]:
    return {"status": status, "version": "abc", "slots": slots, "busy": busy, "queued": queued}


def worker(**models: dict[str, object]) -> dict[str, object]:
    return {"pid": 1, "models": models}


@pytest.mark.parametrize(
    ("load", "reply"),
    [
        (InstanceLoad(InstanceState.SERVING, slots=8), "up ready 100% maxconn:8\n"),
        (InstanceLoad(InstanceState.SERVING, slots=8, busy=4), "up ready 56% maxconn:8\n"),
        (InstanceLoad(InstanceState.SERVING, slots=8, busy=8), "up ready 11% maxconn:8\n"),
        (InstanceLoad(InstanceState.SERVING, slots=4, busy=4, queued=200), "up ready 1% maxconn:4\n"),
        (InstanceLoad(InstanceState.DRAINING), "up drain\n"),
        (InstanceLoad(InstanceState.LOADING), "up drain\n"),
        (InstanceLoad(InstanceState.FAILED, reason="no model could be loaded"), "down #no model could be loaded\n"),
    ],
)
def test_each_state_has_its_reply(load: InstanceLoad, reply: str) -> None:
    assert agent_reply(load) == reply


def test_a_hash_balanced_backend_gets_no_weight() -> None:
    assert agent_reply(InstanceLoad(InstanceState.SERVING, slots=8, busy=8), weight=False) == "up ready maxconn:8\n"


def test_the_load_sums_every_worker_and_every_serving_model() -> None:
    statuses = [
        worker(a=model("ready", 4, busy=2, queued=1), b=model("ready", 2, busy=2)),
        worker(a=model("ready", 4, busy=1), b=model("loading")),
    ]
    assert instance_load(statuses, draining=False) == InstanceLoad(InstanceState.SERVING, slots=10, busy=5, queued=1)


def test_an_instance_is_loading_until_a_model_serves_and_down_when_none_can() -> None:
    assert instance_load([], draining=False).state is InstanceState.LOADING
    assert instance_load([worker(a=model("loading"))], draining=False).state is InstanceState.LOADING
    assert instance_load([worker(a=model("failed"), b=model("loading"))], draining=False).state is InstanceState.LOADING
    assert instance_load([worker(a=model("failed"))], draining=False).state is InstanceState.FAILED
    assert instance_load([worker(a=model("failed"), b=model("ready"))], draining=False).slots == 4


def test_draining_wins_over_everything() -> None:
    assert instance_load([worker(a=model("ready"))], draining=True).state is InstanceState.DRAINING
    assert instance_load([worker(a=model("ready"))], draining=True, standby=True).state is InstanceState.DRAINING


def test_a_warm_instance_in_standby_takes_no_traffic_and_a_failed_one_still_reports_down() -> None:
    standing_by = instance_load([worker(a=model("ready", 4))], draining=False, standby=True)
    assert standing_by.state is InstanceState.STANDBY and agent_reply(standing_by) == "up drain\n"
    failed = instance_load([worker(a=model("failed"))], draining=False, standby=True)
    assert agent_reply(failed).startswith("down")


def ask(address: tuple[str, int], send: bytes = b"") -> str:
    with socket.create_connection(address, timeout=5) as connection:
        if send:
            connection.sendall(send)
        return connection.makefile().readline()


def test_the_listener_answers_from_the_workers_status_files(tmp_path: Path) -> None:
    WorkerStatus(tmp_path, os.getpid()).write(worker(a=model("ready", 4, busy=3)))
    dead = tmp_path / "models-status" / f"{socket.gethostname()}-999999999.json"  # died unannounced: not counted
    dead.write_text(json.dumps(worker(a=model("ready", 100))))
    agent = AgentServer("127.0.0.1", 0, tmp_path)
    agent.start()
    try:
        address = agent.address[:2]
        assert ask(address) == "up ready 40% maxconn:4\n"
        assert ask(address, b"load\n") == "up ready 40% maxconn:4\n"
        assert ask(address, b"state\n") == "up ready maxconn:4\n"
        Standby(tmp_path).set(True)  # warm, and given no traffic until activated
        assert ask(address) == ask(address, b"state\n") == "up drain\n"
        Standby(tmp_path).set(False)
        assert ask(address) == "up ready 40% maxconn:4\n"
        agent.draining = True
        assert ask(address) == "up drain\n"
    finally:
        agent.close_inherited()
