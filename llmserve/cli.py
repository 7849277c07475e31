"""The ``llmserve`` command. Its options are generated from the settings model, so they never drift.

Options become ``LLMSERVE_*`` environment variables before gunicorn starts, so the master (through
``gunicorn.conf.py``) and every worker read the same settings through the same loader.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from pydantic.fields import FieldInfo

from llmserve.settings import CONFIG_ENV_VAR, ENV_PREFIX, ModelSettings, Settings, SettingsError, load_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _option_for(name: str, field: FieldInfo, env_name: str) -> click.Option:
    """A string option; pydantic validates it later with the same rules as the environment variable."""
    return click.Option(
        [f"--{name.replace('_', '-')}", name],
        default=None,
        help=f"{field.description} [env {env_name}]",
    )


def _settings_options() -> list[tuple[click.Option, str]]:
    options = []
    for name, field in Settings.model_fields.items():
        if name == "model":
            continue
        env_name = ENV_PREFIX + name.upper()
        options.append((_option_for(name, field, env_name), env_name))
    for name, field in ModelSettings.model_fields.items():
        env_name = f"{ENV_PREFIX}MODEL__{name.upper()}"
        options.append((_option_for(f"model_{name}", field, env_name), env_name))
    return options


SETTINGS_OPTIONS = _settings_options()


def _apply(config: Path | None, values: dict[str, Any]) -> Settings:
    """Export the given options as environment variables and load the settings they make."""
    if config is not None:
        os.environ[CONFIG_ENV_VAR] = str(config.resolve())
    for option, env_name in SETTINGS_OPTIONS:
        value = values.get(option.name or "")
        if value is not None:
            os.environ[env_name] = value
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _with_settings_options(command: click.Command) -> click.Command:
    command.params.extend(option for option, _ in SETTINGS_OPTIONS)
    return command


_config_option = click.option(
    "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="TOML settings file."
)


@click.group()
def main() -> None:
    """An OpenAI-compatible server for llama.cpp models."""


@_with_settings_options
@main.command()
@_config_option
def serve(config: Path | None, **values: Any) -> None:
    """Run the server under gunicorn with gevent workers."""
    _apply(config, values)
    os.chdir(PROJECT_ROOT)
    argv = [sys.executable, "-m", "gunicorn", "--config", str(PROJECT_ROOT / "gunicorn.conf.py")]
    os.execv(sys.executable, argv)


@_with_settings_options
@main.command()
@_config_option
def config(config: Path | None, **values: Any) -> None:
    """Validate the settings and print them as JSON."""
    settings = _apply(config, values)
    click.echo(json.dumps(settings.model_dump(mode="json"), indent=2))
