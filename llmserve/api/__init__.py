"""The HTTP API: OpenAI-compatible endpoints plus health probes."""

from __future__ import annotations

from flask import Flask

from llmserve.api import chat, completions, embeddings, health, models


def init_app(app: Flask) -> None:
    for module in (models, completions, chat, embeddings, health):
        app.register_blueprint(module.blueprint)
