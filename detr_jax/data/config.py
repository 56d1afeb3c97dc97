"""Defaults of the `data` config section."""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    """COCO-size defaults; `configs/synthetic_tiny.py` overrides them with small ones."""
    return ml_collections.ConfigDict(
        dict(
            dataset="synthetic",
            max_boxes=100,
        )
    )
