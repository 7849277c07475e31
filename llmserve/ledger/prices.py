"""Prices per model, versioned, so that every record says which prices its cost came from.

Configured in TOML as::

    [prices]
    version = "2026-11"

    [prices.models."*"]          # every model without its own entry
    prompt_per_1k = 0.10
    completion_per_1k = 0.40
    engine_second = 0.0

A model with neither its own entry nor a ``"*"`` entry costs nothing (it is unpriced, not an error):
a server without ``[prices]`` still keeps a ledger of usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmserve.ledger.records import UsageRecord

DEFAULT_MODEL = "*"


class ModelPrice(BaseModel):
    """One model's prices; cached prompt tokens are prompt tokens and cost the same."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_per_1k: float = Field(0.0, ge=0, description="Price of 1000 prompt tokens.")
    completion_per_1k: float = Field(0.0, ge=0, description="Price of 1000 completion tokens.")
    engine_second: float = Field(0.0, ge=0, description="Price of one second of engine time.")


class PriceSettings(BaseModel):
    """The ``[prices]`` table of the settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(
        "unpriced", min_length=1, max_length=64, description="Recorded with every cost; change it with the prices."
    )
    models: dict[str, ModelPrice] = Field(
        default_factory=dict, description='Prices by model id; "*" for every model not listed.'
    )


class PriceTable:
    """Computes a request's cost from its tokens and engine time."""

    def __init__(self, settings: PriceSettings) -> None:
        self.settings = settings

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PriceTable:
        return cls(PriceSettings.model_validate(values))

    @property
    def version(self) -> str:
        return self.settings.version

    def price_of(self, model: str) -> ModelPrice:
        models = self.settings.models
        return models.get(model) or models.get(DEFAULT_MODEL) or ModelPrice()

    def cost_of(self, model: str, prompt_tokens: int, completion_tokens: int, engine_seconds: float) -> float:
        price = self.price_of(model)
        return (
            prompt_tokens * price.prompt_per_1k / 1000
            + completion_tokens * price.completion_per_1k / 1000
            + engine_seconds * price.engine_second
        )

    def priced(self, record: UsageRecord) -> UsageRecord:
        """The record with its cost and this table's version filled in."""
        cost = self.cost_of(record.model, record.prompt_tokens, record.completion_tokens, record.engine_seconds)
        return replace(record, cost=cost, price_version=self.version)
