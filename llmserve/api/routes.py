"""Every blueprint of the HTTP API, registered on the app; the endpoints that use a model are metered."""

from __future__ import annotations

from flask import Flask

from llmserve.api import (
    admin,
    chat,
    completions,
    console,
    embeddings,
    health,
    instance,
    models,
    openapi,
    status,
    tenants,
    usage,
)
from llmserve.quotas import Quotas
from llmserve.tenancy import require_tenant

# Endpoints that use the model count against a tenant's requests per minute.
METERED = (completions.blueprint, chat.blueprint, embeddings.blueprint)
for _blueprint in METERED:
    _blueprint.before_request(require_tenant)  # an admin key is refused before any work is done


def init_app(app: Flask, quotas: Quotas, *, with_console: bool) -> None:
    for blueprint in METERED:
        quotas.requests(blueprint)
    for module in (models, completions, chat, embeddings, tenants, usage, admin, instance, status, health, openapi):
        app.register_blueprint(module.blueprint)
    if with_console:
        app.register_blueprint(console.blueprint)
