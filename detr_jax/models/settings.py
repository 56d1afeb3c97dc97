"""A detector's own settings from `model.transformer_args`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def transformer_settings(model_config, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`model.transformer_args` over `defaults`, the settings the detector has beyond the
    shared model fields ({} for DETR, Conditional and DAB-DETR; Deformable DETR's
    with_box_refine, two_stage, ...). A key the detector lacks is a ValueError naming it."""
    args = dict(model_config.transformer_args)
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        has = ", ".join(sorted(defaults)) if defaults else "none"
        raise ValueError(f"model.transformer_args: {', '.join(unknown)} not among this detector's settings "
                         f"({has})")
    return {**defaults, **args}
