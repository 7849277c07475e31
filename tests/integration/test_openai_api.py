"""The official ``openai`` client against a real gunicorn-run server with the real model."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, NO_EOS, Server

pytestmark = pytest.mark.slow

# Gemma 3's end-of-generation tokens (<eos>, <end_of_turn>): banned to get exactly max_tokens tokens.


def test_models_are_listed_and_retrieved(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL, "smollm2-135m-instruct"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_counts_are_exact(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=7, temperature=0, logit_bias=NO_EOS
    )
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].text
    assert result.usage is not None
    assert result.usage.completion_tokens == 7
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7


def test_streamed_completion_matches_the_unstreamed_one(client: openai.OpenAI) -> None:
    request = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, logit_bias=NO_EOS)
    whole = client.completions.create(**request)  # type: ignore[call-overload]
    chunks = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_completion(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "developer", "content": "Be kind."},
            {"role": "user", "content": "Another one?"},
        ],
        max_completion_tokens=8,
        temperature=0,
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage is not None and 0 < result.usage.completion_tokens <= 8


def test_streamed_chat_starts_with_the_role_and_ends_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        temperature=0,
        logit_bias=NO_EOS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_n_choices_are_indexed_prompt_major(client: openai.OpenAI) -> None:
    result = client.completions.create(model=MODEL, prompt=["Red", "Green"], n=2, max_tokens=4, logit_bias=NO_EOS)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage is not None and result.usage.completion_tokens == 16


def test_seeded_choices_differ_from_each_other(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt="Red", n=2, max_tokens=12, temperature=1.5, seed=5, logit_bias=NO_EOS
    )
    assert result.choices[0].text != result.choices[1].text


def test_more_generations_than_slots_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="hi", n=9, max_tokens=1)
    assert raised.value.param == "n"


def test_a_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    """Run alone, a seeded request gives the same text streamed and not; another seed differs."""
    request = dict(model=MODEL, prompt="Red", max_tokens=12, temperature=0.9, seed=7, logit_bias=NO_EOS)
    first = client.completions.create(**request).choices[0].text  # type: ignore[call-overload]
    second = client.completions.create(**request).choices[0].text  # type: ignore[call-overload]
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(**request, stream=True)  # type: ignore[call-overload]
        if chunk.choices
    )
    assert first == second == streamed
    others = {client.completions.create(**{**request, "seed": seed}).choices[0].text for seed in (8, 9, 10)}  # type: ignore[call-overload]
    assert others - {first}


def test_a_seeded_chat_repeats_with_every_sampling_parameter(client: openai.OpenAI) -> None:
    request = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=10,
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        seed=11,
        logit_bias=NO_EOS,
        extra_body={"top_k": 50, "min_p": 0.02, "repeat_penalty": 1.1},
    )
    first = client.chat.completions.create(**request).choices[0].message.content  # type: ignore[call-overload]
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(**request, stream=True)  # type: ignore[call-overload]
        if chunk.choices
    )
    assert first and first == streamed


def test_token_prompts_and_echo(client: openai.OpenAI) -> None:
    result = client.completions.create(model=MODEL, prompt=[2, 818, 5279], max_tokens=3, temperature=0, echo=True)
    assert result.choices[0].text.startswith("The")
    assert result.usage is not None and result.usage.prompt_tokens == 3


def test_chat_logprobs(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        logit_bias=NO_EOS,
    )
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob  # greedy picks the most likely token
    assert "".join(e.token for e in content) == result.choices[0].message.content


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=2, logit_bias=NO_EOS
    )
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs or []) == len(logprobs.top_logprobs or []) == 3
    assert logprobs.text_offset == [0, len(logprobs.tokens[0]), len(logprobs.tokens[0]) + len(logprobs.tokens[1])]


def test_stop_sequences_spanning_tokens_are_cut_cleanly(client: openai.OpenAI) -> None:
    request = dict(
        model=MODEL, prompt="A list of fruits: apple, banana,", max_tokens=16, temperature=0, logit_bias=NO_EOS
    )
    probe = client.completions.create(**request, logprobs=0)  # type: ignore[call-overload]
    tokens = probe.choices[0].logprobs.tokens
    # A stop made of the end of token 3 and the start of token 4 spans a token boundary.
    prefix = "".join(tokens[:3])
    stop = tokens[2][-1] + tokens[3][:1]
    expected = prefix[:-1] if prefix.find(stop) < 0 else prefix[: prefix.find(stop)]
    cut = client.completions.create(**request, stop=[stop, "never-generated"])  # type: ignore[call-overload]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == expected
    streamed = client.completions.create(**request, stop=stop, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_multibyte_text_is_never_split(client: openai.OpenAI) -> None:
    request = dict(model=MODEL, prompt="日本の首都は東京です。大阪は", max_tokens=24, temperature=0, logit_bias=NO_EOS)
    whole = client.completions.create(**request).choices[0].text  # type: ignore[call-overload]
    pieces = [c.choices[0].text for c in client.completions.create(**request, stream=True)]  # type: ignore[call-overload]
    assert "".join(pieces) == whole
    assert "\ufffd" not in whole
    assert any(ord(ch) > 127 for ch in whole)


def test_embeddings_float_and_base64_agree(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input=["a red apple", "a green pear"])
    assert [d.index for d in floats.data] == [0, 1]
    first = floats.data[0].embedding
    assert math.isclose(math.sqrt(sum(x * x for x in first)), 1.0, rel_tol=1e-4)
    assert floats.usage.prompt_tokens > 0
    raw = httpx.post(
        f"{client.base_url}embeddings",
        json={"model": MODEL, "input": "a red apple", "encoding_format": "base64"},
        timeout=60,
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert len(decoded) == len(first)
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(decoded, first, strict=True))


def test_embeddings_of_token_input(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input=[[2, 818, 5279], [2, 818]])
    assert len(result.data) == 2 and result.usage.prompt_tokens == 5


def test_errors_surface_as_the_clients_own_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-model", prompt="hi")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt=[818] * 5000, max_tokens=1)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"frobnicate": True})
    assert unknown.value.param == "frobnicate"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5000)
    assert too_many.value.code == "context_length_exceeded"


def test_unknown_routes_are_openai_errors(server: Server) -> None:
    response = httpx.get(f"{server.url}/v2/whatever", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_requests_gunicorn_refuses_get_error_objects_too(server: Server) -> None:
    """Too many headers never reach the app: gunicorn answers them, with an error object, not HTML."""
    headers = {f"X-Filler-{number}": "x" for number in range(200)}
    response = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=5)
    assert response.status_code == 431
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_an_oversized_chunked_body_is_413(server: Server) -> None:
    """A body with no Content-Length is cut off at ``max_request_bytes`` (8 MiB) and refused as too large."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "gemma-3-270m", "prompt": "'
        for _ in range(20):
            yield b"x" * (1 << 20)
        yield b'"}'

    response = httpx.post(
        f"{server.url}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_streaming_headers_stop_proxy_buffering(server: Server) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert lines[-1] == "data: [DONE]"
    # Every event is numbered, so that a resumable stream can be resumed after its last one read.
    assert lines[0::2] == [f"id: {n}" for n in range(1, len(lines) // 2 + 1)]
    assert all(line.startswith("data: ") for line in lines[1::2])
