"""Many streams at once, greedy, sampled and grammar-bound, each getting what it asked for."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.integration.conftest import MODEL, NO_EOS

pytestmark = pytest.mark.slow


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


def test_concurrent_streams_keep_their_own_parameters(client: openai.OpenAI) -> None:
    """Greedy streams must match the same request run alone. llama.cpp's CPU kernels do not give
    bit-identical logits for a sequence decoded alone and in a batch (the matrix kernels change with
    the batch's shape), so near-ties may break differently; these prompts have continuations the model
    is sure of, and any mix-up of sequences or parameters inside a batch still shows at once."""
    greedy = dict(model=MODEL, temperature=0, max_tokens=16, logit_bias=NO_EOS)
    prompts = {
        "numbers": "1, 2, 3, 4, 5, 6, 7, 8,",
        "letters": "A, B, C, D, E, F,",
        "months": "January, February, March, April,",
        "tens": "10, 20, 30, 40, 50,",
    }
    alone = {name: stream_text(client, {**greedy, "prompt": p})[0] for name, p in prompts.items()}
    stop = " July"  # reached mid-way by the months

    jobs: dict[str, Callable[[], Any]] = {
        name: (lambda p=p: stream_text(client, {**greedy, "prompt": p})) for name, p in prompts.items()
    }
    jobs["stopped"] = lambda: stream_text(client, {**greedy, "prompt": prompts["months"], "stop": [stop]})
    jobs["short"] = lambda: stream_text(client, {**greedy, "prompt": prompts["letters"], "max_tokens": 3})
    jobs["sampled"] = lambda: stream_text(
        client, {**greedy, "prompt": prompts["tens"], "temperature": 1.5, "seed": 3, "extra_body": {"top_k": 200}}
    )
    jobs["default_sampling"] = lambda: stream_text(client, {**greedy, "prompt": prompts["tens"], "temperature": 1.0})
    jobs["nucleus"] = lambda: stream_text(
        client, {**greedy, "prompt": prompts["letters"], "temperature": 0.7, "top_p": 0.95, "logprobs": 2}
    )
    jobs["json"] = lambda: client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a person as JSON."}],
        temperature=1.0,
        max_tokens=48,
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "person",
                "strict": True,
                "schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                    "additionalProperties": False,
                },
            },
        },
    )
    jobs["penalised"] = lambda: stream_text(
        client, {**greedy, "prompt": prompts["numbers"], "presence_penalty": 2.0, "frequency_penalty": 2.0}
    )
    results = run_together(jobs)

    for name in prompts:
        text, reason, tokens = results[name]
        assert (text, reason, tokens) == (alone[name], "length", 16), name
    text, reason, _ = results["stopped"]
    assert reason == "stop"
    assert text == alone["months"][: alone["months"].index(stop)]
    assert results["short"][1:] == ("length", 3)
    assert alone["letters"].startswith(results["short"][0])
    assert results["sampled"][2] == 16 and results["sampled"][0] != alone["tens"]
    assert results["penalised"][2] == 16 and results["penalised"][0] != alone["numbers"]
    assert results["default_sampling"][1:] == ("length", 16)
    assert results["nucleus"][1:] == ("length", 16)
    reply = results["json"].choices[0]
    assert reply.finish_reason == "stop", reply
    person = json.loads(reply.message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
