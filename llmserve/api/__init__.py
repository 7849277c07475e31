"""The HTTP API: OpenAI-compatible endpoints, tenant views, usage, model administration and health probes.

Importing a module of the package loads nothing else: the blueprints are gathered in ``routes``.
"""
