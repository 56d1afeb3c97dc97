"""Key names -> our modules: the `Module` record every layout's rules give, and the
rule matcher they share (`(regex, build)` pairs, the first full match wins)."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

Path = tuple[str, ...]  # ("params", "backbone", "body", "conv1", "kernel")


@dataclasses.dataclass(frozen=True)
class Module:
    """A PyTorch module's place in the Flax tree and what kind of layer it is.

    kind: "conv", "bn" (frozen BatchNorm), "batchnorm" (trainable BatchNorm: scale and bias in
    params, the running statistics in batch_stats), "dense", "layernorm", "groupnorm", "embedding" (the path is
    the parameter itself), "parameter" (a bare nn.Parameter, copied as is to the path),
    "fused_qkv" (nn.MultiheadAttention's in_proj, timm's qkv; the path is the attention
    module holding q_proj/k_proj/v_proj), "unsupported" (`path[0]` says why), or for a
    ViT's bare parameters "prefix_token" (class, distillation or register tokens [1, n, E],
    concatenated in `order` into prefix_tokens) and
    "pos_embed" ([1, P + g*g, E] -> prefix_pos_embed and the pos_embed grid).
    """

    path: tuple[str, ...]
    kind: str
    order: int = 0


IGNORED = Module((), "ignored")


def first_match(rules: list[tuple[str, Callable[..., Module | None]]], name: str) -> Module | None:
    for pattern, build in rules:
        match = re.fullmatch(pattern, name)
        if match:
            return build(*match.groups())
    return None


def unsupported(reason: str) -> Callable[..., Module]:
    return lambda *_: Module((reason,), "unsupported")
