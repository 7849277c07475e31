"""Loading and unloading models at runtime, as the admin API and ``llmserve models`` do it.

A load is checked before anything changes: its settings (the [model] defaults apply, as to a
[models.NAME] table), its file (it must exist; an embedded one is found or assembled), its name (not
served already) and the memory budget (every model's estimate together, see ``memory``). Then it is
written to the shared state file, and every worker loads it beside its running models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import ValidationError

from llmserve.engine.llama_model import LlamaError, read_shape
from llmserve.models import state
from llmserve.models.files import ModelFileError, path_of
from llmserve.models.memory import MemoryEstimate, estimate, over_budget
from llmserve.settings import MODEL_ID, AliasSettings, ModelSettings, Settings


class Refusal(StrEnum):
    INVALID = "invalid"
    EXISTS = "exists"
    NOT_FOUND = "not_found"
    OVER_BUDGET = "over_budget"


class ModelControlError(Exception):
    """A load or unload that was refused, and why."""

    def __init__(self, message: str, refusal: Refusal) -> None:
        super().__init__(message)
        self.refusal = refusal


@dataclass(frozen=True)
class DesiredModel:
    settings: ModelSettings
    source: Literal["configured", "loaded"]


class ModelControl:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = state.ModelState(settings.state_dir)

    def desired(self) -> dict[str, DesiredModel]:
        """The models every worker is to serve, and whether each came from the configuration."""
        try:
            changes = self.state.read()
        except state.ModelStateError as exc:
            raise ModelControlError(str(exc), Refusal.INVALID) from None
        return {
            name: DesiredModel(model, "loaded" if name in changes.added else "configured")
            for name, model in changes.desired(self.settings.models).items()
        }

    def load(self, name: str, fields: dict[str, Any]) -> ModelSettings:
        """Add model ``name`` with ``fields`` (ModelSettings' fields other than ``id``)."""
        try:
            model = self.settings.model_over_defaults(name, fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in exc.errors())
            raise ModelControlError(f"invalid model settings: {problems}", Refusal.INVALID) from None
        desired = {key: value.settings for key, value in self.desired().items()}
        if name in desired:
            raise ModelControlError(f"a model named {name!r} is served already; unload it first", Refusal.EXISTS)
        try:
            shape = read_shape(path_of(model, self.settings.cache_dir))
        except (ModelFileError, LlamaError) as exc:
            raise ModelControlError(str(exc), Refusal.INVALID) from None
        if self.budget is not None:
            estimates = {**self._estimates(desired), name: estimate(shape, model)}
            problem = over_budget(estimates, self.settings.workers, self.budget)
            if problem is not None:
                raise ModelControlError(f"model {name!r} not loaded: {problem}", Refusal.OVER_BUDGET)
        self._change(state.load(self.settings.models, model))
        return model

    def aliases(self) -> dict[str, AliasSettings]:
        try:
            return self.state.read().desired_aliases(self.settings.aliases)
        except state.ModelStateError as exc:
            raise ModelControlError(str(exc), Refusal.INVALID) from None

    def set_alias(self, name: str, alias: AliasSettings) -> None:
        """Route alias ``name`` as ``alias`` says, from every worker's next second on (blue-green: the canary
        at weight 100, then ``promote``)."""
        desired = self.desired()
        if name in desired or not re.match(MODEL_ID, name):
            raise ModelControlError(f"alias {name!r} must match {MODEL_ID} and not be a model's name", Refusal.INVALID)
        for role, model in (("stable", alias.stable), ("canary", alias.canary)):
            if model is not None and model not in desired:
                raise ModelControlError(f"the {role} model {model!r} is not served", Refusal.NOT_FOUND)
        self._change(state.set_alias(name, alias))

    def promote(self, name: str) -> AliasSettings:
        """Make the alias's canary its stable model, for every session at once."""
        alias = self.aliases().get(name)
        if alias is None:
            raise ModelControlError(f"no alias named {name!r}", Refusal.NOT_FOUND)
        if alias.canary is None:
            raise ModelControlError(f"alias {name!r} has no canary to promote", Refusal.INVALID)
        promoted = AliasSettings(stable=alias.canary)
        self._change(state.set_alias(name, promoted))
        return promoted

    def unload(self, name: str) -> None:
        if name not in self.desired():
            raise ModelControlError(f"no model named {name!r} is served", Refusal.NOT_FOUND)
        self._change(state.unload(self.settings.models, name))

    @property
    def budget(self) -> int | None:
        return self.settings.memory_budget_mib

    def estimates(self) -> dict[str, MemoryEstimate]:
        """The memory estimate of every desired model (each file's metadata is read)."""
        return self._estimates({key: value.settings for key, value in self.desired().items()})

    def _estimates(self, models: dict[str, ModelSettings]) -> dict[str, MemoryEstimate]:
        """Estimates of the models whose files can be read: one that cannot is not loaded anywhere."""
        estimates = {}
        for name, model in models.items():
            try:
                estimates[name] = estimate(read_shape(path_of(model, self.settings.cache_dir)), model)
            except (ModelFileError, LlamaError):
                continue
        return estimates

    def _change(self, change: state.Change) -> None:
        try:
            self.state.update(change)
        except state.ModelStateError as exc:
            raise ModelControlError(str(exc), Refusal.EXISTS) from None
