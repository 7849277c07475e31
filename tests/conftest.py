"""Fixtures shared by the fast tests: an app per test, its model never loaded."""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from flask import Flask
from flask.testing import FlaskClient

from llmserve.application import create_app
from llmserve.settings import Settings


def missing_service(reason: str) -> NoReturn:
    """A test that needs an outside program or service which is not there: skipped when pytest runs by
    hand, a failure under ``make test``, which set them all up (tests/services.sh)."""
    if os.environ.get("LLMSERVE_REQUIRE_SERVICES"):
        pytest.fail(f"{reason} (tests/services.sh should have provided it)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    yield create_app(Settings(cache_dir=tmp_path / "cache"))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
