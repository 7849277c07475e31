"""The ``[ledger]`` table of the settings: where usage is stored, how often it is written and backed up."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

LEDGER_FILE = "ledger.db"
BACKUP_DIR = "backups"


def default_url(state_dir: Path) -> str:
    """A SQLite file in the state directory: no database server needed."""
    return f"sqlite:///{state_dir / LEDGER_FILE}"


class LedgerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Keep the ledger; off: usage is counted in the metrics only.")
    url: str | None = Field(
        None,
        description="SQLAlchemy URL (sqlite:///PATH or postgresql+psycopg://...); empty: STATE_DIR/ledger.db.",
    )
    flush_interval: float = Field(
        0.5, gt=0, le=60, description="Seconds between batched writes; a kill -9 loses at most this much usage."
    )
    backup_dir: Path | None = Field(None, description="SQLite backups; empty: STATE_DIR/backups.")
    backup_interval: float = Field(
        15, ge=0, le=7 * 24 * 60, description="Minutes between SQLite backups; 0: none (PostgreSQL: use pg_dump)."
    )
    backup_keep: int = Field(96, ge=1, le=100_000, description="Newest backups kept; older ones are deleted.")
    offsite_dir: Path | None = Field(
        None,
        description="A second location every backup is copied to, with the key file (another host's mount, or a "
        "directory rsync or rclone ships off the host); empty: none.",
    )

    def resolved_url(self, state_dir: Path) -> str:
        return self.url or default_url(state_dir)

    def resolved_backup_dir(self, state_dir: Path) -> Path:
        return self.backup_dir or state_dir / BACKUP_DIR
