"""A table of objectives turned into its config section and its weighted total.

A table maps an objective's name to a class with a `Config` (an `ObjectiveConfig` subclass, so it has a
non-negative `weight`; weight 0 switches the objective off). `objectives_section` builds the pydantic
section with one sub-section per table entry, in table order, refusing an all-zero configuration;
`weighted_total` sums weight x term for the terms an objective returned (named after it, or
"<objective>.<part>" when it has several: each part gets the weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, Field, create_model, model_validator

from medssl.config import StrictModel


def objectives_section(name: str, table: Mapping[str, Any], doc: str) -> type[BaseModel]:
    """The config section of `table` (one `<entry>` sub-section per objective, with its defaults)."""

    class Section(StrictModel):
        @model_validator(mode="after")
        def _something_to_train(self):
            if not self.active():
                raise ValueError("every objective weight is 0: set at least one weight > 0")
            return self

        def active(self) -> tuple[str, ...]:
            """Names of the objectives with a positive weight, in table order."""
            return tuple(entry for entry in table if getattr(self, entry).weight > 0)

    fields = {entry: (objective.Config, Field(default_factory=objective.Config)) for entry, objective in table.items()}
    section = create_model(name, __base__=Section, **fields)
    section.__doc__ = doc
    return section


def weighted_total(terms: Mapping[str, torch.Tensor], section: BaseModel, table: Mapping[str, Any]) -> torch.Tensor:
    """Sum of weight x term in float32 (weight-0 terms are skipped, so a NaN there cannot leak). An unknown
    objective name or nothing with a positive weight is a ValueError (a programming error)."""
    weighted = []
    for key, value in terms.items():
        entry = key.split(".", 1)[0]
        if entry not in table:
            raise ValueError(f"total_loss: unknown objective term {key!r}; known: {', '.join(table)}")
        weight = getattr(section, entry).weight
        if weight > 0:
            weighted.append(weight * value.float())
    if not weighted:
        raise ValueError(f"total_loss: no term with a positive weight among {sorted(terms)}")
    return torch.stack(weighted).sum()
