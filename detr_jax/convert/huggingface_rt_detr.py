"""Hugging Face transformers' RT-DETR names -> our parameter paths, for the parts built so
far: the ResNet-vd backbone (`model.backbone.model.*`, `RTDetrResNetBackbone`'s names, the
rules of `detr_jax.convert.resnet`; its BatchNorms are frozen) and the hybrid encoder with
its input projections (`model.encoder_input_proj.{l}.{0,1}`, `model.encoder.*`, under our
`encoder`; trainable BatchNorms: scale and bias in params, running statistics in
batch_stats). Detection of the layout and inference of the model come with the detector.
"""

from __future__ import annotations

from detr_jax.convert.huggingface_detr_family import encoder_layer
from detr_jax.convert.resnet import resnet_body_module
from detr_jax.convert.rules import Module, first_match

LAYOUT = "huggingface_rt_detr"
ENCODER = ("encoder",)
_CONV_NORM = {"conv": "conv", "norm": "batchnorm"}


def _conv_norm(path: tuple[str, ...]):
    """A `RTDetrConvNormLayer` (`.conv`, `.norm`) -> our ConvNorm at `path`."""
    return lambda what: Module(path + (what,), _CONV_NORM[what])


def encoder_module(name: str) -> Module | None:
    """`[model.]encoder_input_proj.*` and `[model.]encoder.*` -> our HybridEncoder's modules,
    or None."""
    csp = r"encoder\.(fpn|pan)_blocks\.(\d+)\."
    return first_match([
        (r"encoder_input_proj\.(\d+)\.([01])",
         lambda l, i: Module(ENCODER + (f"input_proj{l}", ("conv", "norm")[int(i)]), ("conv", "batchnorm")[int(i)])),
        (r"encoder\.aifi\.(\d+)\.layers\.(\d+)\.(.+)",
         lambda i, j, rest: encoder_layer(ENCODER + (f"aifi{i}", f"layer{j}"), rest)),
        (r"encoder\.(lateral|downsample)_convs\.(\d+)\.(conv|norm)",
         lambda kind, i, what: _conv_norm(ENCODER + (f"{kind}_conv{i}",))(what)),
        (csp + r"conv([123])\.(conv|norm)",
         lambda kind, i, j, what: _conv_norm(ENCODER + (f"{kind}_block{i}", f"conv{j}"))(what)),
        (csp + r"bottlenecks\.(\d+)\.conv([12])\.(conv|norm)",
         lambda kind, i, k, j, what: _conv_norm(ENCODER + (f"{kind}_block{i}", f"bottleneck{k}", f"conv{j}"))(what)),
    ], name.removeprefix("model."))


def module(name: str) -> Module | None:
    """Where the PyTorch module `name` of an RT-DETR checkpoint goes (the backbone and the
    encoder), or None when no rule covers it. Names as `RTDetrForObjectDetection` has them
    (`model.` first) or `RTDetrModel`."""
    return first_match([
        (r"(?:model\.)?backbone\.model\.(.+)", resnet_body_module),
        (r"((?:model\.)?encoder(?:_input_proj)?\..+)", encoder_module),
    ], name)
