"""ResNet backbone with frozen BatchNorm, in the torchvision layout, and its "vd" variant.

Layout follows torchvision's ResNet ("v1.5"): the stride of a bottleneck block sits in its
3x3 convolution, the shortcut is a strided 1x1 convolution + BN. Module names mirror
torchvision (`conv1`, `bn1`, `layer1_0/conv2`, `layer1_0/downsample_conv`, ...) so that
PyTorch checkpoints map one to one.

ResNet-vd (He et al., "Bag of Tricks", 2019; RT-DETR's backbone, lyuwenyu/RT-DETR
`PResNet(variant="d")`, Hugging Face's `RTDetrResNetBackbone`) is the same trunk with two
switches of `ResNetSpec`: `deep_stem` (three 3x3 convolutions, `conv1_1`/`bn1_1` ..
`conv1_3`/`bn1_3`, the first of stride 2 and stem_width / 2 channels, in place of the 7x7)
and `avg_down` (a downsampling shortcut is a 2x2 average pool, ceil mode, then a stride-1
1x1 convolution + BN, in place of the strided 1x1 convolution). `block` picks the residual
block by name from BLOCKS: "bottleneck" (R50/R101) or "basic" (R18/R34: two 3x3
convolutions, `conv1`/`bn1`, `conv2`/`bn2`, torchvision's BasicBlock, expansion 1). The
first block of every stage has a projection shortcut, as torchvision's and RT-DETR's (for
a basic block that includes the first stage, where the channels do not change).

The normalization is passed in (`norm`, a factory `(channels, name, dtype, train) -> Module`,
flax ImageNet's `norm=partial(nn.BatchNorm, ...)` pattern), chosen by name from NORMS:
"frozen_bn" keeps scale, bias, running mean and running variance in the `frozen_bn`
variable collection, not in `params`, so no optimizer ever sees them (right for a
pretrained backbone); "group_norm" puts a trainable GroupNorm in each BatchNorm's place
(same module names, in `params`), for a backbone trained from scratch, which frozen
statistics would leave with no normalization at all; "batch_norm" is the trainable,
synchronized BatchNorm (`detr_jax.models.batch_norm`, statistics in `batch_stats`).

A backbone is any module `(images [B, H, W, 3], mask [B, H, W], train) -> BackboneOutput`;
RESNET_BACKBONES maps a name to its builder `(model_config, dtype) -> Module` (all
backbones: detr_jax.models.BACKBONES).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from detr_jax.models.batch_norm import batch_norm
from detr_jax.ops.formulation import for_onnxruntime
from detr_jax.ops.nearest import nearest_indices

# torchvision initializes conv kernels with kaiming_normal_(mode="fan_out", relu).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

FROZEN_BN = "frozen_bn"
ModuleDef = Any


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """Shape of a ResNet: blocks per stage, inner width per stage (a basic block's output
    width), stem width; the residual block (a BLOCKS name, expansion 4 for "bottleneck", 1
    for "basic") and the vd switches `deep_stem` and `avg_down` (module docstring)."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem_width: int
    expansion: int = 4
    block: str = "bottleneck"
    deep_stem: bool = False
    avg_down: bool = False

    @property
    def num_channels(self) -> int:
        """Channels of the last stage's output."""
        return self.widths[-1] * self.expansion


RESNETS = {
    "resnet50": ResNetSpec(depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64),
    "resnet101": ResNetSpec(depths=(3, 4, 23, 3), widths=(64, 128, 256, 512), stem_width=64),
    # For tests and the CPU demo: one block per stage, narrow (256 output channels).
    "resnet_tiny": ResNetSpec(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=16),
    # ResNet-vd, RT-DETR's backbones (lyuwenyu/RT-DETR PResNet variant "d", depths 18 to 101).
    "resnet18_vd": ResNetSpec(depths=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64, expansion=1,
                              block="basic", deep_stem=True, avg_down=True),
    "resnet34_vd": ResNetSpec(depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64, expansion=1,
                              block="basic", deep_stem=True, avg_down=True),
    "resnet50_vd": ResNetSpec(depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64, deep_stem=True,
                              avg_down=True),
    "resnet101_vd": ResNetSpec(depths=(3, 4, 23, 3), widths=(64, 128, 256, 512), stem_width=64, deep_stem=True,
                               avg_down=True),
    # For tests: a narrow ResNet-18-vd (one basic block per stage, 64 output channels).
    "resnet_vd_tiny": ResNetSpec(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=8, expansion=1,
                                 block="basic", deep_stem=True, avg_down=True),
}


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (eps 1e-5), never updated.

    Computes `x * scale' + bias'` with `scale' = weight * rsqrt(var + eps)` and
    `bias' = bias - mean * scale'`, the same arithmetic order as DETR's FrozenBatchNorm2d.
    """

    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., C] -> [..., C]."""
        c = x.shape[-1]
        weight = self.variable(FROZEN_BN, "scale", lambda: jnp.ones((c,), jnp.float32)).value
        bias = self.variable(FROZEN_BN, "bias", lambda: jnp.zeros((c,), jnp.float32)).value
        mean = self.variable(FROZEN_BN, "mean", lambda: jnp.zeros((c,), jnp.float32)).value
        var = self.variable(FROZEN_BN, "var", lambda: jnp.ones((c,), jnp.float32)).value
        scale = weight * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
        shift = bias - mean * scale
        return x * scale.astype(self.dtype) + shift.astype(self.dtype)


def group_norm_groups(channels: int) -> int:
    """Groups of the from-scratch GroupNorm: 32 for wide layers, 4 channels per group below 128."""
    return math.gcd(channels, min(32, max(1, channels // 4)))


def frozen_batch_norm(channels: int, name: str, dtype: Any = jnp.float32, train: bool = False) -> nn.Module:
    """A norm factory: FrozenBatchNorm (`channels` is implied by the statistics; the same in training)."""
    del channels, train
    return FrozenBatchNorm(dtype=dtype, name=name)


def group_norm(channels: int, name: str, dtype: Any = jnp.float32, train: bool = False) -> nn.Module:
    """A norm factory: trainable GroupNorm with `group_norm_groups(channels)` groups (the same in training)."""
    del train
    return nn.GroupNorm(num_groups=group_norm_groups(channels), epsilon=1e-5, dtype=dtype, name=name)


# model.backbone_norm -> norm factory (channels, name, dtype, train) -> Module
NORMS: dict[str, Callable[..., nn.Module]] = {"frozen_bn": frozen_batch_norm, "group_norm": group_norm,
                                              "batch_norm": batch_norm}


def pointwise(x: jnp.ndarray, kernel: jnp.ndarray, dtype: Any, stride: int = 1) -> jnp.ndarray:
    """A 1x1 convolution: x [B, H, W, C_in], kernel [1, 1, C_in, C_out] -> [B, ceil(H/stride),
    ceil(W/stride), C_out] in `dtype`.

    For XLA (jit, training, the StableHLO and SavedModel exports) a matrix product, the same
    dot_general as einsum("bhwc,co->bhwo") after a strided slice: XLA:CPU runs its dots
    faster than its 1x1 convolutions, and their gradients without transposing activations
    (`PointwiseConv`). ONNX converters map it to MatMul, where an einsum becomes
    onnxruntime's slow Einsum.

    Traced for onnxruntime (`detr_jax.ops.formulation`, the ONNX export) a convolution, ONNX
    Conv: onnxruntime's CPU convolutions keep their blocked channel layout (NCHWc) from one
    convolution to the next and fold the frozen BatchNorm into them, which a MatMul in the
    NHWC layout between them prevents.
    """
    if for_onnxruntime():
        return lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return jnp.matmul(x.astype(dtype), kernel[0, 0].astype(dtype))


class PointwiseConv(nn.Module):
    """A 1x1 convolution computed as a matrix product, with nn.Conv's parameter layout.

    Same result and parameters ({"kernel": [1, 1, C_in, C_out], "bias": [C_out]}) as
    `nn.Conv(features, (1, 1), strides)`, but as a dot: XLA:CPU differentiates a 1x1
    convolution into a "convolution" with batch and channels swapped, which transposes
    whole activations and ran ~2x slower end to end on ResNet-50 training; the dot's
    weight gradient is a plain matrix product.
    """

    features: int
    stride: int = 1
    use_bias: bool = False
    kernel_init: Any = conv_kernel_init
    bias_init: Any = nn.initializers.zeros
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, C_in] -> [B, ceil(H/stride), ceil(W/stride), features]."""
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
        y = pointwise(x, kernel, self.dtype, self.stride)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
        return y


def conv2d(features: int, kernel: int, stride: int = 1, dilation: int = 1, name: str | None = None,
           dtype: Any = jnp.float32) -> nn.Module:
    """A bias-free conv with PyTorch's symmetric padding (dilation * (kernel // 2))."""
    if kernel == 1:
        return PointwiseConv(features, stride, dtype=dtype, name=name)
    pad = dilation * (kernel // 2)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        name=name,
    )


def avg_pool_ceil(x: jnp.ndarray) -> jnp.ndarray:
    """PyTorch's `AvgPool2d(2, 2, ceil_mode=True)`: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C],
    each output the mean of the input cells its window covers (a window that runs past an odd
    edge averages the cells inside). Padded explicitly, as the stem's max pool."""
    height, width = x.shape[1], x.shape[2]
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    total = nn.avg_pool(jnp.pad(x, pad), (2, 2), strides=(2, 2), padding="VALID")
    if height % 2 == 0 and width % 2 == 0:
        return total
    counts = nn.avg_pool(jnp.pad(jnp.ones((1, height, width, 1), x.dtype), pad), (2, 2), strides=(2, 2),
                         padding="VALID")
    return total / counts


def projection_shortcut(x: jnp.ndarray, features: int, stride: int, avg_down: bool, norm: ModuleDef,
                        dtype: Any) -> jnp.ndarray:
    """A block's projection shortcut, called inside its compact method (`downsample_conv`,
    `downsample_bn`): a 1x1 convolution with the block's stride + BN, or with `avg_down` and
    stride 2 the vd shortcut (2x2 average pool, ceil mode, then a stride-1 1x1 convolution +
    BN)."""
    if avg_down and stride == 2:
        x, stride = avg_pool_ceil(x), 1
    x = conv2d(features, 1, stride, name="downsample_conv", dtype=dtype)(x)
    return norm(features, "downsample_bn")(x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x expansion), residual, ReLU. The shortcut is
    a projection (`projection_shortcut`) when the block changes the shape or `project` (the first
    block of a stage)."""

    width: int
    stride: int = 1
    dilation: int = 1
    expansion: int = 4
    norm: ModuleDef = frozen_batch_norm
    dtype: Any = jnp.float32
    project: bool = False
    avg_down: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, C_in] -> [B, H/stride, W/stride, width * expansion]."""
        out_ch = self.width * self.expansion
        y = conv2d(self.width, 1, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(self.norm(self.width, "bn1")(y))
        y = conv2d(self.width, 3, self.stride, self.dilation, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(self.norm(self.width, "bn2")(y))
        y = conv2d(out_ch, 1, name="conv3", dtype=self.dtype)(y)
        y = self.norm(out_ch, "bn3")(y)
        if self.project or self.stride != 1 or x.shape[-1] != out_ch:
            x = projection_shortcut(x, out_ch, self.stride, self.avg_down, self.norm, self.dtype)
        return nn.relu(x + y)


class BasicBlock(nn.Module):
    """3x3 (stride, dilation) -> 3x3, residual, ReLU (torchvision's BasicBlock; `expansion`
    is 1). The shortcut as Bottleneck's."""

    width: int
    stride: int = 1
    dilation: int = 1
    expansion: int = 1
    norm: ModuleDef = frozen_batch_norm
    dtype: Any = jnp.float32
    project: bool = False
    avg_down: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, C_in] -> [B, H/stride, W/stride, width * expansion]."""
        out_ch = self.width * self.expansion
        y = conv2d(self.width, 3, self.stride, self.dilation, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(self.norm(self.width, "bn1")(y))
        y = conv2d(out_ch, 3, 1, self.dilation, name="conv2", dtype=self.dtype)(y)
        y = self.norm(out_ch, "bn2")(y)
        if self.project or self.stride != 1 or x.shape[-1] != out_ch:
            x = projection_shortcut(x, out_ch, self.stride, self.avg_down, self.norm, self.dtype)
        return nn.relu(x + y)


# ResNetSpec.block -> residual block
BLOCKS: dict[str, type[nn.Module]] = {"bottleneck": Bottleneck, "basic": BasicBlock}


class ResNet(nn.Module):
    """ResNet trunk (`spec`: torchvision's, or vd); returns every stage's output, "res2"
    (stride 4) to "res5" (stride 32, or 16 with DC5).

    With `dilation=True` the last stage keeps stride 16 and dilates its 3x3 convolutions
    instead, as torchvision's `replace_stride_with_dilation=[False, False, True]`: the first
    block of the stage keeps dilation 1 (the previous dilation), the following ones use 2.
    """

    spec: ResNetSpec
    dilation: bool = False
    norm: ModuleDef = frozen_batch_norm  # factory (channels, name) -> Module, dtype bound
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """x: [B, H, W, 3] normalized image -> {"res2": [B, H/4, W/4, C2], ...,
        "res5": [B, ceil(H/32), ceil(W/32), num_channels]}."""
        x = x.astype(self.dtype)
        if self.spec.deep_stem:  # vd: 3x3 (stride 2, half width) -> 3x3 (half width) -> 3x3
            half = self.spec.stem_width // 2
            for i, (features, stride) in enumerate(((half, 2), (half, 1), (self.spec.stem_width, 1)), 1):
                x = conv2d(features, 3, stride, name=f"conv1_{i}", dtype=self.dtype)(x)
                x = nn.relu(self.norm(features, f"bn1_{i}")(x))
        else:
            x = nn.Conv(
                self.spec.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, kernel_init=conv_kernel_init, dtype=self.dtype, name="conv1",
            )(x)
            x = nn.relu(self.norm(self.spec.stem_width, "bn1")(x))
        # The same as max_pool(padding=((1, 1), (1, 1))), which pads with -inf; padded
        # explicitly because ONNX converters (jax2onnx 0.12) drop a pooling's explicit
        # padding, which shrank every feature map by one cell.
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
        stages = {}
        current_dilation = 1
        last_stage = len(self.spec.depths) - 1
        for stage, (depth, width) in enumerate(zip(self.spec.depths, self.spec.widths)):
            stride = 1 if stage == 0 else 2
            first_dilation = current_dilation
            if stage == last_stage and self.dilation:
                current_dilation *= stride
                stride = 1
            for block in range(depth):
                x = BLOCKS[self.spec.block](
                    width,
                    stride=stride if block == 0 else 1,
                    dilation=first_dilation if block == 0 else current_dilation,
                    expansion=self.spec.expansion,
                    norm=self.norm,
                    dtype=self.dtype,
                    project=block == 0,
                    avg_down=self.spec.avg_down,
                    name=f"layer{stage + 1}_{block}",
                )(x)
            stages[f"res{stage + 2}"] = x
        return stages


def resize_nearest(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """PyTorch's `F.interpolate(mode="nearest")` over axes 1 and 2: [B, H, W, ...] ->
    [B, height, width, ...] (masks, or feature maps up or down)."""
    # jnp for the symbolic sizes of an export with a dynamic image size (detr_jax.serving.export).
    xp = np if all(isinstance(n, int) for n in (*x.shape[1:3], height, width)) else jnp
    return x[:, nearest_indices(x.shape[1], height, xp)][:, :, nearest_indices(x.shape[2], width, xp)]


def downsample_mask(mask: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """Nearest-neighbour resize of a pixel mask: [B, H, W] bool -> [B, height, width] bool."""
    return resize_nearest(mask, height, width)


class BackboneOutput(NamedTuple):
    """What every backbone returns.

    features: [B, h, w, C], the map the transformer reads; mask: [B, h, w] bool (True =
    real position); stages: named intermediate maps for heads that want them (a ResNet's
    "res2".."res5", "res5" being `features`).
    """

    features: jnp.ndarray
    mask: jnp.ndarray
    stages: dict[str, jnp.ndarray]


class ResNetBackbone(nn.Module):
    """A ResNet trunk (submodule "body") plus the padding mask at the feature map's resolution."""

    spec: ResNetSpec
    dilation: bool = False
    norm: ModuleDef = frozen_batch_norm
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False) -> BackboneOutput:
        """images: [B, H, W, 3] normalized, mask: [B, H, W] bool (True = real pixel)."""
        stages = ResNet(self.spec, self.dilation, functools.partial(self.norm, train=train), self.dtype,
                        name="body")(images)
        features = stages["res5"]
        return BackboneOutput(features, downsample_mask(mask, features.shape[1], features.shape[2]), stages)


def build_resnet(spec: ResNetSpec, model_config, dtype: Any) -> ResNetBackbone:
    """A ResNet backbone from the `model` config section (dilation, backbone_norm).
    Raises ValueError if `model.backbone_args` is set: a ResNet has no such settings."""
    if model_config.backbone_args:
        raise ValueError(f"a ResNet takes no backbone_args (its settings are model.dilation and "
                         f"model.backbone_norm), got {dict(model_config.backbone_args)}")
    norm = functools.partial(NORMS[model_config.backbone_norm], dtype=dtype)
    return ResNetBackbone(spec=spec, dilation=model_config.dilation, norm=norm, dtype=dtype)


# model.backbone -> builder (model_config, dtype) -> backbone module (merged in detr_jax.models)
RESNET_BACKBONES: dict[str, Callable[[Any, Any], nn.Module]] = {
    name: functools.partial(build_resnet, spec) for name, spec in RESNETS.items()
}
