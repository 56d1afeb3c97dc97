"""Tensors -> Flax leaves: every tensor of a state dict mapped by its layout's rules (conv
kernels OIHW -> HWIO, linear weights transposed, fused q/k/v split, BatchNorm statistics,
a ViT's tokens and position grid), with what could not be mapped."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from detr_jax.convert.layouts import MODULE_RESOLVERS, PARAMETER_RESOLVERS, TIED_COPIES
from detr_jax.convert.rules import IGNORED, Module, Path
from detr_jax.convert.vit import VIT

_LEAF_NAMES = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "layernorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "groupnorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "bn": {
        "weight": ("frozen_bn", "scale"), "bias": ("frozen_bn", "bias"),
        "running_mean": ("frozen_bn", "mean"), "running_var": ("frozen_bn", "var"),
    },
    "batchnorm": {
        "weight": ("params", "scale"), "bias": ("params", "bias"),
        "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
    },
}


def _square_side(n: int) -> int | None:
    side = int(round(n**0.5))
    return side if side > 0 and side * side == n else None


def _map_pos_embed(module: Module, value: np.ndarray, num_prefix_tokens: int) -> list[tuple[Path, np.ndarray]] | str:
    """[1, P + g*g, E] -> prefix_pos_embed [P, E] and the pos_embed grid [g, g, E] (row-major).
    With P prefix tokens but only g*g rows (timm's no_embed_class: the prefix tokens get no
    position embedding), prefix_pos_embed is zeros."""
    if value.ndim != 3 or value.shape[0] != 1:
        return f"expected position embeddings [1, P + N, E], got shape {value.shape}"
    rows, width = value.shape[1:]
    side = _square_side(rows - num_prefix_tokens) if rows > num_prefix_tokens else None
    prefix = value[0, :num_prefix_tokens]
    if side is None and num_prefix_tokens and _square_side(rows):
        side, prefix = _square_side(rows), np.zeros((num_prefix_tokens, width), value.dtype)
    if side is None:
        return (f"{rows} positions are not {num_prefix_tokens} prefix tokens + a square grid of patches "
                "(non-square position grids are not supported)")
    leaves = [(("params",) + module.path + ("pos_embed",), value[0, -side * side:].reshape(side, side, width))]
    if num_prefix_tokens:
        leaves.append((("params",) + module.path + ("prefix_pos_embed",), prefix))
    return leaves


def _map_tensor(module: Module, param: str, value: np.ndarray,
                num_prefix_tokens: int = 0) -> list[tuple[Path, np.ndarray]] | str:
    """The Flax leaves of one PyTorch tensor, or a string saying why it cannot be mapped.
    num_prefix_tokens: the ViT's class/distillation/register tokens (kind "pos_embed")."""
    if module.kind == "unsupported":
        return module.path[0]
    if module.kind == "prefix_token":
        if value.ndim != 3 or value.shape[0] != 1:
            return f"expected a token [1, n, E], got shape {value.shape}"
        return [(("params",) + module.path, value[0])]
    if module.kind == "pos_embed":
        return _map_pos_embed(module, value, num_prefix_tokens)
    if module.kind == "parameter":
        return [(("params",) + module.path, value)]
    if module.kind == "embedding":
        if param != "weight":
            return f"unknown parameter {param!r} of an embedding"
        return [(("params",) + module.path, value)]
    if module.kind == "fused_qkv":
        fused = {"in_proj_weight": "kernel", "in_proj_bias": "bias", "weight": "kernel", "bias": "bias"}
        if param not in fused:
            return f"unknown parameter {param!r} of a fused attention"
        leaf = fused[param]
        if value.ndim != (2 if leaf == "kernel" else 1) or value.shape[0] % 3:
            return f"expected a fused [3E{', E' if leaf == 'kernel' else ''}] {param}, got shape {value.shape}"
        parts = np.split(value, 3, axis=0)  # PyTorch stacks q, k, v along the output dim
        if leaf == "kernel":
            parts = [p.T for p in parts]
        return [(("params",) + module.path + (f"{n}_proj", leaf), p) for n, p in zip("qkv", parts)]
    names = _LEAF_NAMES[module.kind]
    if param not in names:
        return f"unknown parameter {param!r} of a {module.kind} layer"
    collection, leaf = names[param]
    if module.kind == "conv" and leaf == "kernel":
        if value.ndim != 4:
            return f"expected a 4-D conv weight (OIHW), got shape {value.shape}"
        value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if module.kind == "dense" and leaf == "kernel":
        if value.ndim != 2:
            return f"expected a 2-D linear weight, got shape {value.shape}"
        value = value.T  # [out, in] -> [in, out]
    return [((collection,) + module.path + (leaf,), value)]


@dataclasses.dataclass
class MappedTensors:
    """Result of mapping a state dict: Flax leaves and what could not be mapped.

    leaves: {flax path: array}; sources: {flax path: the PyTorch key it came from};
    unmapped: "key: reason" for every tensor no rule covers (or that maps where another key
    already did, with other values); ignored: keys dropped on purpose (num_batches_tracked,
    the torchvision classifier, tied copies: keys mapped where an equal tensor already was);
    restored: "key = source" for each key the checkpoint lacks as a tied copy saved once,
    taken from the key it copies (`layouts.TIED_COPIES`).
    """

    leaves: dict[Path, np.ndarray]
    sources: dict[Path, str]
    unmapped: list[str]
    ignored: list[str]
    restored: list[str] = dataclasses.field(default_factory=list)


def map_state_dict(state_dict: Mapping[str, np.ndarray], layout: str) -> MappedTensors:
    """Maps every tensor of a state dict in `layout` to Flax leaves (no model checks)."""
    resolve = MODULE_RESOLVERS[layout]
    resolve_parameter = PARAMETER_RESOLVERS.get(layout, lambda key: None)
    mapped = MappedTensors({}, {}, [], [])
    copies = TIED_COPIES.get(layout, lambda sd: {})(state_dict)
    if copies:
        state_dict = {**state_dict, **{key: state_dict[source] for key, source in copies.items()}}
        mapped.restored = [f"{key} = {source}" for key, source in copies.items()]
    # A ViT's prefix tokens (class, distillation, registers) are one leaf, from several keys.
    num_prefix_tokens = sum(int(np.prod(value.shape[:-1])) for key, value in state_dict.items()
                            if getattr(resolve_parameter(key), "kind", None) == "prefix_token")
    prefix: list[tuple[int, str, np.ndarray]] = []
    for key, value in state_dict.items():
        module_name, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            mapped.ignored.append(key)
            continue
        module = resolve_parameter(key)
        if module is None:
            module = resolve(module_name) if module_name else None
        if module is IGNORED:
            mapped.ignored.append(key)
            continue
        if module is None:
            mapped.unmapped.append(f"{key}: no {layout} rule for this name")
            continue
        leaves = _map_tensor(module, param, value, num_prefix_tokens)
        if isinstance(leaves, str):
            mapped.unmapped.append(f"{key}: {leaves}")
            continue
        if module.kind == "prefix_token":
            prefix.append((module.order, key, leaves[0][1]))
            continue
        for path, array in leaves:
            if path in mapped.leaves and np.array_equal(mapped.leaves[path], array):
                mapped.ignored.append(key)  # a tied copy (shared heads saved once per layer)
                continue
            if path in mapped.leaves:
                mapped.unmapped.append(f"{key}: maps to {'/'.join(path)}, already given by {mapped.sources[path]}")
                continue
            mapped.leaves[path] = np.ascontiguousarray(array, dtype=np.float32)
            mapped.sources[path] = key
    if prefix:  # class token, then distillation token or registers
        prefix.sort(key=lambda item: item[0])
        path = ("params",) + VIT + ("prefix_tokens",)
        mapped.leaves[path] = np.ascontiguousarray(np.concatenate([a for _, _, a in prefix]), dtype=np.float32)
        mapped.sources[path] = " + ".join(key for _, key, _ in prefix)
    return mapped
