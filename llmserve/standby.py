"""Warm standby: an instance whose models are loaded and warm, that the balancers give no new requests
until it is activated, so that the first step of a scale-up takes seconds rather than a model load.

``standby = true`` starts the instance in standby; ``POST /v1/admin/activate`` or ``llmserve activate``
lets traffic in, ``POST /v1/admin/standby`` or ``llmserve standby`` takes it out again. The state is one
flag file, ``state_dir/standby/HOST``, which the master's agent check reads: while it exists, the agent
answers ``up drain`` however ready the models are (``agent.instance_load``). It is named by host, as the
workers' status files are, so replicas that share a state directory each have their own.
"""

from __future__ import annotations

import socket
from pathlib import Path

STANDBY_DIR = "standby"


class Standby:
    """The standby flag of this host's instance."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STANDBY_DIR / socket.gethostname()

    @property
    def on(self) -> bool:
        return self.path.exists()

    def set(self, on: bool) -> bool:
        """Enter (``True``) or leave standby; whether that changed anything."""
        was = self.on
        if on:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        else:
            self.path.unlink(missing_ok=True)
        return was != on
