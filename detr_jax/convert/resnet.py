"""ResNet bodies: torchvision, timm and official DETR names, transformers' native ResNet
names and its ResNet-vd (`RTDetrResNetBackbone`: the deep stem `embedder.embedder.{0,1,2}`,
the average-pool shortcut `shortcut.1`); the torchvision ImageNet layout; the ResNet a
body's tensors describe."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from detr_jax.convert.leaves import indices, shape
from detr_jax.convert.rules import IGNORED, Module, Path, first_match
from detr_jax.models.resnet import RESNETS

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
    # transformers' ResNet-vd (RTDetrResNetBackbone): the deep stem; a shortcut after an average pool
    (r"embedder\.embedder\.([012])\.(convolution|normalization)",
     lambda i, what: Module(BODY + (("conv1_" if what == "convolution" else "bn1_") + str(int(i) + 1),),
                            "conv" if what == "convolution" else "bn")),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.([012])\.(convolution|normalization)",
        lambda s, b, j, what: Module(
            BODY + (f"layer{int(s) + 1}_{b}", ("conv" if what == "convolution" else "bn") + str(int(j) + 1)),
            "conv" if what == "convolution" else "bn",
        ),
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(?:1\.)?(convolution|normalization)",
        lambda s, b, what: Module(
            BODY + (f"layer{int(s) + 1}_{b}", "downsample_conv" if what == "convolution" else "downsample_bn"),
            "conv" if what == "convolution" else "bn",
        ),
    ),
]


def resnet_body_module(name: str) -> Module | None:
    return first_match(_RESNET_BODY_RULES, name)


def torchvision_module(name: str) -> Module | None:
    if name == "fc":  # the ImageNet classifier: not part of DETR
        return IGNORED
    return resnet_body_module(name)


def infer_backbone(leaves: Mapping[Path, np.ndarray]) -> tuple[str | None, str]:
    """(name in RESNETS or None, a description such as "depths (3, 4, 6, 3), ...").

    A deep stem (`conv1_1`..`conv1_3`) is a ResNet-vd's, whose downsampling shortcuts are
    average pools (they have no tensors to tell)."""
    body = ("params",) + BODY
    blocks = indices(leaves, body, r"layer(\d)_(\d+)")
    depths = tuple(sum(1 for s, _ in blocks if int(s) == stage) for stage in (1, 2, 3, 4))
    widths = tuple((shape(leaves, *body, f"layer{s}_0", "conv1", "kernel") or (0,))[-1] for s in (1, 2, 3, 4))
    deep_stem = (*body, "conv1_3", "kernel") in leaves
    stem = (shape(leaves, *body, "conv1_3" if deep_stem else "conv1", "kernel") or (0,))[-1]
    block = "bottleneck" if (*body, "layer1_0", "conv3", "kernel") in leaves else "basic"
    description = f"ResNet{'-vd' if deep_stem else ''} with {block} blocks, depths {depths}, widths {widths}, stem {stem}"
    for name, spec in RESNETS.items():
        if (spec.depths, spec.widths, spec.stem_width, spec.block, spec.deep_stem) == (
                depths, widths, stem, block, deep_stem):
            return name, description
    return None, description
