"""Parameter rules -> the optax transformation, and the learning-rate schedule.

Which parameters train, at what learning rate and weight decay, is config (big_vision's
`config.schedule` pattern): `train.param_rules` is a sequence of `(regex, setting)` pairs
matched in order against each parameter's path ("backbone/body/layer1_0/conv1/kernel"); the
first rule that fully matches decides: `None` freezes the parameter, a number scales
`train.lr` for it, and `{"lr": a, "weight_decay": b}` scales `train.lr` by a and
`train.weight_decay` by b (each 1 if left out; RT-DETR's "no weight decay on norms" is
`{"weight_decay": 0}`). A parameter no rule matches trains at `train.lr` and
`train.weight_decay`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

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


SETTING_KEYS = ("lr", "weight_decay")


def _is_multiplier(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0


def check_param_rules(rules) -> list[str]:
    """Problems with `train.param_rules` (empty when it is valid)."""
    problems = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
            problems.append(f"rule {i} {rule!r} is not a (regex, multiplier, settings or None) pair")
            continue
        pattern, setting = rule
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(f"rule {i}: bad regex {pattern!r}: {e}")
        if isinstance(setting, Mapping):
            unknown = sorted(set(setting) - set(SETTING_KEYS))
            bad = [f"{k}={v!r}" for k, v in setting.items() if k in SETTING_KEYS and not _is_multiplier(v)]
            if unknown or bad:
                problems.append(f"rule {i}: settings {dict(setting)!r}: expected multipliers >= 0 of "
                                f"{' and '.join(SETTING_KEYS)}" + (f", not {', '.join(unknown)}" if unknown else ""))
        elif setting is not None and not _is_multiplier(setting):
            problems.append(f"rule {i}: multiplier {setting!r} must be a number >= 0, "
                            "{'lr': ..., 'weight_decay': ...} or None (frozen)")
    return problems


def _settings(value) -> tuple[float, float] | None:
    """A rule's value -> (lr multiplier, weight decay multiplier), or None (frozen)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return float(value.get("lr", 1.0)), float(value.get("weight_decay", 1.0))
    return float(value), 1.0


def param_settings(params, rules) -> dict:
    """Each parameter's (lr multiplier, weight decay multiplier) or None (frozen), same tree
    structure as params."""
    compiled = [(re.compile(pattern), _settings(value)) for pattern, value in rules]

    def settings(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return next((value for pattern, value in compiled if pattern.fullmatch(name)), (1.0, 1.0))

    return jax.tree_util.tree_map_with_path(settings, params)


def lr_multipliers(params, rules) -> dict:
    """Each parameter's lr multiplier (float) or None (frozen), same tree structure as params."""
    return jax.tree.map(lambda s: None if s is None else s[0], param_settings(params, rules), is_leaf=_is_setting)


def _is_setting(x) -> bool:
    return x is None or isinstance(x, tuple)


def _group(settings: tuple[float, float] | None) -> str:
    # optax group names; no "." (orbax joins tree keys with dots). A group with the plain
    # weight decay keeps the name it had before weight decay could be set per rule.
    if settings is None:
        return FROZEN
    lr, weight_decay = settings
    name = f"lr_x{lr:g}" + ("" if weight_decay == 1.0 else f"_wd_x{weight_decay:g}")
    return name.replace(".", "p")


def param_groups(params, rules) -> dict:
    """Each parameter's optimizer group name ("frozen", "lr_x1", "lr_x0p1", "lr_x1_wd_x0", ...)."""
    return jax.tree.map(_group, param_settings(params, rules), is_leaf=_is_setting)


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
    settings = param_settings(params, t.param_rules)
    groups = jax.tree.map(_group, settings, is_leaf=_is_setting)
    main_lr = lr_schedule(t.lr, updates_per_epoch, t.lr_drop_epoch, t.warmup_steps)
    per_group = {}
    for s in set(traverse_util.flatten_dict(settings).values()):
        per_group[_group(s)] = optax.set_to_zero() if s is None else optax.adamw(
            lr_schedule(t.lr * s[0], updates_per_epoch, t.lr_drop_epoch, t.warmup_steps),
            b1=0.9, b2=0.999, eps=1e-8, weight_decay=t.weight_decay * s[1])
    transforms = [optax.masked(optax.set_to_zero(), jax.tree.map(lambda g: g == FROZEN, groups))]
    if t.clip_max_norm > 0:
        transforms.append(optax.clip_by_global_norm(t.clip_max_norm))
    transforms.append(optax.multi_transform(per_group, groups))
    optimizer = optax.chain(*transforms)
    if t.grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=t.grad_accum_steps)
    return optimizer, main_lr
