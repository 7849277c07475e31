"""Turning chat messages into a prompt: the GGUF's own template, or the model family's turn format.

When a GGUF carries no template, llama-cpp-python falls back to a generic llama-2 format that produces
nothing useful for most models. Here the fallback is chosen explicitly: by ``chat_format`` in the
settings, or from the model's architecture, and a model with neither gets a clear error, never a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Gemma has no system role: the system text leads the first user turn, as Google's template does.
# Tool results come back as user turns (the embedded Gemma 3 270M has no tool format of its own).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set prefix = messages[0].content + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message.role == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message.content | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if not turns and prefix -%}{{ '<start_of_turn>user\n' + prefix | trim + '<end_of_turn>\n' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

FAMILY_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE}
ARCHITECTURE_FAMILIES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "qwen2": "chatml"}


class ChatFormatError(Exception):
    """The messages cannot be rendered with this model's format."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def _raise(message: str) -> None:
    raise ChatFormatError(message)


class ChatFormatter:
    """Renders messages with one Jinja template in a sandbox, as Hugging Face chat templates expect."""

    def __init__(self, template: str, *, name: str, bos_token: str, eos_token: str) -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        self.name = name
        self._template = environment.from_string(template)
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(self, messages: Sequence[Message]) -> str:
        payload: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(
                messages=payload,
                add_generation_prompt=True,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except TemplateError as exc:
            raise ChatFormatError(f"the {self.name} chat template rejected these messages: {exc}") from exc


def select_template(chat_format: str, gguf_template: str | None, architecture: str | None) -> tuple[str, str] | None:
    """Pick (name, template) for the configured ``chat_format``; None when the model has no chat format."""
    if chat_format in FAMILY_TEMPLATES:
        return chat_format, FAMILY_TEMPLATES[chat_format]
    if gguf_template:
        return "gguf", gguf_template
    if chat_format == "gguf":
        raise ChatFormatError("chat_format is 'gguf' but the model file carries no chat template")
    family = ARCHITECTURE_FAMILIES.get(architecture or "")
    return (family, FAMILY_TEMPLATES[family]) if family else None
