"""RT-DETR's hybrid encoder (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection",
2024): the backbone's levels -> the same number of fused levels of width E, finest first.

  input projections  each level through a 1x1 convolution + BatchNorm (`input_proj{l}`;
      Hugging Face keeps them in `RTDetrModel.encoder_input_proj`, official RT-DETR in
      `HybridEncoder.input_proj`);
  AIFI  one (num_encoder_layers) post-norm transformer encoder layer on the levels of
      `encode_levels` (the coarsest), its queries and keys plus the fixed 2-D sin-cos
      encoding `position_encoding.sincos_2d`, no padding mask (`aifi{i}/layer{j}`, DETR's
      `EncoderLayer` with an exact GELU feed-forward);
  CCFM  top-down FPN, coarse to fine: a 1x1 conv-BN-activation `lateral_conv{i}` of the
      coarser map (which replaces it among the outputs), nearest x2 upsampling, concatenation
      with the finer level, a `CSPRepLayer` `fpn_block{i}`; then bottom-up PAN, fine to
      coarse: a 3x3 stride-2 conv-BN-activation `downsample_conv{i}`, concatenation with
      the FPN map of the next level, a `CSPRepLayer` `pan_block{i}`.

Every convolution is bias-free and followed by BatchNorm (`ConvNorm`: `conv`, `norm`);
activations SiLU (`activation`). The BatchNorms are trainable, as RT-DETR's
(`detr_jax.models.batch_norm`: PyTorch's semantics, scale and bias in `params`, the
running statistics in `batch_stats`, updated by a training step, synchronized over the
global batch).
RepVGG blocks (`RepVggBlock`: a 3x3 and a 1x1 conv-BN branch, summed) fold into one 3x3
convolution with bias for inference: `fuse_repvgg(variables)` rewrites the variables, and
`HybridEncoder(fused_repvgg=True)` reads them.

Exact, module for module, to Hugging Face's `RTDetrHybridEncoder` (with the input
projections) and to lyuwenyu/RT-DETR's `HybridEncoder` (square levels; see `sincos_2d`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from detr_jax.models.batch_norm import BATCH_STATS, BN_EPSILON, batch_norm
from detr_jax.models.position_encoding import sincos_2d
from detr_jax.models.resnet import conv2d
from detr_jax.models.transformer import EncoderLayer

Activation = Callable[[jnp.ndarray], jnp.ndarray]
ModuleDef = Any

# RT-DETR's activations by the names its configs use (Hugging Face's ACT2FN: exact GELU).
ACTIVATIONS: dict[str, Activation] = {
    "silu": nn.silu,
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
}
class ConvNorm(nn.Module):
    """A bias-free convolution (PyTorch's padding kernel // 2) + norm + optional activation
    (Hugging Face's `RTDetrConvNormLayer`): parameters `conv` and `norm`."""

    features: int
    kernel: int = 1
    stride: int = 1
    activation: Activation | None = None
    norm: ModuleDef = batch_norm
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features]."""
        x = conv2d(self.features, self.kernel, self.stride, name="conv", dtype=self.dtype)(x)
        x = self.norm(self.features, "norm")(x)
        return x if self.activation is None else self.activation(x)


class RepVggBlock(nn.Module):
    """activation(3x3 conv-BN + 1x1 conv-BN) (`conv1`, `conv2`); with `fused`, the one 3x3
    convolution with bias `conv` that `fuse_repvgg` makes of them."""

    features: int
    activation: Activation = nn.silu
    fused: bool = False
    norm: ModuleDef = batch_norm
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.fused:
            y = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv")(x)
        else:
            y = (ConvNorm(self.features, 3, norm=self.norm, dtype=self.dtype, name="conv1")(x)
                 + ConvNorm(self.features, 1, norm=self.norm, dtype=self.dtype, name="conv2")(x))
        return self.activation(y)


class CSPRepLayer(nn.Module):
    """Cross-stage partial layer of RepVGG blocks: conv3(bottlenecks(conv1(x)) + conv2(x)),
    conv1 and conv2 1x1 conv-BN-activations to `hidden` channels, `num_blocks` RepVGG blocks
    (`bottleneck{k}`), conv3 a 1x1 conv-BN-activation to `features` when hidden differs."""

    features: int
    hidden: int
    num_blocks: int = 3
    activation: Activation = nn.silu
    fused_repvgg: bool = False
    norm: ModuleDef = batch_norm
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        def conv_norm(features, name):
            return ConvNorm(features, 1, activation=self.activation, norm=self.norm, dtype=self.dtype, name=name)

        y = conv_norm(self.hidden, "conv1")(x)
        for k in range(self.num_blocks):
            y = RepVggBlock(self.hidden, self.activation, self.fused_repvgg, self.norm, self.dtype,
                            name=f"bottleneck{k}")(y)
        y = y + conv_norm(self.hidden, "conv2")(x)
        return y if self.hidden == self.features else conv_norm(self.features, "conv3")(y)


class AIFI(nn.Module):
    """Attention-based intra-scale feature interaction: `num_layers` post-norm encoder layers
    (`layer{j}`) over one level, with the fixed 2-D sin-cos encoding, no padding mask."""

    num_heads: int
    dim_feedforward: int
    num_layers: int = 1
    dropout: float = 0.0
    temperature: float = 10000.0
    activation: Activation = ACTIVATIONS["gelu"]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        """x: [B, h, w, E] -> [B, h, w, E]."""
        batch, height, width, dim = x.shape
        pos = jnp.asarray(sincos_2d(height, width, dim, self.temperature))[None].astype(self.dtype)
        src = x.reshape(batch, height * width, dim)
        for j in range(self.num_layers):
            src = EncoderLayer(self.num_heads, self.dim_feedforward, self.dropout, dtype=self.dtype,
                               activation=self.activation, name=f"layer{j}")(src, pos, None, deterministic)
        return src.reshape(batch, height, width, dim)


def upsample2(x: jnp.ndarray) -> jnp.ndarray:
    """PyTorch's `F.interpolate(scale_factor=2, mode="nearest")`: [B, h, w, C] -> [B, 2h, 2w, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class HybridEncoder(nn.Module):
    """The hybrid encoder (module docstring): levels [B, h_l, w_l, C_l], finest first, each
    half the size of the one before -> as many levels [B, h_l, w_l, hidden_dim].

    encode_levels: the levels AIFI refines (Hugging Face's `encode_proj_layers`, by default
    the last); expansion: the CSP layers' hidden width over hidden_dim (`hidden_expansion`);
    num_blocks: RepVGG blocks per CSP layer; activation: the CCFM's, encoder_activation: the
    AIFI feed-forward's."""

    hidden_dim: int = 256
    num_heads: int = 8
    dim_feedforward: int = 1024
    num_encoder_layers: int = 1
    dropout: float = 0.0
    encode_levels: tuple[int, ...] = (2,)
    temperature: float = 10000.0
    expansion: float = 1.0
    num_blocks: int = 3
    activation: Activation = nn.silu
    encoder_activation: Activation = ACTIVATIONS["gelu"]
    fused_repvgg: bool = False
    norm: ModuleDef = batch_norm
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray], train: bool = False) -> tuple[jnp.ndarray, ...]:
        """features: the backbone's levels [B, h_l, w_l, C_l]; train: dropout in AIFI, and
        the BatchNorms normalize with the batch's statistics and update their running ones
        (which needs `mutable=["batch_stats"]`). Returns the fused levels."""
        dim = self.hidden_dim
        norm = functools.partial(self.norm, train=train)

        def conv_norm(kernel, stride, name, activation=self.activation):
            return ConvNorm(dim, kernel, stride, activation, norm, self.dtype, name=name)

        def csp(name):
            return CSPRepLayer(dim, int(dim * self.expansion), self.num_blocks, self.activation, self.fused_repvgg,
                               norm, self.dtype, name=name)

        levels = [conv_norm(1, 1, f"input_proj{l}", None)(f.astype(self.dtype)) for l, f in enumerate(features)]
        if self.num_encoder_layers > 0:
            for i, level in enumerate(self.encode_levels):
                levels[level] = AIFI(self.num_heads, self.dim_feedforward, self.num_encoder_layers, self.dropout,
                                     self.temperature, self.encoder_activation, self.dtype,
                                     name=f"aifi{i}")(levels[level], deterministic=not train)
        # top-down FPN, coarse to fine
        inner = [levels[-1]]
        for i in range(len(levels) - 1):
            inner[-1] = conv_norm(1, 1, f"lateral_conv{i}")(inner[-1])
            fused = jnp.concatenate([upsample2(inner[-1]), levels[-2 - i]], axis=-1)
            inner.append(csp(f"fpn_block{i}")(fused))
        inner.reverse()
        # bottom-up PAN, fine to coarse
        outs = [inner[0]]
        for i in range(len(levels) - 1):
            fused = jnp.concatenate([conv_norm(3, 2, f"downsample_conv{i}")(outs[-1]), inner[i + 1]], axis=-1)
            outs.append(csp(f"pan_block{i}")(fused))
        return tuple(outs)


_REPVGG_BLOCK = re.compile(r"bottleneck\d+")


def _fuse_branch(kernel: np.ndarray, norm: dict, stats: dict, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """A bias-free conv kernel [k, k, I, O] + inference BatchNorm -> (kernel, bias) of one conv."""
    std = np.sqrt(np.asarray(stats["var"], np.float64) + epsilon)
    t = np.asarray(norm["scale"], np.float64) / std
    bias = np.asarray(norm["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * t
    return np.asarray(kernel, np.float64) * t, bias


def fuse_repvgg(variables: dict, epsilon: float = BN_EPSILON) -> dict:
    """The variables of `HybridEncoder(fused_repvgg=True)` (or of any model holding the
    encoder) from those of the unfused one: every RepVGG block (`bottleneck{k}` with `conv1`
    3x3 and `conv2` 1x1 conv-BN branches) becomes one 3x3 convolution `conv` {kernel, bias}:
    each branch's BatchNorm folded into its kernel (in float64), the 1x1 kernel zero-padded
    to the centre of the 3x3, kernels and biases summed, in the kernels' dtype. Their running
    statistics leave `batch_stats`; every other variable is kept (as numpy)."""
    params = traverse_util.flatten_dict(variables["params"])
    stats = traverse_util.flatten_dict(variables.get(BATCH_STATS, {}))
    blocks = {path[:i + 1] for path in params for i, name in enumerate(path[:-1])
              if _REPVGG_BLOCK.fullmatch(name) and path[i + 1] in ("conv1", "conv2")}

    def kept(tree):
        return {k: np.asarray(v) for k, v in tree.items() if not any(k[:len(b)] == b for b in blocks)}

    fused_params, fused_stats = kept(params), kept(stats)
    for block in blocks:
        kernel, bias = 0.0, 0.0
        for branch in ("conv1", "conv2"):
            k = np.asarray(params[block + (branch, "conv", "kernel")], np.float64)
            pad = (3 - k.shape[0]) // 2
            k = np.pad(k, ((pad, pad), (pad, pad), (0, 0), (0, 0)))
            scale = np.asarray(params[block + (branch, "norm", "scale")], np.float64)
            shift = np.asarray(params[block + (branch, "norm", "bias")], np.float64)
            mean = np.asarray(stats[block + (branch, "norm", "mean")], np.float64)
            var = np.asarray(stats[block + (branch, "norm", "var")], np.float64)
            t = scale / np.sqrt(var + epsilon)
            kernel, bias = kernel + k * t, bias + shift - mean * t
        dtype = np.asarray(params[block + ("conv1", "conv", "kernel")]).dtype
        fused_params[block + ("conv", "kernel")] = kernel.astype(dtype)
        fused_params[block + ("conv", "bias")] = bias.astype(dtype)
    result = {k: v for k, v in variables.items() if k not in ("params", BATCH_STATS)}
    result["params"] = traverse_util.unflatten_dict(fused_params)
    if fused_stats:
        result[BATCH_STATS] = traverse_util.unflatten_dict(fused_stats)
    return result


def build_hybrid_encoder(hidden_dim: int, num_heads: int = 8, dim_feedforward: int = 1024,
                         num_encoder_layers: int = 1, dropout: float = 0.0, encode_levels: Sequence[int] = (2,),
                         temperature: float = 10000.0, expansion: float = 1.0, num_blocks: int = 3,
                         activation: str = "silu", encoder_activation: str = "gelu", fused_repvgg: bool = False,
                         dtype: Any = jnp.float32) -> HybridEncoder:
    """A HybridEncoder from plain settings, activations by name (ACTIVATIONS)."""
    for name in (activation, encoder_activation):
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return HybridEncoder(hidden_dim, num_heads, dim_feedforward, num_encoder_layers, dropout, tuple(encode_levels),
                         temperature, expansion, num_blocks, ACTIVATIONS[activation], ACTIVATIONS[encoder_activation],
                         fused_repvgg, functools.partial(batch_norm, dtype=dtype), dtype)
