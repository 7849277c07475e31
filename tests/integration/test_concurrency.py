"""Eight streams at once, each with its own parameters, each getting what it asked for."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.integration.conftest import MODEL

pytestmark = pytest.mark.slow

NO_EOS = {"1": -100, "106": -100}


def stream_text(client: openai.OpenAI, request: dict[str, Any]) -> tuple[str, str | None, int]:
    """Text, finish reason and completion tokens of one streamed completion."""
    chunks = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert usage is not None
    return text, reasons[-1] if reasons else None, usage.completion_tokens


def run_together(jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def run(name: str, job: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[name] = job()
        except BaseException as exc:  # reported below, with the name of the stream
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


def test_eight_concurrent_streams_keep_their_own_parameters(client: openai.OpenAI) -> None:
    greedy = dict(model=MODEL, temperature=0, max_tokens=24, logit_bias=NO_EOS)
    prompts = {
        "story": "Once upon a time, in a small village,",
        "recipe": "To bake bread you need flour, water,",
        "code": "def fibonacci(n):\n",
        "list": "The planets of the solar system are",
    }
    alone = {name: stream_text(client, {**greedy, "prompt": p})[0] for name, p in prompts.items()}
    stop = alone["story"][8:12]  # a stop sequence that the story reaches mid-way

    jobs: dict[str, Callable[[], Any]] = {
        name: (lambda p=p: stream_text(client, {**greedy, "prompt": p})) for name, p in prompts.items()
    }
    jobs["stopped"] = lambda: stream_text(client, {**greedy, "prompt": prompts["story"], "stop": [stop]})
    jobs["short"] = lambda: stream_text(client, {**greedy, "prompt": prompts["recipe"], "max_tokens": 3})
    jobs["sampled"] = lambda: stream_text(
        client, {**greedy, "prompt": prompts["code"], "temperature": 1.2, "top_k": 50, "seed": 3}
    )
    jobs["penalised"] = lambda: stream_text(
        client, {**greedy, "prompt": prompts["list"], "presence_penalty": 2.0, "frequency_penalty": 2.0}
    )
    results = run_together(jobs)

    for name in prompts:
        text, reason, tokens = results[name]
        assert (text, reason, tokens) == (alone[name], "length", 24), name
    text, reason, _ = results["stopped"]
    assert reason == "stop"
    assert text == alone["story"][: alone["story"].index(stop)]
    assert results["short"][1:] == ("length", 3)
    assert alone["recipe"].startswith(results["short"][0])
    assert results["sampled"][2] == 24 and results["sampled"][0] != alone["code"]
    assert results["penalised"][2] == 24 and results["penalised"][0] != alone["list"]
