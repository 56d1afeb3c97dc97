"""Converting a PyTorch state dict (or file) for the model of a config: the layout detected,
the model inferred and checked against the config, every problem reported at once."""

from __future__ import annotations

import copy
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

import detr_jax
from detr_jax.checkpoints.checkpointer import compare_trees
from detr_jax.config import config_from_dict, load_config
from detr_jax.convert.checkpoint_files import checkpoint_file, file_sha256, load_state_dict
from detr_jax.convert.errors import ConversionError
from detr_jax.convert.layouts import BACKBONE_LAYOUTS, LAYOUTS, VIT_LAYOUTS, detect_layout, infer_model
from detr_jax.convert.resnet import infer_backbone
from detr_jax.convert.rules import Path
from detr_jax.convert.tensors import map_state_dict
from detr_jax.convert.vit import VIT, hf_vit_settings, infer_vit, vit_backbone_args, vit_mismatches
from detr_jax.models import BACKBONES, build_model, init_variables, variable_shapes
from detr_jax.models.vit import VITS

# Model config fields that the weights determine (and are checked against the config).
INFERRED_FIELDS = (
    "arch", "backbone", "neck", "hidden_dim", "num_queries", "num_classes", "num_encoder_layers",
    "num_decoder_layers", "dim_feedforward", "pre_norm", "position_embedding", "masks", "transformer_args",
)
# Fields that no tensor shape reveals: always taken from the config.
NOT_INFERABLE_FIELDS = ("dilation", "num_heads")


def expected_shapes(model_config: ml_collections.ConfigDict) -> dict[Path, tuple[int, ...]]:
    """{flax path: shape} of every variable of DETR built from the `model` config section."""
    flat = traverse_util.flatten_dict(variable_shapes(build_model(model_config)))
    return {path: leaf.shape for path, leaf in flat.items()}


def _config_mismatches(
    inferred: Mapping[str, Any], backbone_description: str, model_config, reinit_class_head: bool
) -> list[str]:
    """One line per inferred field that differs from the config (with what to do about it)."""
    problems = []
    for field, value in inferred.items():
        wanted = model_config[field]
        if isinstance(value, dict):  # a part's settings (transformer_args): the keys the config sets
            # (one it leaves to the part's default and the weights contradict changes the
            # model's parameters, which the shape check reports)
            wanted = wanted.to_dict() if hasattr(wanted, "to_dict") else dict(wanted)
            problems += [f"model.{field} {key}: checkpoint has {v!r}, config has {wanted[key]!r}"
                         for key, v in value.items() if key in wanted and wanted[key] != v]
            continue
        if value == wanted or (field == "num_classes" and reinit_class_head):
            continue
        line = f"model.{field}: checkpoint has {value!r}, config has {wanted!r}"
        if field == "backbone" and value is None:
            line = f"model.backbone: checkpoint has an unknown {backbone_description}, config has {wanted!r}"
        elif field == "num_classes":
            line += (" (to fine-tune on other classes, re-initialize the class head: "
                     "reinit_class_head=True / --reinit_class_head)")
        elif field == "num_queries":
            line += (" (the queries are trained with the decoder and are not re-initialized; set "
                     f"model.num_queries={value}: unused queries learn to predict 'no object')")
        problems.append(line)
    return problems


def _tree_problems(
    leaves: Mapping[Path, np.ndarray], sources: Mapping[Path, str], expected: Mapping[Path, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, not in the model, shape mismatches), each a sorted list of lines."""
    shapes = {p: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for p, s in expected.items()}
    missing, extra, mismatched = compare_trees(shapes, leaves)
    return (
        sorted("/".join(p) for p in missing),
        sorted(f"{'/'.join(p)} (from {sources[p]})" for p in extra),
        sorted(f"{'/'.join(p)} (from {sources[p]}): checkpoint {tuple(leaves[p].shape)}, model {tuple(expected[p])}"
               for p in mismatched),
    )


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"  {title} ({len(lines)}):"] + [f"    {line}" for line in lines] if lines else []


def class_dependent_paths(model_config: ml_collections.ConfigDict,
                          expected: Mapping[Path, tuple[int, ...]] | None = None) -> list[Path]:
    """The variables of the model of `model_config` whose shapes depend on
    model.num_classes (those that differ in the model with one class more): DETR's
    `class_embed`; Deformable DETR's per-layer `class_embed_{i}` (and the proposals' head);
    DINO's `class_embed`, `enc_out_class_embed` and its denoising label embedding
    `label_enc`; RT-DETR's `class_embed_{i}`, `enc_score_head`, `denoising_class_embed`.
    `expected`: the model's `expected_shapes`, if already at hand."""
    expected = expected_shapes(model_config) if expected is None else expected
    one_more = copy.deepcopy(model_config)
    one_more.num_classes = model_config.num_classes + 1
    other = expected_shapes(one_more)
    return sorted(path for path, shape in expected.items() if other.get(path) != shape)


def fresh_variables(model_config: ml_collections.ConfigDict, paths: list[Path], seed: int) -> dict[Path, np.ndarray]:
    """The variables at `paths` as the model of `model_config` initializes them (its own
    initializers: a sigmoid class head's bias at logit(0.01), a label embedding N(0, 1), ...;
    seeded by `seed`), as flat numpy leaves. Under jit only what `paths` need is computed."""
    model = build_model(model_config)

    def picked(rng):
        flat = traverse_util.flatten_dict(init_variables(model, rng))
        return [flat[path] for path in paths]

    values = jax.jit(picked)(jax.random.PRNGKey(seed))
    return {path: np.asarray(value) for path, value in zip(paths, values)}


def module_names(paths: list[Path]) -> list[str]:
    """The modules (or bare parameters directly under a collection) that own `paths`:
    ("params", "class_embed", "kernel") -> "params/class_embed", ("params", "label_enc") ->
    "params/label_enc"."""
    return sorted({"/".join(path[:-1] if len(path) > 2 else path) for path in paths})


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_config: ml_collections.ConfigDict,
    *,
    reinit_class_head: bool = False,
    seed: int = 0,
    source: str = "state dict",
    vit_settings: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    """Converts a PyTorch state dict (numpy arrays) for the model of `model_config`.

    Args:
      state_dict: {PyTorch key: array} in one of LAYOUTS (see `load_state_dict`).
      model_config: the `model` config section the variables must fit.
      reinit_class_head: replace every variable whose shape depends on the number of
        classes (`class_dependent_paths`: the class heads, DINO's label embedding) by the
        model's own initialization (`fresh_variables`, seeded by `seed`); needed when
        model_config.num_classes differs from the checkpoint. metadata["reinitialized"]
        names them (`module_names`).
      source: named in error messages (the file).
      vit_settings: for a ViT layout, ViT fields read beside the weights (VIT_FILE_FIELDS,
        see `hf_vit_settings`), checked against the config as the inferred ones are.
    Returns:
      (variables, metadata): variables {"params": ..., "frozen_bn": ...} of numpy float32
      arrays, the full tree of the model, or only its backbone for a torchvision ResNet or
      a ViT; metadata: layout, inferred model, contents, ignored keys, notes.
    Raises:
      ConversionError listing every problem found.
    """
    keys = list(state_dict)
    layout = detect_layout(keys)
    if layout is None:
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        raise ConversionError(
            f"{source}: not a DETR, ResNet or ViT checkpoint in a known layout ({', '.join(LAYOUTS)}): "
            f"expected keys such as 'transformer.encoder.layers.0...' (official DETR), "
            f"'model.backbone...' (Hugging Face DETR), 'conv1.weight' + 'layer1.0...' "
            f"(torchvision ResNet), 'embeddings.patch_embeddings...' (Hugging Face ViT/DeiT) or "
            f"'patch_embed.proj.weight' + 'blocks.0...' (timm ViT); found {len(keys)} keys: {shown or 'none'}"
        )
    if layout not in VIT_LAYOUTS and model_config.backbone_norm != "frozen_bn":
        raise ConversionError(
            f"{source}: PyTorch DETR and ResNet checkpoints have BatchNorm statistics, which only "
            f"model.backbone_norm='frozen_bn' holds; the config has {model_config.backbone_norm!r}")
    mapped = map_state_dict(state_dict, layout)
    leaves = dict(mapped.leaves)
    notes = []
    if mapped.restored:
        notes.append("tied copies the checkpoint holds once (transformers 5 saves tied weights once), restored: "
                     + ", ".join(mapped.restored))
    sources = dict(mapped.sources)
    if layout in VIT_LAYOUTS:
        vit_name, vit_fields, backbone_description = infer_vit(leaves)
        vit_fields = {**vit_fields, **(vit_settings or {})}
        inferred = {"backbone": vit_name, "backbone_args": vit_backbone_args(vit_fields)}
        target = BACKBONES[model_config.backbone](model_config, jnp.float32) if model_config.backbone in VITS else None
        if target is not None:
            notes.append(f"the ViT's num_heads is not in the weights: the config's ({target.num_heads}) is used")
            if vit_fields["num_prefix_tokens"] and not target.num_prefix_tokens:
                # ViTDet's choice (and windowed attention's requirement): drop the class token.
                leaves = {p: a for p, a in leaves.items()
                          if p[:3] not in (("params",) + VIT + ("prefix_tokens",), ("params",) + VIT + ("prefix_pos_embed",))}
                notes.append(f"the checkpoint's {vit_fields['num_prefix_tokens']} class/distillation/register "
                             "token(s) and their position embeddings dropped: the config's ViT has num_prefix_tokens=0")
                vit_fields["num_prefix_tokens"] = 0
    else:
        inferred = infer_model(leaves, layout)
        _, backbone_description = infer_backbone(leaves)

    expected = expected_shapes(model_config)
    if layout in BACKBONE_LAYOUTS:
        expected = {p: s for p, s in expected.items() if p[1] == "backbone"}
    reinitialized = []
    if reinit_class_head and layout not in BACKBONE_LAYOUTS:
        class_paths = class_dependent_paths(model_config, expected)
        fresh = fresh_variables(model_config, class_paths, seed)
        leaves = {p: a for p, a in leaves.items() if p not in fresh}
        leaves.update(fresh)
        sources.update({p: "re-initialized for model.num_classes" for p in fresh})
        reinitialized = module_names(class_paths)
        notes.append(
            f"re-initialized for {model_config.num_classes} classes as the model initializes them (seed {seed}): "
            f"{', '.join(reinitialized)}; the checkpoint's had {inferred.get('num_classes')} classes"
        )
    if layout in VIT_LAYOUTS:
        mismatches = vit_mismatches(vit_fields, vit_name, backbone_description, model_config, target)
    else:
        mismatches = _config_mismatches(inferred, backbone_description, model_config, reinit_class_head)
    problems = _section("model config: checkpoint vs config", mismatches)
    problems += _section("checkpoint keys that cannot be mapped", mapped.unmapped)
    missing, extra, mismatched = _tree_problems(leaves, sources, expected)
    problems += _section("model variables missing from the checkpoint", missing)
    problems += _section("checkpoint variables the model does not have", extra)
    problems += _section("shape mismatches", mismatched)
    if problems:
        raise ConversionError(f"{source}: cannot convert this {layout} checkpoint to the model:\n" + "\n".join(problems))

    if "dc5" in source.lower() and not model_config.dilation:
        notes.append("the file name says DC5 but model.dilation is False: DC5 models need model.dilation=True")
    metadata = {
        "layout": layout,
        "contents": "backbone" if layout in BACKBONE_LAYOUTS else "detr",
        "inferred_model": inferred,
        "ignored_keys": mapped.ignored,
        "reinitialized": reinitialized,
        "notes": notes,
    }
    return traverse_util.unflatten_dict(dict(sorted(leaves.items()))), metadata


# ---------------------------------------------------------------------------------------
# Files.


def target_config(
    state_dict: Mapping[str, np.ndarray], config, overrides: Mapping[str, Any] | None, source: str,
    vit_settings: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The config to convert for: the given one (or file, with `overrides`), else the
    defaults with the model shape inferred from the weights (and a ViT's `vit_settings`),
    then `overrides`."""
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if config is not None:
        return load_config(config, overrides)
    inferred = {}
    layout = detect_layout(list(state_dict))
    if layout is not None:
        inferred = infer_model(map_state_dict(state_dict, layout).leaves, layout)
    if layout in VIT_LAYOUTS and vit_settings:
        inferred["backbone_args"] = {**inferred["backbone_args"], **vit_settings}
    model = {field: value for field, value in inferred.items() if value is not None}
    return config_from_dict({"model": model}, source=source, overrides=overrides)


def convert_file(
    src: str | pathlib.Path,
    config: ml_collections.ConfigDict | str | pathlib.Path | None = None,
    reinit_class_head: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    """Reads and converts the PyTorch checkpoint `src` (a file, or a Hugging Face model
    directory); writes nothing (`detr-jax convert` saves the result with
    `checkpoint.save_variables`).

    Args:
      config: the config the weights must fit: a loaded config, a config file (then
        `overrides`, {"model.num_heads": 4}, are applied to it), or None: the model shape is
        inferred from the weights, num_heads and dilation come from the defaults, and
        `overrides` apply on top.
      reinit_class_head: start a new class head (fine-tuning on other classes).
      A Hugging Face ViT/DeiT's folder (of `src`, or of the file) may hold config.json and
      preprocessor_config.json: their layer_norm_eps and image_mean/std go into the
      inferred model.backbone_args (see `hf_vit_settings`).
    Returns:
      (variables, metadata): see `convert_state_dict`; the metadata also names the source
      file (and its sha256), the config file and the model config.
    Raises:
      ConversionError (every problem listed), ConfigError.
    """
    src_path = checkpoint_file(pathlib.Path(src).absolute())
    state_dict = load_state_dict(src_path)
    vit_settings = None
    if detect_layout(list(state_dict)) == "huggingface_vit":  # its folder's config files
        vit_settings = hf_vit_settings(src_path.parent)
    config_file = None if config is None or isinstance(config, ml_collections.ConfigDict) else config
    config = target_config(state_dict, config, overrides, str(src_path), vit_settings)
    variables, metadata = convert_state_dict(
        state_dict, config.model, reinit_class_head=reinit_class_head, seed=config.seed, source=str(src_path),
        vit_settings=vit_settings,
    )
    if vit_settings:
        metadata["notes"].append(
            f"from {src_path.parent}'s config files: {', '.join(f'{k}={v!r}' for k, v in vit_settings.items())} "
            "(in model.backbone_args)")
    model = {k: config.model[k] for k in config.model.keys()}
    if metadata["contents"] == "backbone":
        model = {"backbone": config.model.backbone}
        if metadata["layout"] in VIT_LAYOUTS:
            model["backbone_args"] = dict(config.model.backbone_args)
    metadata.update(
        source=str(src_path),
        source_sha256=file_sha256(src_path),
        config_file=None if config_file is None else str(pathlib.Path(config_file).absolute()),
        model=model,
        not_inferred_from_weights=list(NOT_INFERABLE_FIELDS),
        converted_by=f"detr-jax {detr_jax.__version__}",
    )
    return variables, metadata
