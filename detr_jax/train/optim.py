"""Parameter rules -> the optax transformation, and the learning-rate schedule.

Which parameters train, and at what learning rate, is config (big_vision's
`config.schedule` pattern): `train.param_rules` is a sequence of `(regex, multiplier)`
pairs matched in order against each parameter's path ("backbone/body/layer1_0/conv1/kernel");
the first rule that fully matches decides, `None` freezes the parameter, a number scales
`train.lr` for it, and a parameter no rule matches trains at `train.lr`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

FROZEN = "frozen"

# Official DETR's recipe (the default of train.param_rules): the ResNet stem and first
# stage are never trained (requires_grad False in the reference; bn1 is the stem norm when
# it is a trainable GroupNorm), the rest of the backbone trains at lr_backbone = 0.1 * lr,
# and so does a learned position embedding: the reference's backbone lr applies to every
# parameter named "backbone*", and its learned embedding lives at `backbone.1.row_embed`.
OFFICIAL_PARAM_RULES = (
    (r"backbone/body/(conv1|bn1|layer1_\d+)/.*", None),
    (r"backbone/.*", 0.1),
    (r"position_embedding/.*", 0.1),
)


def check_param_rules(rules) -> list[str]:
    """Problems with `train.param_rules` (empty when it is valid)."""
    problems = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
            problems.append(f"rule {i} {rule!r} is not a (regex, multiplier or None) pair")
            continue
        pattern, multiplier = rule
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(f"rule {i}: bad regex {pattern!r}: {e}")
        if multiplier is not None and (isinstance(multiplier, bool) or not isinstance(multiplier, (int, float))
                                       or multiplier < 0):
            problems.append(f"rule {i}: multiplier {multiplier!r} must be a number >= 0 or None (frozen)")
    return problems


def lr_multipliers(params, rules) -> dict:
    """Each parameter's lr multiplier (float) or None (frozen), same tree structure as params."""
    compiled = [(re.compile(pattern), multiplier) for pattern, multiplier in rules]

    def multiplier(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        for pattern, value in compiled:
            if pattern.fullmatch(name):
                return None if value is None else float(value)
        return 1.0

    return jax.tree_util.tree_map_with_path(multiplier, params)


def _group(multiplier: float | None) -> str:
    # optax group names; no "." (orbax joins tree keys with dots)
    return FROZEN if multiplier is None else f"lr_x{multiplier:g}".replace(".", "p")


def param_groups(params, rules) -> dict:
    """Each parameter's optimizer group name ("frozen", "lr_x1", "lr_x0p1", ...)."""
    return jax.tree.map(_group, lr_multipliers(params, rules), is_leaf=lambda x: x is None)


def frozen_mask(params, rules) -> dict:
    """True for every parameter the rules freeze (same tree structure as params)."""
    return jax.tree.map(lambda g: g == FROZEN, param_groups(params, rules))


def lr_schedule(base_lr: float, steps_per_epoch: int, lr_drop_epoch: int, warmup_steps: int = 0,
                drop_factor: float = 0.1) -> optax.Schedule:
    """Constant lr, x`drop_factor` from epoch `lr_drop_epoch` on (torch StepLR per epoch),
    with an optional linear warmup. Counted in optimizer updates."""
    step_decay = optax.piecewise_constant_schedule(
        base_lr, {max(1, lr_drop_epoch * steps_per_epoch): drop_factor})
    if warmup_steps <= 0:
        return step_decay

    # A factor on the step decay (not optax.join_schedules, which would restart the decay's
    # step count after the warmup and so move the drop `warmup_steps` later).
    def schedule(step):
        return jnp.minimum(step / warmup_steps, 1.0) * step_decay(step)

    return schedule


def make_optimizer(train_config: ml_collections.ConfigDict, params, updates_per_epoch: int):
    """AdamW per parameter group (lr x multiplier), frozen groups untouched, global-norm clipping.

    Returns (optimizer, main_lr_schedule). Gradients of frozen parameters are zeroed
    before clipping so they do not count in the global norm (they have no gradient in
    the reference). With grad_accum_steps > 1 the optimizer is wrapped in
    optax.MultiSteps and applies the mean gradient every grad_accum_steps micro-steps.
    """
    t = train_config
    multipliers = lr_multipliers(params, t.param_rules)
    groups = jax.tree.map(_group, multipliers, is_leaf=lambda x: x is None)
    main_lr = lr_schedule(t.lr, updates_per_epoch, t.lr_drop_epoch, t.warmup_steps)
    per_group = {}
    for m in sorted({m for m in traverse_util.flatten_dict(multipliers).values()}, key=lambda m: (m is None, m)):
        per_group[_group(m)] = optax.set_to_zero() if m is None else optax.adamw(
            lr_schedule(t.lr * m, updates_per_epoch, t.lr_drop_epoch, t.warmup_steps),
            b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay)
    transforms = [optax.masked(optax.set_to_zero(), jax.tree.map(lambda g: g == FROZEN, groups))]
    if t.clip_max_norm > 0:
        transforms.append(optax.clip_by_global_norm(t.clip_max_norm))
    transforms.append(optax.multi_transform(per_group, groups))
    optimizer = optax.chain(*transforms)
    if t.grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=t.grad_accum_steps)
    return optimizer, main_lr
