"""The WSGI entry point gunicorn loads in each worker: ``app.py:app``."""

from llmserve.application import create_app

app = create_app()
