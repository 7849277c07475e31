"""The ``llmserve`` command. Its options are generated from the settings model, so they never drift.

Options become ``LLMSERVE_*`` environment variables before gunicorn starts, so the master (through
``gunicorn.conf.py``) and every worker read the same settings through the same loader.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import click
from pydantic.fields import FieldInfo

from llmserve.keys import KeyStore, KeyStoreError
from llmserve.ledger import backup as backups
from llmserve.ledger import report
from llmserve.ledger.settings import default_url
from llmserve.ledger.store import Ledger, LedgerUnavailable, open_ledger
from llmserve.models.control import ModelControl, ModelControlError
from llmserve.models.files import ModelFileError, locate
from llmserve.models.manifest import ManifestEntry, write_manifest
from llmserve.models.memory import MIB
from llmserve.models.state import worker_statuses
from llmserve.settings import CONFIG_ENV_VAR, ENV_PREFIX, ModelSettings, Settings, SettingsError, load_settings
from llmserve.standby import Standby
from llmserve.tenancy import open_key_store

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Settings that are tables in the TOML file rather than single values; the model's fields get options of
# their own, tenants, the ledger and prices are configured in the file (or the environment) only.
TABLE_FIELDS = frozenset({"model", "tenants", "ledger", "prices"})


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
        if name in TABLE_FIELDS:
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
@click.option("--quiet", is_flag=True, help="Only validate: print nothing, exit 1 with the reason if invalid.")
def config(config: Path | None, quiet: bool, **values: Any) -> None:
    """Validate the settings and print them as JSON."""
    settings = _apply(config, values)
    if not quiet:
        click.echo(json.dumps(settings.model_dump(mode="json"), indent=2))


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (stored hashed: in the state directory, or with key_store = "ledger"
    in the ledger's database that every replica shares)."""


def _key_store(config: Path | None) -> tuple[Settings, KeyStore]:
    settings = _apply(config, {})
    try:
        return settings, open_key_store(settings)
    except KeyStoreError as exc:
        raise click.ClickException(str(exc)) from None


@keys.command("create")
@_config_option
@click.option("--tenant", help="The configured tenant the key belongs to.")
@click.option("--admin", is_flag=True, help="An admin key instead: admin endpoints, no model use.")
def create_key(config: Path | None, tenant: str | None, admin: bool) -> None:
    """Create a key and print it once; only its hash is kept."""
    settings, store = _key_store(config)
    if admin == (tenant is not None):
        raise click.UsageError("give either --tenant NAME or --admin")
    if tenant is not None and tenant not in settings.tenants:
        known = ", ".join(sorted(settings.tenants)) or "none"
        raise click.ClickException(f"no tenant {tenant!r} is configured (configured: {known})")
    try:
        record, key = store.create(tenant, admin=admin)
    except KeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(key)
    click.echo(
        f"key id {record.id} for {'admin' if admin else 'tenant ' + str(tenant)}; it is not shown again", err=True
    )


@keys.command("list")
@_config_option
def list_keys(config: Path | None) -> None:
    """List keys: id, owner, created, revoked."""
    _, store = _key_store(config)
    try:
        records = store.list()
    except KeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    for record in records:
        owner = "admin" if record.admin else f"tenant={record.tenant}"
        click.echo(f"{record.id}  {owner}  created={record.created}  revoked={record.revoked or '-'}")


@keys.command("revoke")
@_config_option
@click.argument("key_id")
def revoke_key(config: Path | None, key_id: str) -> None:
    """Revoke a key by id; every worker refuses it from its next request on."""
    _, store = _key_store(config)
    try:
        store.revoke(key_id)
    except KeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {key_id}")


@main.group()
def models() -> None:
    """List, load and unload the served models while the server runs (every worker follows within a
    second or two; the changes persist across restarts in the state directory)."""


# The options of a model to load: every model setting but its id, which is the command's argument.
MODEL_OPTIONS = [
    click.Option([f"--{name.replace('_', '-')}", name], default=None, help=field.description)
    for name, field in ModelSettings.model_fields.items()
    if name != "id"
]


def _control(config: Path | None) -> ModelControl:
    return ModelControl(_apply(config, {}))


@models.command("list")
@_config_option
def list_models(config: Path | None) -> None:
    """The models to serve: id, where each came from, its file and its estimated memory."""
    control = _control(config)
    try:
        desired, estimates = control.desired(), control.estimates()
    except ModelControlError as exc:
        raise click.ClickException(str(exc)) from None
    workers = control.settings.workers
    for name, entry in desired.items():
        model = entry.settings
        source = str(model.path) if model.path else f"embedded {model.embedded or 'gemma-3-270m'}"
        memory = f"{estimates[name].total(workers) / MIB:.0f} MiB" if name in estimates else "unreadable file"
        click.echo(f"{name}  {entry.source}  {source}  ~{memory} with {workers} worker(s)")
    if control.budget is not None:
        click.echo(f"memory budget: {control.budget} MiB")


def _load_model(config: Path | None, name: str, **values: str | None) -> None:
    """Load model NAME beside the running ones; unset options take the [model] defaults."""
    control = _control(config)
    fields = {key: value for key, value in values.items() if value is not None}
    try:
        model = control.load(name, fields)
    except ModelControlError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"loading {model.id}: every worker loads it and serves it once warm (llmserve models status)")


load_model = click.Command(
    "load",
    callback=_load_model,
    params=[*_config_option(click.Command("x")).params, click.Argument(["name"]), *MODEL_OPTIONS],
    help=_load_model.__doc__,
)
models.add_command(load_model)


@models.command("unload")
@_config_option
@click.argument("name")
def unload_model(config: Path | None, name: str) -> None:
    """Unload model NAME: new requests for it get 404 at once, running ones finish first."""
    try:
        _control(config).unload(name)
    except ModelControlError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"unloading {name}")


@models.command("manifest")
@_config_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write it here; default: print it.")
def models_manifest(config: Path | None, out: Path | None) -> None:
    """The configured models' files with their SHA-256, as JSON: give it to a replica as model_manifest,
    and it refuses a copied file that differs. Reads every file (a hash is remembered per file)."""
    settings = _apply(config, {})
    entries = {}
    for name, model in settings.models.items():
        try:
            found = locate(model, settings.cache_dir)
        except ModelFileError as exc:
            raise click.ClickException(str(exc)) from None
        entries[name] = ManifestEntry(found.path.name, found.path.stat().st_size, found.sha256)
    text = write_manifest(entries)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}: {len(entries)} models")


@models.command("status")
@_config_option
def models_status(config: Path | None) -> None:
    """Each running worker's models and their state (loading, ready, failed, unloading)."""
    settings = _apply(config, {})
    statuses = worker_statuses(settings.state_dir)
    if not statuses:
        raise click.ClickException(f"no running worker reports to {settings.state_dir}")
    for status in statuses:
        served = ", ".join(f"{name}={model['status']}" for name, model in status["models"].items())
        click.echo(f"worker {status['pid']}: {served or 'no models'}")


def _ledger(settings: Settings) -> Ledger:
    try:
        return open_ledger(settings.ledger.resolved_url(settings.state_dir))
    except LedgerUnavailable as exc:
        raise click.ClickException(str(exc)) from None


def _moment(context: click.Context, parameter: click.Parameter, value: str | None) -> datetime | None:
    try:
        return None if value is None else report.parse_moment(value)
    except ValueError:
        raise click.BadParameter(f"expected an ISO 8601 time or unix seconds, got {value!r}") from None


@main.group()
def usage() -> None:
    """Usage and cost from the ledger."""


@usage.command("report")
@_config_option
@click.option("--tenant", help="Only this tenant.")
@click.option("--model", help="Only this model.")
@click.option("--since", callback=_moment, help="Requests that started at or after this time (ISO 8601, unix s).")
@click.option("--until", callback=_moment, help="Requests that started before this time.")
@click.option("--group-by", type=click.Choice(["day", "hour"]), default="day", show_default=True, help="UTC periods.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
def usage_report(
    config: Path | None,
    tenant: str | None,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    group_by: Literal["day", "hour"],
    fmt: report.Format,
) -> None:
    """Requests, tokens, engine time and cost per period, tenant and model. A running server writes its
    records every ledger.flush_interval seconds: the newest requests may be missing for that long."""
    settings = _apply(config, {})
    ledger = _ledger(settings)
    try:
        rows = ledger.query(tenant=tenant, model=model, since=since, until=until, group_by=group_by)
    finally:
        ledger.close()
    click.echo(report.render(rows, fmt), nl=False)


@main.command()
@_config_option
def activate(config: Path | None) -> None:
    """Leave warm standby: the balancers send this host's instance traffic again."""
    click.echo("activated" if _switch_standby(config, False) else "not in standby")


@main.command()
@_config_option
def standby(config: Path | None) -> None:
    """Enter warm standby: the balancers send no new traffic; the models stay loaded and warm."""
    click.echo("in standby" if _switch_standby(config, True) else "already in standby")


def _switch_standby(config: Path | None, on: bool) -> bool:
    return Standby(_apply(config, {}).state_dir).set(on)


@main.command()
@_config_option
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write it; default: ledger.backup_dir (STATE_DIR/backups).",
)
def backup(config: Path | None, directory: Path | None) -> None:
    """Back up the SQLite ledger now, while the server runs; prints the backup's path. (A PostgreSQL ledger
    is backed up with pg_dump or the database's own backups.)"""
    settings = _apply(config, {})
    ledger = Ledger.open(settings.ledger.resolved_url(settings.state_dir), migrate=False)
    try:
        if ledger.sqlite_path is not None and not ledger.sqlite_path.is_file():
            raise click.ClickException(f"there is no ledger at {ledger.sqlite_path} to back up")
        path = backups.backup(ledger, directory or settings.ledger.resolved_backup_dir(settings.state_dir))
    except backups.BackupError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        ledger.close()
    click.echo(path)


@main.command()
@_config_option
@click.argument("backup_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def restore(config: Path | None, backup_file: Path) -> None:
    """Replace the ledger in the state directory with BACKUP_FILE, once its checksum and contents check
    out. Stop the server first: the command refuses while one runs on the state directory."""
    settings = _apply(config, {})
    state_dir = settings.state_dir
    if settings.ledger.url not in (None, default_url(state_dir)):
        raise click.ClickException(
            "restore replaces the default ledger file STATE_DIR/ledger.db, but ledger.url names another "
            "database: restore that one with its own tools (for SQLite, copy a verified backup over it)"
        )
    try:
        target = backups.restore(backup_file, state_dir)
    except backups.BackupError as exc:
        raise click.ClickException(str(exc)) from None
    ledger = _ledger(settings)  # brings a backup taken by an older version up to the current schema
    try:
        count = ledger.count()
    finally:
        ledger.close()
    click.echo(f"restored {target} from {backup_file} (checksum verified): {count} usage records")
