"""PyTorch checkpoints -> Flax variables of `detr_jax.models.detr.DETR`.

Three layouts are recognized from the key names:
  official     facebookresearch/detr (`detr-r50-e632da11.pth`, ...): {"model": state dict} with
               `backbone.0.body.*`, `transformer.*` (fused attention `in_proj_weight`),
               `class_embed`, `bbox_embed`, `query_embed`, `input_proj`, and for the learned
               position embedding `backbone.1.{row,col}_embed`.
  huggingface  transformers' DetrForObjectDetection: as saved by `save_pretrained` or on the
               Hub (`model.backbone.conv_encoder.model.*` with timm/torchvision backbone names
               or the native ResNet's `embedder`/`encoder.stages` names, `out_proj`, `fc1`), or
               as in memory in transformers 5 (`model.backbone.model.*`, `o_proj`, `mlp.fc1`).
  torchvision  an ImageNet ResNet-50/101 (`conv1.weight`, `layer1.0.conv1.weight`, `fc.*`
               ignored): converted to the backbone subtree only, to start training from.

Tensors are mapped one by one: conv kernels OIHW -> HWIO, linear weights [out, in] ->
[in, out], the fused attention in_proj split into q/k/v, BatchNorm weight/bias/running_mean/
running_var -> frozen_bn scale/bias/mean/var (`num_batches_tracked` ignored). The model
shape is inferred from the tensors and checked against the target config; every problem
(config mismatch, unmapped key, missing key, shape mismatch) is reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pathlib
import pickle
import re
import zipfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

import detr_jax
from detr_jax.checkpoint import compare_trees
from detr_jax.config import config_from_dict, load_config
from detr_jax.models import build_model, variable_shapes
from detr_jax.models.backbone import RESNETS
from detr_jax.models.transformer import torch_dense

LAYOUTS = ("official", "huggingface", "torchvision")
# Model config fields that the weights determine (and are checked against the config).
INFERRED_FIELDS = (
    "backbone", "hidden_dim", "num_queries", "num_classes", "num_encoder_layers",
    "num_decoder_layers", "dim_feedforward", "pre_norm", "position_embedding",
)
# Fields that no tensor shape reveals: always taken from the config.
NOT_INFERABLE_FIELDS = ("dilation", "num_heads")

Path = tuple[str, ...]  # ("params", "backbone", "body", "conv1", "kernel")


class ConversionError(ValueError):
    """A checkpoint cannot be read, recognized, or converted to the target model."""


@dataclasses.dataclass(frozen=True)
class Module:
    """A PyTorch module's place in the Flax tree and what kind of layer it is.

    kind: "conv", "bn" (frozen BatchNorm), "dense", "layernorm", "embedding" (the path is
    the parameter itself) or "fused_qkv" (nn.MultiheadAttention's in_proj; the path is the
    attention module holding q_proj/k_proj/v_proj).
    """

    path: tuple[str, ...]
    kind: str


IGNORED = Module((), "ignored")

# ---------------------------------------------------------------------------------------
# Key names -> modules, per layout.


def _first_match(rules: list[tuple[str, Callable[..., Module | None]]], name: str) -> Module | None:
    for pattern, build in rules:
        match = re.fullmatch(pattern, name)
        if match:
            return build(*match.groups())
    return None


BODY = ("backbone", "body")

_RESNET_BODY_RULES = [
    # torchvision / timm / official DETR names
    (r"conv1", lambda: Module(BODY + ("conv1",), "conv")),
    (r"bn1", lambda: Module(BODY + ("bn1",), "bn")),
    (r"layer(\d)\.(\d+)\.conv([123])", lambda s, b, i: Module(BODY + (f"layer{s}_{b}", f"conv{i}"), "conv")),
    (r"layer(\d)\.(\d+)\.bn([123])", lambda s, b, i: Module(BODY + (f"layer{s}_{b}", f"bn{i}"), "bn")),
    (r"layer(\d)\.(\d+)\.downsample\.0", lambda s, b: Module(BODY + (f"layer{s}_{b}", "downsample_conv"), "conv")),
    (r"layer(\d)\.(\d+)\.downsample\.1", lambda s, b: Module(BODY + (f"layer{s}_{b}", "downsample_bn"), "bn")),
    # transformers' native ResNet names (stages are 0-based there)
    (r"embedder\.embedder\.convolution", lambda: Module(BODY + ("conv1",), "conv")),
    (r"embedder\.embedder\.normalization", lambda: Module(BODY + ("bn1",), "bn")),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.([012])\.(convolution|normalization)",
        lambda s, b, j, what: Module(
            BODY + (f"layer{int(s) + 1}_{b}", ("conv" if what == "convolution" else "bn") + str(int(j) + 1)),
            "conv" if what == "convolution" else "bn",
        ),
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)",
        lambda s, b, what: Module(
            BODY + (f"layer{int(s) + 1}_{b}", "downsample_conv" if what == "convolution" else "downsample_bn"),
            "conv" if what == "convolution" else "bn",
        ),
    ),
]


def _resnet_body_module(name: str) -> Module | None:
    return _first_match(_RESNET_BODY_RULES, name)


def _layer_path(stack: str, index: str) -> tuple[str, ...]:
    return ("transformer", f"{stack}_layer{index}")


def _official_layer_module(stack: str, index: str, name: str) -> Module | None:
    layer = _layer_path(stack, index)
    attn = {"self_attn": "self_attn", "multihead_attn": "cross_attn"}
    rules = [
        (r"(self_attn|multihead_attn)", lambda a: Module(layer + (attn[a],), "fused_qkv")),
        (r"(self_attn|multihead_attn)\.out_proj", lambda a: Module(layer + (attn[a], "out_proj"), "dense")),
        (r"linear([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"norm([123])", lambda i: Module(layer + (f"norm{i}",), "layernorm")),
    ]
    return _first_match(rules, name)


def _official_module(name: str) -> Module | None:
    rules = [
        (r"backbone\.0\.body\.(.+)", _resnet_body_module),
        (r"backbone\.1\.(row|col)_embed", lambda rc: Module(("position_embedding", f"{rc}_embed"), "embedding")),
        (r"input_proj", lambda: Module(("input_proj",), "conv")),
        (r"query_embed", lambda: Module(("query_embed",), "embedding")),
        (r"class_embed", lambda: Module(("class_embed",), "dense")),
        (r"bbox_embed\.layers\.(\d+)", lambda i: Module(("bbox_embed", f"layers_{i}"), "dense")),
        (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)", _official_layer_module),
        (r"transformer\.encoder\.norm", lambda: Module(("transformer", "encoder_norm"), "layernorm")),
        (r"transformer\.decoder\.norm", lambda: Module(("transformer", "decoder_norm"), "layernorm")),
    ]
    return _first_match(rules, name)


def _huggingface_layer_module(stack: str, index: str, name: str) -> Module | None:
    layer = _layer_path(stack, index)
    attn = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}
    final_norm = "norm2" if stack == "encoder" else "norm3"
    rules = [
        (r"(self_attn|encoder_attn)\.([qkv])_proj", lambda a, p: Module(layer + (attn[a], f"{p}_proj"), "dense")),
        (r"(self_attn|encoder_attn)\.(?:out_proj|o_proj)", lambda a: Module(layer + (attn[a], "out_proj"), "dense")),
        (r"(?:mlp\.)?fc([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"self_attn_layer_norm", lambda: Module(layer + ("norm1",), "layernorm")),
        (r"encoder_attn_layer_norm", lambda: Module(layer + ("norm2",), "layernorm")),
        (r"final_layer_norm", lambda: Module(layer + (final_norm,), "layernorm")),
    ]
    return _first_match(rules, name)


def _huggingface_module(name: str) -> Module | None:
    position = {"row": "row_embed", "column": "col_embed"}
    rules = [
        (r"model\.backbone\.(?:conv_encoder\.)?model\.(.+)", _resnet_body_module),
        (
            r"model\.position_embedding\.(row|column)_embeddings",
            lambda rc: Module(("position_embedding", position[rc]), "embedding"),
        ),
        (r"model\.input_projection", lambda: Module(("input_proj",), "conv")),
        (r"model\.query_position_embeddings", lambda: Module(("query_embed",), "embedding")),
        (r"class_labels_classifier", lambda: Module(("class_embed",), "dense")),
        (r"bbox_predictor\.layers\.(\d+)", lambda i: Module(("bbox_embed", f"layers_{i}"), "dense")),
        (r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", _huggingface_layer_module),
        (r"model\.decoder\.layernorm", lambda: Module(("transformer", "decoder_norm"), "layernorm")),
    ]
    return _first_match(rules, name)


def _torchvision_module(name: str) -> Module | None:
    if name == "fc":  # the ImageNet classifier: not part of DETR
        return IGNORED
    return _resnet_body_module(name)


MODULE_RESOLVERS = {
    "official": _official_module,
    "huggingface": _huggingface_module,
    "torchvision": _torchvision_module,
}


def detect_layout(keys: list[str]) -> str | None:
    """"official", "huggingface", "torchvision", or None when the keys fit none of them."""
    if any(k.startswith(("transformer.", "backbone.0.body.")) for k in keys):
        return "official"
    if any(k.startswith(("model.backbone.", "model.encoder.", "model.decoder.", "class_labels_classifier."))
           for k in keys):
        return "huggingface"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    return None


# ---------------------------------------------------------------------------------------
# Tensors -> Flax leaves.

_LEAF_NAMES = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "layernorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "bn": {
        "weight": ("frozen_bn", "scale"), "bias": ("frozen_bn", "bias"),
        "running_mean": ("frozen_bn", "mean"), "running_var": ("frozen_bn", "var"),
    },
}


def _map_tensor(module: Module, param: str, value: np.ndarray) -> list[tuple[Path, np.ndarray]] | str:
    """The Flax leaves of one PyTorch tensor, or a string saying why it cannot be mapped."""
    if module.kind == "embedding":
        if param != "weight":
            return f"unknown parameter {param!r} of an embedding"
        return [(("params",) + module.path, value)]
    if module.kind == "fused_qkv":
        if param not in ("in_proj_weight", "in_proj_bias"):
            return f"unknown parameter {param!r} of a fused attention"
        leaf = "kernel" if param == "in_proj_weight" else "bias"
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
    unmapped: "key: reason" for every tensor no rule covers; ignored: keys dropped on
    purpose (num_batches_tracked, the torchvision classifier).
    """

    leaves: dict[Path, np.ndarray]
    sources: dict[Path, str]
    unmapped: list[str]
    ignored: list[str]


def map_state_dict(state_dict: Mapping[str, np.ndarray], layout: str) -> MappedTensors:
    """Maps every tensor of a state dict in `layout` to Flax leaves (no model checks)."""
    resolve = MODULE_RESOLVERS[layout]
    mapped = MappedTensors({}, {}, [], [])
    for key, value in state_dict.items():
        module_name, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            mapped.ignored.append(key)
            continue
        module = resolve(module_name) if module_name else None
        if module is IGNORED:
            mapped.ignored.append(key)
            continue
        if module is None:
            mapped.unmapped.append(f"{key}: no {layout} rule for this name")
            continue
        leaves = _map_tensor(module, param, value)
        if isinstance(leaves, str):
            mapped.unmapped.append(f"{key}: {leaves}")
            continue
        for path, array in leaves:
            if path in mapped.leaves:
                mapped.unmapped.append(f"{key}: maps to {'/'.join(path)}, already given by {mapped.sources[path]}")
                continue
            mapped.leaves[path] = np.ascontiguousarray(array, dtype=np.float32)
            mapped.sources[path] = key
    return mapped


# ---------------------------------------------------------------------------------------
# What model do the tensors describe?


def _shape(leaves: Mapping[Path, np.ndarray], *path: str) -> tuple[int, ...] | None:
    array = leaves.get(path)
    return None if array is None else array.shape


def _indices(leaves: Mapping[Path, np.ndarray], parent: Path, pattern: str) -> list[tuple[str, ...]]:
    """Groups of `pattern` matched by the child names under `parent`, e.g. layer indices."""
    found = set()
    for path in leaves:
        if path[: len(parent)] == parent and len(path) > len(parent):
            match = re.fullmatch(pattern, path[len(parent)])
            if match:
                found.add(match.groups())
    return sorted(found, key=lambda g: tuple(int(x) for x in g))


def infer_backbone(leaves: Mapping[Path, np.ndarray]) -> tuple[str | None, str]:
    """(name in RESNETS or None, a description such as "depths (3, 4, 6, 3), ...")."""
    body = ("params",) + BODY
    blocks = _indices(leaves, body, r"layer(\d)_(\d+)")
    depths = tuple(sum(1 for s, _ in blocks if int(s) == stage) for stage in (1, 2, 3, 4))
    widths = tuple((_shape(leaves, *body, f"layer{s}_0", "conv1", "kernel") or (0,))[-1] for s in (1, 2, 3, 4))
    stem = (_shape(leaves, *body, "conv1", "kernel") or (0,))[-1]
    description = f"ResNet with depths {depths}, widths {widths}, stem {stem}"
    for name, spec in RESNETS.items():
        if (spec.depths, spec.widths, spec.stem_width) == (depths, widths, stem):
            return name, description
    return None, description


def infer_model(leaves: Mapping[Path, np.ndarray], layout: str) -> dict[str, Any]:
    """The model config fields (INFERRED_FIELDS) that the tensors determine.

    Fields whose tensors are absent are left out (the missing keys are reported anyway);
    "backbone" is None for a ResNet shape that matches no known backbone.
    """
    backbone, _ = infer_backbone(leaves)
    inferred: dict[str, Any] = {"backbone": backbone}
    if layout == "torchvision":
        return inferred
    query = _shape(leaves, "params", "query_embed")
    if query is not None and len(query) == 2:
        inferred["num_queries"], inferred["hidden_dim"] = query
    classes = _shape(leaves, "params", "class_embed", "kernel")
    if classes is not None:
        inferred["num_classes"] = classes[-1] - 1
    transformer = ("params", "transformer")
    inferred["num_encoder_layers"] = len(_indices(leaves, transformer, r"encoder_layer(\d+)"))
    inferred["num_decoder_layers"] = len(_indices(leaves, transformer, r"decoder_layer(\d+)"))
    for stack in ("encoder_layer0", "decoder_layer0"):
        ffn = _shape(leaves, *transformer, stack, "ffn", "linear1", "kernel")
        if ffn is not None:
            inferred["dim_feedforward"] = ffn[-1]
            break
    inferred["pre_norm"] = ("params", "transformer", "encoder_norm", "scale") in leaves
    inferred["position_embedding"] = (
        "learned" if ("params", "position_embedding", "row_embed") in leaves else "sine"
    )
    return inferred


# ---------------------------------------------------------------------------------------
# Checks against the target model.


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


def _class_head(model_config, seed: int) -> dict[Path, np.ndarray]:
    """A freshly initialized class head (PyTorch nn.Linear init, as in DETR) as flat leaves."""
    head = torch_dense(model_config.num_classes + 1, model_config.hidden_dim, "class_embed", jnp.float32)
    params = head.init(jax.random.key(seed), jnp.zeros((1, model_config.hidden_dim), jnp.float32))["params"]
    return {("params", "class_embed", name): np.asarray(value) for name, value in params.items()}


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_config: ml_collections.ConfigDict,
    *,
    reinit_class_head: bool = False,
    seed: int = 0,
    source: str = "state dict",
) -> tuple[dict, dict]:
    """Converts a PyTorch state dict (numpy arrays) for the model of `model_config`.

    Args:
      state_dict: {PyTorch key: array} in one of LAYOUTS (see `load_state_dict`).
      model_config: the `model` config section the variables must fit.
      reinit_class_head: replace the class head by a fresh one (PyTorch nn.Linear init,
        seeded by `seed`); needed when model_config.num_classes differs from the checkpoint.
      source: named in error messages (the file).
    Returns:
      (variables, metadata): variables {"params": ..., "frozen_bn": ...} of numpy float32
      arrays, the full tree of the model, or only its backbone for a torchvision ResNet;
      metadata: layout, inferred model, contents, ignored keys, notes.
    Raises:
      ConversionError listing every problem found.
    """
    if model_config.backbone_norm != "frozen_bn":
        raise ConversionError(
            f"{source}: PyTorch DETR and ResNet checkpoints have BatchNorm statistics, which only "
            f"model.backbone_norm='frozen_bn' holds; the config has {model_config.backbone_norm!r}")
    keys = list(state_dict)
    layout = detect_layout(keys)
    if layout is None:
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        hint = ""
        if any(k.startswith("detr.") for k in keys):
            hint = " (keys under 'detr.' are a panoptic/segmentation model: not supported, use a detection checkpoint)"
        raise ConversionError(
            f"{source}: not a DETR or ResNet checkpoint in a known layout ({', '.join(LAYOUTS)}): "
            f"expected keys such as 'transformer.encoder.layers.0...' (official DETR), "
            f"'model.backbone...' (Hugging Face DETR) or 'conv1.weight' + 'layer1.0...' "
            f"(torchvision ResNet); found {len(keys)} keys: {shown or 'none'}{hint}"
        )
    mapped = map_state_dict(state_dict, layout)
    leaves = dict(mapped.leaves)
    inferred = infer_model(leaves, layout)
    _, backbone_description = infer_backbone(leaves)
    notes = []
    sources = dict(mapped.sources)

    expected = expected_shapes(model_config)
    if layout == "torchvision":
        expected = {p: s for p, s in expected.items() if p[1] == "backbone"}
    elif reinit_class_head:
        leaves = {p: a for p, a in leaves.items() if p[:2] != ("params", "class_embed")}
        fresh_head = _class_head(model_config, seed)
        leaves.update(fresh_head)
        sources.update({p: "re-initialized class head" for p in fresh_head})
        notes.append(
            f"class head re-initialized for {model_config.num_classes} classes (seed {seed}); "
            f"the checkpoint's head had {inferred.get('num_classes')} classes"
        )
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
        "contents": "backbone" if layout == "torchvision" else "detr",
        "inferred_model": inferred,
        "ignored_keys": mapped.ignored,
        "reinitialized": ["params/class_embed"] if reinit_class_head and layout != "torchvision" else [],
        "notes": notes,
    }
    return traverse_util.unflatten_dict(dict(sorted(leaves.items()))), metadata


# ---------------------------------------------------------------------------------------
# Files.


def _checkpoint_file(path: pathlib.Path) -> pathlib.Path:
    """The weights file of `path`, a file or a Hugging Face model directory."""
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise ConversionError(f"{path}: directory holds neither model.safetensors nor pytorch_model.bin")
    return path


def _to_numpy(value) -> np.ndarray | None:
    import torch  # an optional extra (detr-jax[torch]), imported only to read a PyTorch file

    if not isinstance(value, torch.Tensor):
        return None
    if value.is_floating_point():
        return value.detach().to(torch.float32).cpu().numpy()
    return value.detach().cpu().numpy()


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint (.pth/.pt/.bin via torch.load, or .safetensors) as numpy.

    Unwraps {"model": ...} (official DETR) and {"state_dict": ...}, strips a DataParallel
    "module." prefix. Floating tensors become float32. Needs torch (`pip install
    detr-jax[torch]`). Loading never runs code from the file (`weights_only=True`): a file
    that is not a PyTorch checkpoint, or holds objects only a full unpickle would load, is
    refused with a ConversionError saying so.
    """
    path = _checkpoint_file(pathlib.Path(path))
    try:  # torch and safetensors are an optional extra (detr-jax[torch]), needed only here
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading PyTorch checkpoints needs torch (pip install 'detr-jax[torch]')") from e
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            # Official DETR training checkpoints also store their argparse arguments.
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (pickle, zip, runtime); name the file
        # torch's weights-only refusal advises weights_only=False, i.e. unpickling whatever
        # the file holds (arbitrary code): say what the file is instead, never pass that on.
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise _refused(path, e) from None
        raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint: {type(e).__name__}: {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    state_dict, not_tensors = {}, []
    for key, value in raw.items():
        array = _to_numpy(value)
        if array is None:
            not_tensors.append(f"{key} ({type(value).__name__})")
        else:
            state_dict[key] = array
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(not_tensors)}")
    return state_dict


def _refused(path: pathlib.Path, error: Exception) -> ConversionError:
    """Why torch's weights-only load refused `path`: not a checkpoint, or not a safe one."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not (zipfile.is_zipfile(path) or head.startswith(b"\x80")):  # torch.save: a zip, or (legacy) a pickle
        return ConversionError(
            f"{path}: not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle "
            f"(it starts with {head!r})"
        )
    needed = re.search(r"GLOBAL ([\w.]+)", str(error))
    if needed:
        return ConversionError(
            f"{path}: not a safe PyTorch checkpoint: it needs {needed[1]}, which a weights-only load "
            "refuses (unpickling it could run arbitrary code); convert a file that holds only "
            "tensors, such as a saved model.state_dict()"
        )
    return ConversionError(
        f"{path}: not a PyTorch checkpoint, or not a safe one: a weights-only load (which runs no "
        "code from the file) cannot read it"
    )


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def target_config(
    state_dict: Mapping[str, np.ndarray], config, overrides: Mapping[str, Any] | None, source: str
) -> ml_collections.ConfigDict:
    """The config to convert for: the given one (or file, with `overrides`), else the
    defaults with the model shape inferred from the weights, then `overrides`."""
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if config is not None:
        return load_config(config, overrides)
    inferred = {}
    layout = detect_layout(list(state_dict))
    if layout is not None:
        inferred = infer_model(map_state_dict(state_dict, layout).leaves, layout)
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
    Returns:
      (variables, metadata): see `convert_state_dict`; the metadata also names the source
      file (and its sha256), the config file and the model config.
    Raises:
      ConversionError (every problem listed), ConfigError.
    """
    src_path = _checkpoint_file(pathlib.Path(src).absolute())
    state_dict = load_state_dict(src_path)
    config_file = None if config is None or isinstance(config, ml_collections.ConfigDict) else config
    config = target_config(state_dict, config, overrides, str(src_path))
    variables, metadata = convert_state_dict(
        state_dict, config.model, reinit_class_head=reinit_class_head, seed=config.seed, source=str(src_path)
    )
    model = {k: config.model[k] for k in config.model.keys()}
    if metadata["contents"] == "backbone":
        model = {"backbone": config.model.backbone}
    metadata.update(
        source=str(src_path),
        source_sha256=file_sha256(src_path),
        config_file=None if config_file is None else str(pathlib.Path(config_file).absolute()),
        model=model,
        not_inferred_from_weights=list(NOT_INFERABLE_FIELDS),
        converted_by=f"detr-jax {detr_jax.__version__}",
    )
    return variables, metadata
