"""Config defaults shared by every file in `configs/`, and their validation.

A config is an `ml_collections.ConfigDict` with sections `model`, `loss`, `data`,
`train` and `eval`. Experiment files in `configs/` call `base_config()` and override
what differs. Configs are locked after construction, so a misspelled key (in a config
file or in a `--config.key=value` override) is an error instead of a silent no-op.
"""

from __future__ import annotations

import re

import ml_collections

from detr_jax.config.errors import ConfigError
from detr_jax.config.train_config import eval_config, train_config
# The data section's defaults live with the data package. Bound as a module, not by name:
# data.config imports ConfigError from this package, and a module binding lets either
# package be imported first (its names are read only when a config is built or checked).
from detr_jax.data import config as data_defaults
from detr_jax.criterion.losses import LOSSES
from detr_jax.criterion.matcher import MATCHERS
from detr_jax.criterion.class_convention import CLASS_CONVENTIONS
from detr_jax.models import (BACKBONES, DETECTORS, NECKS, NORMS, POSITION_EMBEDDINGS, RESNET_BACKBONES,
                             class_convention_name)
from detr_jax.models.detr import DTYPES
from detr_jax.train.optim import check_param_rules
from detr_jax.runtime.sharding import PARAM_SHARDINGS


def model_config() -> ml_collections.ConfigDict:
    """The paper's DETR-R50 model (hidden 256, 8 heads, 6+6 layers, 100 queries)."""
    model = ml_collections.ConfigDict(
        dict(
            # The detector, a name in detr_jax.models.DETECTORS ("detr": the paper's).
            arch="detr",
            # How class logits are read (detr_jax.criterion.class_convention.CLASS_CONVENTIONS:
            # "softmax" with a "no object" class, "sigmoid_focal", "sigmoid_varifocal"); "": the
            # detector's own.
            class_convention="",
            backbone="resnet50",
            # Settings of the backbone's module, by field name, for backbones that have
            # them (a ViT's window_size, drop_path_rate, pos_grid, ...: detr_jax.models.vit).
            backbone_args=ml_collections.FieldReference({}, field_type=object),
            # The neck: backbone stages -> feature levels (detr_jax.models.neck.NECKS;
            # "input_proj": DETR's 1x1 projection of the last stage, one level), and its
            # module's settings by field name.
            neck="input_proj",
            neck_args=ml_collections.FieldReference({}, field_type=object),
            # Settings of the detector's transformer that are its own, by name (Deformable
            # DETR's with_box_refine, two_stage, num_feature_levels, encoder/decoder_n_points:
            # detr_jax.models.detectors.deformable_detr); validated by building the detector.
            transformer_args=ml_collections.FieldReference({}, field_type=object),
            # Dilate the last ResNet stage instead of striding it (the "DC5" models).
            dilation=False,
            # "frozen_bn" (pretrained backbones, as official DETR), "group_norm": a
            # trainable GroupNorm in each BatchNorm's place, for a backbone trained from
            # scratch (frozen statistics would leave it with no normalization at all), or
            # "batch_norm": trainable BatchNorm synchronized over the global batch.
            backbone_norm="frozen_bn",
            hidden_dim=256,
            num_heads=8,
            num_encoder_layers=6,
            num_decoder_layers=6,
            dim_feedforward=2048,
            dropout=0.1,
            # False: post-norm as in the paper; True: pre-norm (adds a final encoder LayerNorm).
            pre_norm=False,
            num_queries=100,
            # Max class id + 1 (COCO: 91). The class head has num_classes + 1 outputs.
            # "auto": the training set's largest category id + 1, resolved when training
            # starts and stored with the run (so eval and predict use the same number).
            num_classes=ml_collections.FieldReference(91, field_type=object),
            position_embedding="sine",
            # A mask head on the detector (detr_jax.models.segmentation.DETRSegm, the
            # paper's panoptic model): outputs also pred_masks [B, Q, H/4, W/4]. Needs a
            # ResNet backbone (it reads res2..res4) and hidden_dim + num_heads divisible by 8.
            masks=False,
            # Compute dtype of the transformer and heads; parameters stay float32.
            dtype="float32",
        )
    )
    # Assigned, not given above: a dict given to the constructor becomes a ConfigDict
    # (which a saved config would then be merged into key by key), an assigned one stays a dict.
    model.backbone_args = {}
    model.neck_args = {}
    model.transformer_args = {}
    return model


def loss_config() -> ml_collections.ConfigDict:
    """The matcher and set-criterion weights (official DETR defaults)."""
    loss = ml_collections.ConfigDict(
        dict(
            class_coef=1.0,
            bbox_coef=5.0,
            giou_coef=2.0,
            # Weights of the mask head's focal and DICE losses (term "masks").
            mask_coef=1.0,
            dice_coef=1.0,
            # Weight of the "no object" class in the cross-entropy (softmax class convention).
            eos_coef=0.1,
            # The focal loss's and focal matching cost's settings (sigmoid_focal convention).
            focal_alpha=0.25,
            focal_gamma=2.0,
            # The varifocal loss's settings (sigmoid_varifocal convention, RT-DETR's criterion;
            # its matching cost is the focal one above).
            varifocal_alpha=0.75,
            varifocal_gamma=2.0,
            # Supervise every decoder layer, not only the last.
            aux_loss=True,
            # Weight of the whole one2many branch of hybrid matching (H-DETR's lambda_one2many;
            # the branch exists when model.transformer_args num_queries_one2many > 0).
            one2many_coef=1.0,
            # Name in detr_jax.criterion.matcher.MATCHERS, and its settings by field name
            # (the Hungarian matchers': cost_class, cost_bbox, cost_giou, the weights of the
            # matching cost's terms, official DETR's 1, 5, 2 when not given).
            matcher="hungarian",
            matcher_args=ml_collections.FieldReference({}, field_type=object),
            # Terms of the set criterion, names in detr_jax.criterion.losses.LOSSES ("masks" trains
            # the mask head: needs model.masks and data.masks).
            losses=("labels", "boxes", "cardinality"),
        )
    )
    loss.matcher_args = {}  # assigned, as model.backbone_args
    return loss


def base_config() -> ml_collections.ConfigDict:
    """All sections with the paper's defaults (COCO, DETR-R50).

    Locked: a config file may change values but not add keys, so a typo such as
    `config.model.hiden_dim = 128` fails loudly.
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config()
    config.loss = loss_config()
    config.data = data_defaults.data_config()
    config.train = train_config()
    config.eval = eval_config()
    config.lock()
    return config


AUTO = "auto"  # model.num_classes from the training data


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values that the type of a key cannot express; raises ConfigError."""
    validate_model(config.model)
    validate_loss(config.loss)
    validate_train(config.train)
    validate_eval(config.eval)
    data_defaults.validate(config.data)
    if "masks" in config.loss.losses and not (config.model.masks and config.data.masks):
        raise ConfigError(f"loss.losses={tuple(config.loss.losses)!r}: the 'masks' term needs a mask head and mask "
                          f"targets (model.masks=True, data.masks=True); got model.masks={config.model.masks}, "
                          f"data.masks={config.data.masks}")


def _check_range(section: str, values: ml_collections.ConfigDict, minimums: dict) -> None:
    """ConfigError naming the first key of `values` below its minimum ({key: (min, strict)})."""
    for key, (low, strict) in minimums.items():
        value = values[key]
        if value < low or (strict and value == low):
            raise ConfigError(f"{section}.{key}={value!r} must be {'>' if strict else '>='} {low}")


def validate_loss(loss: ml_collections.ConfigDict) -> None:
    _check_range("loss", loss, {key: (0, False) for key in (
        "class_coef", "bbox_coef", "giou_coef", "mask_coef", "dice_coef", "one2many_coef")})
    if not 0.0 < loss.eos_coef <= 1.0:
        raise ConfigError(f"loss.eos_coef={loss.eos_coef} must be in (0, 1]")
    if not 0.0 <= loss.focal_alpha <= 1.0:
        raise ConfigError(f"loss.focal_alpha={loss.focal_alpha} must be in [0, 1]")
    _check_range("loss", loss, {"focal_gamma": (0, False), "varifocal_alpha": (0, False),
                                "varifocal_gamma": (0, False)})
    if loss.matcher not in MATCHERS:
        raise ConfigError(f"loss.matcher={loss.matcher!r}: expected one of {sorted(MATCHERS)}")
    if isinstance(loss.matcher_args, ml_collections.ConfigDict):  # what copy.deepcopy makes of the dict
        loss.matcher_args = loss.matcher_args.to_dict()
    if not isinstance(loss.matcher_args, dict):
        raise ConfigError(f"loss.matcher_args={loss.matcher_args!r} must be a dict of field: value")
    try:  # building the matcher checks its settings and computes nothing
        MATCHERS[loss.matcher](loss, CLASS_CONVENTIONS["softmax"].from_config(loss))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss.matcher_args for {loss.matcher!r}: {e}") from None
    unknown = [name for name in loss.losses if name not in LOSSES]
    if unknown or not loss.losses:
        raise ConfigError(f"loss.losses={tuple(loss.losses)!r}: expected names from {sorted(LOSSES)}")


def validate_train(train: ml_collections.ConfigDict) -> None:
    _check_range("train", train, {
        "lr": (0, True), "weight_decay": (0, False), "clip_max_norm": (0, False), "epochs": (1, False),
        "num_steps": (0, False), "lr_drop_epoch": (0, False), "warmup_steps": (0, False),
        "batch_size": (1, False), "grad_accum_steps": (1, False), "log_every_steps": (1, False),
        "checkpoint_every_steps": (1, False), "keep_checkpoints": (1, False), "eval_every_epochs": (0, False),
        "fsdp_min_mib": (0, False), "ema_decay": (0, False), "ema_warmup_steps": (1, False),
    })
    if train.ema_decay >= 1:
        raise ConfigError(f"train.ema_decay={train.ema_decay}: expected 0 (no average) or a decay below 1")
    if train.param_sharding not in PARAM_SHARDINGS:
        raise ConfigError(
            f"train.param_sharding={train.param_sharding!r}: expected one of {tuple(sorted(PARAM_SHARDINGS))}")
    problems = check_param_rules(train.param_rules)
    if problems:
        raise ConfigError("train.param_rules: " + "; ".join(problems))
    for pattern in train.init_exclude:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"train.init_exclude: bad regex {pattern!r}: {e}") from None


def validate_eval(eval_section: ml_collections.ConfigDict) -> None:
    _check_range("eval", eval_section, {"batch_size": (1, False), "num_visualized": (0, False)})


def validate_model(m: ml_collections.ConfigDict) -> None:
    for key, registry in (("arch", DETECTORS), ("backbone", BACKBONES), ("backbone_norm", NORMS), ("neck", NECKS),
                          ("position_embedding", POSITION_EMBEDDINGS), ("dtype", DTYPES)):
        if m[key] not in registry:
            raise ConfigError(f"model.{key}={m[key]!r}: expected one of {tuple(sorted(registry))}")
    if m.class_convention and m.class_convention not in CLASS_CONVENTIONS:
        raise ConfigError(f"model.class_convention={m.class_convention!r}: expected \"\" (the detector's own) or one "
                          f"of {tuple(sorted(CLASS_CONVENTIONS))}")
    if m.masks and class_convention_name(m) != "softmax":
        raise ConfigError(f"model.masks=True needs the softmax class convention (the panoptic post-processing reads "
                          f"the \"no object\" class); model.arch={m.arch!r} uses {class_convention_name(m)!r}")
    for key, build in (("backbone", lambda: BACKBONES[m.backbone](m, DTYPES[m.dtype])),
                       ("neck", lambda: NECKS[m.neck](m, DTYPES[m.dtype])(name=m.neck))):
        args = f"{key}_args"
        if isinstance(m[args], ml_collections.ConfigDict):  # what copy.deepcopy makes of the dict
            m[args] = m[args].to_dict()
        if not isinstance(m[args], dict):
            raise ConfigError(f"model.{args}={m[args]!r} must be a dict of field: value")
        try:  # a module is a dataclass: building one checks its settings and computes nothing
            build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.{args} for {m[key]!r}: {e}") from None
    if isinstance(m.transformer_args, ml_collections.ConfigDict):
        m.transformer_args = m.transformer_args.to_dict()
    if not isinstance(m.transformer_args, dict):
        raise ConfigError(f"model.transformer_args={m.transformer_args!r} must be a dict of setting: value")
    try:  # the detector's own constraints (a post-norm-only member's model.pre_norm, its transformer_args, ...)
        DETECTORS[m.arch].build(m, DTYPES[m.dtype], 2)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.arch={m.arch!r}: {e}") from None
    if m.hidden_dim % m.num_heads:
        raise ConfigError(
            f"model.hidden_dim={m.hidden_dim} is not divisible by model.num_heads={m.num_heads}"
        )
    if m.hidden_dim % 2:
        raise ConfigError(f"model.hidden_dim={m.hidden_dim} must be even (2-D position encoding)")
    if m.masks and m.backbone not in RESNET_BACKBONES:
        raise ConfigError(f"model.masks=True needs a ResNet backbone (the mask head reads its res2..res4 stages); "
                          f"model.backbone={m.backbone!r}")
    if m.masks and (m.hidden_dim + m.num_heads) % 8:
        raise ConfigError(f"model.masks=True needs model.hidden_dim + model.num_heads divisible by 8 (the mask "
                          f"head's first GroupNorm has 8 groups); got {m.hidden_dim} + {m.num_heads}")
    if m.num_classes != AUTO and (isinstance(m.num_classes, bool) or not isinstance(m.num_classes, int)
                                  or m.num_classes < 1):
        raise ConfigError(f"model.num_classes={m.num_classes!r} must be a positive integer or {AUTO!r}")
    for key in ("num_encoder_layers", "num_queries", "num_heads"):
        if m[key] < 1 and not (key == "num_encoder_layers" and m[key] == 0):
            raise ConfigError(f"model.{key}={m[key]} must be positive")
    if m.num_decoder_layers < 1:
        raise ConfigError(f"model.num_decoder_layers={m.num_decoder_layers} must be >= 1")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
