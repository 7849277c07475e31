"""The quality gate a canary passes before it gets any traffic: a golden set, scored on it and on stable.

A golden set is a JSON Lines file, one case per line: a ``prompt`` (a completion) or ``messages`` (a
chat), and what a good answer holds: ``expect`` (a substring) and/or ``match`` (a regular expression,
searched). Each case runs greedy (temperature 0) with at most ``max_tokens`` tokens, on the canary and on
the stable model, through their engines like any request. The canary passes when its score (the share
of cases answered well) is at least stable's minus ``canary.golden_margin``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmserve.api.runner import Choice, GenerationRun
from llmserve.chat_format import Message
from llmserve.engine.jobs import GenerationSpec, SamplingParams
from llmserve.models.served import ServedModel

ADMISSION_TIMEOUT = 120.0  # seconds a case may wait for a slot


class GoldenCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    expect: str | None = None
    match: str | None = None
    max_tokens: int = Field(32, ge=1, le=4096)

    @model_validator(mode="after")
    def _one_input_and_a_check(self) -> GoldenCase:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a golden case has either prompt or messages")
        if self.expect is None and self.match is None:
            raise ValueError("a golden case needs expect or match")
        if self.match is not None:
            re.compile(self.match)
        return self

    def passes(self, answer: str) -> bool:
        if self.expect is not None and self.expect not in answer:
            return False
        return self.match is None or re.search(self.match, answer) is not None


class GoldenSetError(Exception):
    """The golden set cannot be read."""


def read_cases(path: Path) -> list[GoldenCase]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise GoldenSetError(f"cannot read the golden set {path}: {exc.strerror}") from None
    cases = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            cases.append(GoldenCase.model_validate_json(line))
        except (ValidationError, re.error) as exc:
            raise GoldenSetError(f"{path}:{number}: not a golden case: {exc}") from None
    if not cases:
        raise GoldenSetError(f"the golden set {path} holds no case")
    return cases


@dataclass(frozen=True)
class Score:
    passed: int
    total: int
    failed_cases: tuple[int, ...]  # line order, from 0

    @property
    def share(self) -> float:
        return self.passed / self.total


def score(model: ServedModel, cases: list[GoldenCase], heartbeat: float) -> Score:
    """Run every case on ``model``, one after another, greedy; waits on the engine, never blocks the hub."""
    failed = []
    for index, case in enumerate(cases):
        if not case.passes(_answer(model, case, heartbeat)):
            failed.append(index)
    return Score(len(cases) - len(failed), len(cases), tuple(failed))


def _answer(model: ServedModel, case: GoldenCase, heartbeat: float) -> str:
    if case.messages is not None:
        messages = [Message(role=m["role"], content=m["content"]) for m in case.messages]
        prompt = model.tokenize(model.render_chat(messages), add_special=False)
    else:
        prompt = model.tokenize(case.prompt or "", add_special=True)
    budget = min(case.max_tokens, model.settings.context_length - len(prompt) - 1)
    spec = GenerationSpec(tuple(prompt), max(1, budget), SamplingParams(temperature=0.0))
    run = GenerationRun(
        model.engine,
        [Choice(0, spec, ())],
        tenant="golden-set",
        heartbeat=heartbeat,
        admission_timeout=ADMISSION_TIMEOUT,
    )
    try:
        run.admit()
        return "".join(update.delta.text for update in run.updates() if update is not None)
    finally:
        run.close()
