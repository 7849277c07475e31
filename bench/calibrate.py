"""Calibrate the simulated backend: time llama.cpp's decode steps on this host and fit the step-time model.

Decodes, with one of the embedded models (or any GGUF), steps of ``k`` sequences generating one token
each (k = 1, 2, 4, 8, 16, every sequence holding a 64-token prompt) and prefill chunks of ``n`` prompt
tokens (n = 32 ... 512), and fits ``seconds = step_seconds + sequence_seconds * k +
prompt_token_seconds * n`` by least squares on the median of each case. Prints the fit as the
``[model.simulation]`` table to paste into a configuration, and the measured and fitted times::

    .venv/bin/python bench/calibrate.py --embedded gemma-3-270m --threads 2
    .venv/bin/python bench/calibrate.py --path /models/other.gguf --threads 8 --json docs/calibration.json

Only the decode is timed: sampling, scheduling and streaming stay real on the simulated backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from llmserve.engine.llama_model import LlamaContext, LlamaModel
from llmserve.models.files import locate
from llmserve.settings import EMBEDDED_MODELS, ModelSettings

SEQUENCES = (1, 2, 4, 8, 16)
CHUNKS = (32, 64, 128, 256, 512)
PROMPT_TOKENS = 64


def timed_decode(context: LlamaContext) -> float:
    started = time.perf_counter()
    context.decode()
    return time.perf_counter() - started


def decode_steps(context: LlamaContext, sequences: int, repeats: int) -> float:
    """Median seconds of a step of ``sequences`` one-token rows, each sequence past a 64-token prompt."""
    context.clear()
    for sequence in range(sequences):
        context.clear_batch()
        for position in range(PROMPT_TOKENS):
            context.add(1000 + position, position, sequence, position == PROMPT_TOKENS - 1)
        context.decode()
    times = []
    for step in range(repeats):
        context.clear_batch()
        for sequence in range(sequences):
            context.add(2000 + step, PROMPT_TOKENS + step, sequence, True)
        times.append(timed_decode(context))
    return statistics.median(times)


def prefill_chunks(context: LlamaContext, tokens: int, repeats: int) -> float:
    """Median seconds of decoding a ``tokens``-token prompt chunk of a fresh sequence."""
    times = []
    for _ in range(repeats):
        context.clear()
        context.clear_batch()
        for position in range(tokens):
            context.add(1000 + position, position, 0, position == tokens - 1)
        times.append(timed_decode(context))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--embedded", choices=EMBEDDED_MODELS, default="gemma-3-270m")
    source.add_argument("--path", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, help="also write the measurements and the fit here")
    args = parser.parse_args()

    settings = ModelSettings(path=args.path) if args.path else ModelSettings(embedded=args.embedded)
    path = locate(settings, Path.home() / ".cache" / "llmserve").path
    model = LlamaModel(path, gpu_layers=0)
    context = LlamaContext(
        model, n_ctx=max(CHUNKS) * max(SEQUENCES), n_batch=512, n_seq_max=max(SEQUENCES), threads=args.threads
    )
    context.clear_batch()
    context.add(1, 0, 0, True)
    context.decode()  # the first decode allocates
    cases: list[tuple[int, int, float]] = []  # (sequences, prompt tokens, seconds)
    for sequences in SEQUENCES:
        cases.append((sequences, 0, decode_steps(context, sequences, args.repeats)))
    for tokens in CHUNKS:
        cases.append((0, tokens, prefill_chunks(context, tokens, args.repeats)))
    context.close()

    design = np.array([[1.0, k, n] for k, n, _ in cases])
    measured = np.array([seconds for _, _, seconds in cases])
    fit, *_ = np.linalg.lstsq(design, measured, rcond=None)
    step, sequence, prompt_token = (max(0.0, float(value)) for value in fit)
    print(f"# {path.name}, {args.threads} threads: measured and fitted step times")
    for (k, n, seconds), fitted in zip(cases, design @ fit, strict=True):
        kind = f"{k:3d} sequences" if k else f"{n:3d} prompt tokens"
        print(f"#   {kind}: {seconds * 1000:7.2f} ms measured, {fitted * 1000:7.2f} ms fitted")
    print("[model.simulation]")
    print(f"step_seconds = {step:.5f}")
    print(f"sequence_seconds = {sequence:.5f}")
    print(f"prompt_token_seconds = {prompt_token:.6f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": path.name,
                    "threads": args.threads,
                    "cases": [{"sequences": k, "prompt_tokens": n, "seconds": s} for k, n, s in cases],
                    "fit": {"step_seconds": step, "sequence_seconds": sequence, "prompt_token_seconds": prompt_token},
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
