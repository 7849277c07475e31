"""The app factory: one Flask app per call, each subsystem plugged in with ``init_app``."""

from __future__ import annotations

from flask import Flask

from llmserve import auth, errors, metrics, request_context, requestlog
from llmserve.accounting import Accounting
from llmserve.api import resume, routes
from llmserve.lifecycle import InFlight
from llmserve.models.registry import ModelRegistry
from llmserve.proxies import TrustedProxies, networks
from llmserve.quotas import Quotas
from llmserve.settings import EXTENSION as SETTINGS_EXTENSION
from llmserve.settings import Settings, load_settings
from llmserve.tenancy import Tenancy


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app. No model is loaded here: ``ModelRegistry.start`` does that in the worker."""
    settings = settings or load_settings()
    app = Flask("llmserve", static_folder=None)  # no static files: every route is an API route
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions[SETTINGS_EXTENSION] = settings
    request_context.init_app(app)  # first: every later hook finds the request's context
    errors.init_app(app)
    requestlog.init_app(app)
    InFlight().init_app(app)
    tenancy = Tenancy(settings)
    tenancy.init_app(app)
    auth.init_app(app)  # before the quotas: they are counted per tenant
    quotas = Quotas(settings)
    quotas.init_app(app)
    llm_metrics = metrics.init_app(app, settings)
    Accounting(settings, llm_metrics).init_app(app)
    ModelRegistry(settings, llm_metrics, tenancy).init_app(app)
    routes.init_app(app, quotas, with_console=settings.console)
    resume.init_app(app, settings)
    if settings.trusted_proxies:
        app.wsgi_app = TrustedProxies(app.wsgi_app, networks(settings.trusted_proxies))  # type: ignore[method-assign]
    return app
