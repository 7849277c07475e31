"""Fixtures shared by the fast tests: an app per test, its model never loaded."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from llmserve.application import create_app
from llmserve.settings import Settings


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    yield create_app(Settings(cache_dir=tmp_path / "cache"))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
