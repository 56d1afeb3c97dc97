"""Reading converted leaves ({our path: array}): a leaf's shape, the indices of numbered
modules, from which a layout's model is inferred."""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from detr_jax.convert.rules import Path


def shape(leaves: Mapping[Path, np.ndarray], *path: str) -> tuple[int, ...] | None:
    array = leaves.get(path)
    return None if array is None else array.shape


def indices(leaves: Mapping[Path, np.ndarray], parent: Path, pattern: str) -> list[tuple[str, ...]]:
    """Groups of `pattern` matched by the child names under `parent`, e.g. layer indices."""
    found = set()
    for path in leaves:
        if path[: len(parent)] == parent and len(path) > len(parent):
            match = re.fullmatch(pattern, path[len(parent)])
            if match:
                found.add(match.groups())
    return sorted(found, key=lambda g: tuple(int(x) for x in g))
