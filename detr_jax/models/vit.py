"""A Vision Transformer backbone: DETR with no CNN in front of its transformer.

The image is cut into patches (a strided convolution, "patch_embed"), learned position
embeddings are added, and pre-norm blocks (LayerNorm -> attention, LayerNorm -> GELU MLP,
each residual) refine the tokens; the last block's tokens, after a final LayerNorm, are
the stride-`patch_size` feature map the DETR transformer reads.

What makes it a detection backbone rather than an ImageNet classifier:
- Position embeddings are a learned grid (`pos_grid`, the pretraining grid: 14x14 for
  224-pixel ViTs) resampled to each image's own patch grid with PyTorch's bicubic
  interpolation (`F.interpolate(mode="bicubic", align_corners=False)`, as Hugging Face's
  `interpolate_pos_encoding`). "Own" means the grid of the unpadded image, so any size
  and aspect ratio works, and the exact native grid is the identity.
- Padding-aware: patches with no real pixel are masked out of every attention, windows
  are anchored at the top-left corner, and position embeddings depend only on the
  unpadded size, so an image's features do not depend on how much padding its batch has.
- Optional windowed attention (ViTDet: non-overlapping `window_size` x `window_size`
  windows in every block except `global_blocks`), for large images where global
  attention over every patch is quadratic; stochastic depth (`drop_path_rate`, linear in
  depth); compute in `dtype` (bfloat16), parameters float32.
- Optional prefix tokens (`num_prefix_tokens`: 1 for ViT's class token, 2 for distilled
  DeiT's class and distillation tokens) that attend with the patches but are not part of
  the feature map: kept so that converted pretrained weights compute what they computed
  in pretraining. ViTDet drops them; 0 is the default for training from scratch.

Parameter names follow the ViT layout (patch_embed, pos_embed, blocks_{i}/norm1,
attn/{q,k,v,out}_proj, norm2, mlp/fc{1,2}, norm), so Hugging Face and timm weights map
one to one (detr_jax.convert).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from detr_jax.ops.image_statistics import IMAGENET_MEAN, IMAGENET_STD
from detr_jax.models.resnet import BackboneOutput
from detr_jax.models.transformer import MultiHeadAttention

# torch's bicubic kernel coefficient (Keys' a = -0.75), not jax.image.resize's -0.5.
_CUBIC_A = -0.75


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """Shape of a ViT: token width, number of blocks, attention heads, patch size."""

    width: int
    depth: int
    num_heads: int
    patch_size: int


# The ViT paper's and DeiT's sizes; every patch size in _PATCH_SIZES, named vit_{size}{patch}.
_SIZES = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}
_PATCH_SIZES = (8, 14, 16, 32)
VITS = {f"vit_{size}{patch}": ViTSpec(width, depth, heads, patch)
        for size, (width, depth, heads) in _SIZES.items() for patch in _PATCH_SIZES}


def _cubic_weights(t: jnp.ndarray) -> jnp.ndarray:
    """Weights of the 4 taps (idx-1 .. idx+2) at fractional offset t: [...] -> [..., 4]."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_resize_matrix(out_sizes: jnp.ndarray, in_size: int, length: int) -> jnp.ndarray:
    """Per-image 1-D resampling matrices of torch's bicubic interpolation (align_corners=False).

    Row j of image b holds the weights that output position j < out_sizes[b] takes from the
    `in_size` input positions (borders replicated, as torch does). Rows from out_sizes[b]
    on are zero-padding positions: their values are never used.

    out_sizes: [B] int (traced); returns [B, length, in_size] float32.
    """
    out = jnp.maximum(out_sizes, 1).astype(jnp.float32)
    scale = jnp.float32(in_size) / out  # torch's scale when `size` is given
    src = (jnp.arange(length, dtype=jnp.float32)[None] + 0.5) * scale[:, None] - 0.5
    floor = jnp.floor(src)
    t = src - floor
    taps = jnp.clip(floor.astype(jnp.int32)[..., None] + jnp.arange(-1, 3), 0, in_size - 1)  # [B, L, 4]
    onehot = jax.nn.one_hot(taps, in_size, dtype=jnp.float32)  # [B, L, 4, in_size]
    return jnp.einsum("blk,blki->bli", _cubic_weights(t), onehot)


def resample_grid(grid: jnp.ndarray, rows: jnp.ndarray, cols: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """A learned [gh, gw, C] grid resized to each image's (rows[b], cols[b]) patch grid,
    placed top-left in a [B, height, width, C] array (beyond it: don't-care values).

    At rows = gh, cols = gw the result is the grid itself, exactly.
    """
    wy = bicubic_resize_matrix(rows, grid.shape[0], height)
    wx = bicubic_resize_matrix(cols, grid.shape[1], width)
    return jnp.einsum("byi,ijc,bxj->byxc", wy, grid.astype(jnp.float32), wx)


def sincos_grid_init(key, shape, dtype=jnp.float32) -> jnp.ndarray:
    """An initializer: the 2-D sine-cosine position table of shape [rows, cols, C] (C a
    multiple of 4: sin and cos of y, then of x, at temperature 10000), as MAE and big_vision's
    "sincos2d". `key` is unused (deterministic)."""
    del key
    rows, cols, channels = shape
    if channels % 4:
        raise ValueError(f"a sincos position table needs a width divisible by 4, got {channels}")
    omega = 1.0 / 10000.0 ** (jnp.arange(channels // 4, dtype=jnp.float32) / (channels // 4))
    y = jnp.arange(rows, dtype=jnp.float32)[:, None, None] * omega
    x = jnp.arange(cols, dtype=jnp.float32)[None, :, None] * omega
    y, x = jnp.broadcast_to(y, (rows, cols, channels // 4)), jnp.broadcast_to(x, (rows, cols, channels // 4))
    return jnp.concatenate([jnp.sin(y), jnp.cos(y), jnp.sin(x), jnp.cos(x)], axis=-1).astype(dtype)


def drop_path(x: jnp.ndarray, rate: float, deterministic: bool, module: nn.Module) -> jnp.ndarray:
    """Stochastic depth: zeroes a residual branch per sample with probability `rate`
    (rescaling the kept ones), x: [B, ...]. Uses the "dropout" rng."""
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def window_partition(x: jnp.ndarray, mask: jnp.ndarray, size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[B, h, w, C] tokens and [B, h, w] mask -> [B * nh * nw, size * size, C] windows and
    their masks, the grid padded bottom/right to whole windows (padding masked out)."""
    b, h, w, c = x.shape
    ph, pw = -h % size, -w % size
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, ph), (0, pw)))
    nh, nw = (h + ph) // size, (w + pw) // size

    def split(a):
        a = a.reshape((b, nh, size, nw, size) + a.shape[3:])
        a = jnp.moveaxis(a, 2, 3)  # [B, nh, nw, size, size, ...]
        return a.reshape((b * nh * nw, size * size) + a.shape[5:])

    return split(x), split(mask)


def window_merge(windows: jnp.ndarray, batch: int, h: int, w: int, size: int) -> jnp.ndarray:
    """Inverse of window_partition: [B * nh * nw, size * size, C] -> [B, h, w, C]."""
    nh, nw = -(-h // size), -(-w // size)
    x = windows.reshape(batch, nh, nw, size, size, -1)
    x = jnp.moveaxis(x, 3, 2).reshape(batch, nh * size, nw * size, -1)
    return x[:, :h, :w]


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: a stride-p p x p convolution, computed as
    one matrix product over flattened patches, with nn.Conv's parameters ({"kernel":
    [p, p, 3, E], "bias": [E]}). XLA:CPU runs the strided convolution's backward as a
    general convolution; the product is a plain GEMM both ways."""

    features: int
    patch_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, H, W, C] with H, W multiples of patch_size -> [B, H/p, W/p, features]."""
        b, height, width, c = x.shape
        p = self.patch_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        patches = x.reshape(b, height // p, p, width // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, height // p, width // p, p * p * c).astype(self.dtype)
        return patches @ kernel.reshape(p * p * c, self.features).astype(self.dtype) + bias.astype(self.dtype)


class Mlp(nn.Module):
    """fc1 -> GELU (exact, as ViT) -> fc2."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., E] -> [..., E]."""
        dense = functools.partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
                                  bias_init=nn.initializers.normal(1e-6), dtype=self.dtype)
        width = x.shape[-1]
        x = nn.gelu(dense(self.hidden, name="fc1")(x), approximate=False)
        return dense(width, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each
    branch under stochastic depth; attention global, or within windows of `window_size`."""

    num_heads: int
    mlp_dim: int
    window_size: int = 0  # 0: global attention
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray, grid: tuple[int, int],
                 deterministic: bool = True) -> jnp.ndarray:
        """tokens: [B, P + h * w, E] (P prefix tokens, then the patch grid row-major),
        mask: [B, P + h * w] bool (True = attend); grid: (h, w). Returns [B, P + h * w, E].
        Windowed attention needs P = 0 (prefix tokens belong to no window)."""
        norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
        attn = MultiHeadAttention(self.num_heads, 0.0, self.dtype, name="attn")
        x = norm(name="norm1")(tokens)
        if self.window_size:
            batch, (h, w) = tokens.shape[0], grid
            windows, window_mask = window_partition(
                x.reshape(batch, h, w, -1), mask.reshape(batch, h, w), self.window_size)
            y = attn(windows, windows, windows, window_mask, deterministic)
            y = window_merge(y, batch, h, w, self.window_size).reshape(tokens.shape)
        else:
            y = attn(x, x, x, mask, deterministic)
        tokens = tokens + drop_path(y, self.drop_path_rate, deterministic, self)
        y = Mlp(self.mlp_dim, self.dtype, name="mlp")(norm(name="norm2")(tokens))
        return tokens + drop_path(y, self.drop_path_rate, deterministic, self)


def default_global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's choice with windowed attention: the last block of each quarter is global
    ((2, 5, 8, 11) for 12 blocks)."""
    return tuple(sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)}))


class ViT(nn.Module):
    """ViT backbone: (images, mask, train) -> BackboneOutput with a stride-`patch_size` map.

    Fields: width, depth, num_heads, patch_size, mlp_ratio (MLP width / width); pos_grid
    (rows, cols) of the learned position embeddings; num_prefix_tokens (class/distillation
    tokens, see the module docstring); window_size (0: global attention everywhere) and
    global_blocks (indices of the blocks that stay global; None: default_global_blocks);
    drop_path_rate (stochastic depth of the last block, linear from 0 at the first);
    layer_norm_eps; pixel_mean/pixel_std: the input statistics the weights were trained
    with, when not ImageNet's (Google's ViTs: 0.5, 0.5): images arrive normalized with
    ImageNet's and are re-normalized; pos_embed_init: "normal" (std 0.02, as ViT) or
    "sincos" (sincos_grid_init, still trained: a ViT trained from scratch has its
    positions from the first step).
    """

    width: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    pos_grid: tuple[int, int] = (14, 14)
    num_prefix_tokens: int = 0
    window_size: int = 0
    global_blocks: tuple[int, ...] | None = None
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    pos_embed_init: str = "normal"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False) -> BackboneOutput:
        """images: [B, H, W, 3] ImageNet-normalized, zero where padded; mask: [B, H, W] bool.

        Returns features [B, ceil(H/p), ceil(W/p), width] (after the final LayerNorm), the
        patch mask [B, ceil(H/p), ceil(W/p)] (True = the patch holds a real pixel), and
        stages {"block{i}": [B, h, w, width]}, every block's patch tokens (before the
        final norm).
        """
        p, batch = self.patch_size, images.shape[0]
        x = images.astype(jnp.float32)
        if (self.pixel_mean, self.pixel_std) != (IMAGENET_MEAN, IMAGENET_STD):
            imagenet_mean, imagenet_std = jnp.array(IMAGENET_MEAN), jnp.array(IMAGENET_STD)
            x = (x * imagenet_std + imagenet_mean - jnp.array(self.pixel_mean)) / jnp.array(self.pixel_std)
        # Pad bottom/right to whole patches; a patch is real when its top-left pixel is
        # (padding is bottom/right only), so it holds at least one real pixel.
        pad_h, pad_w = -images.shape[1] % p, -images.shape[2] % p
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        patch_mask = jnp.pad(mask, ((0, 0), (0, pad_h), (0, pad_w)))[:, ::p, ::p]
        grid = PatchEmbed(self.width, p, self.dtype, name="patch_embed")(x)
        _, h, w, _ = grid.shape

        init = nn.initializers.normal(0.02)
        pos_init = sincos_grid_init if self.pos_embed_init == "sincos" else init
        pos_embed = self.param("pos_embed", pos_init, (*self.pos_grid, self.width))
        rows = patch_mask[:, :, 0].sum(axis=1)  # the unpadded image's patch grid, per image
        cols = patch_mask[:, 0, :].sum(axis=1)
        grid = grid + resample_grid(pos_embed, rows, cols, h, w).astype(self.dtype)
        tokens = grid.reshape(batch, h * w, self.width)
        token_mask = patch_mask.reshape(batch, h * w)
        if self.num_prefix_tokens:
            prefix = (self.param("prefix_tokens", init, (self.num_prefix_tokens, self.width))
                      + self.param("prefix_pos_embed", init, (self.num_prefix_tokens, self.width)))
            prefix = jnp.broadcast_to(prefix.astype(self.dtype), (batch, *prefix.shape))
            tokens = jnp.concatenate([prefix, tokens], axis=1)
            token_mask = jnp.concatenate([jnp.ones((batch, self.num_prefix_tokens), bool), token_mask], axis=1)

        global_blocks = default_global_blocks(self.depth) if self.global_blocks is None else self.global_blocks
        stages = {}
        for i in range(self.depth):
            tokens = Block(
                self.num_heads, int(self.width * self.mlp_ratio),
                window_size=0 if i in global_blocks else self.window_size,
                drop_path_rate=self.drop_path_rate * i / max(1, self.depth - 1),
                layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, name=f"blocks_{i}",
            )(tokens, token_mask, (h, w), deterministic=not train)
            stages[f"block{i}"] = tokens[:, self.num_prefix_tokens:].reshape(batch, h, w, self.width)
        tokens = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(tokens)
        features = tokens[:, self.num_prefix_tokens:].reshape(batch, h, w, self.width)
        return BackboneOutput(features, patch_mask, stages)


def build_vit(spec: ViTSpec, model_config, dtype: Any) -> ViT:
    """A ViT backbone of `spec`, with the fields of `model.backbone_args` (any ViT field:
    pos_grid, window_size, drop_path_rate, ... and width/depth/num_heads/patch_size to
    change the spec). Raises ValueError naming a bad field or value."""
    args = dict(model_config.backbone_args)
    fields = {f.name for f in dataclasses.fields(ViT)} - {"parent", "name", "dtype"}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"unknown ViT field(s) {unknown}; backbone_args takes {sorted(fields)}")
    # Saved configs hold JSON lists; module fields must be hashable.
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    vit = ViT(**{**dataclasses.asdict(spec), **args}, dtype=dtype)
    problems = []
    if vit.width % vit.num_heads:
        problems.append(f"width {vit.width} is not divisible by num_heads {vit.num_heads}")
    for name in ("width", "depth", "num_heads", "patch_size"):
        if getattr(vit, name) < 1:
            problems.append(f"{name}={getattr(vit, name)} must be positive")
    if len(vit.pos_grid) != 2 or min(vit.pos_grid) < 1:
        problems.append(f"pos_grid={vit.pos_grid!r} must be (rows, cols), both positive")
    if vit.window_size < 0 or vit.num_prefix_tokens < 0:
        problems.append("window_size and num_prefix_tokens must be >= 0")
    if vit.window_size and vit.num_prefix_tokens:
        problems.append("windowed attention needs num_prefix_tokens=0 (class tokens belong to no window)")
    if vit.global_blocks is not None and any(not 0 <= b < vit.depth for b in vit.global_blocks):
        problems.append(f"global_blocks={vit.global_blocks!r} must be block indices in [0, {vit.depth})")
    if vit.pos_embed_init not in ("normal", "sincos"):
        problems.append(f"pos_embed_init={vit.pos_embed_init!r} must be 'normal' or 'sincos'")
    elif vit.pos_embed_init == "sincos" and vit.width % 4:
        problems.append(f"pos_embed_init='sincos' needs a width divisible by 4, got {vit.width}")
    if not 0.0 <= vit.drop_path_rate < 1.0:
        problems.append(f"drop_path_rate={vit.drop_path_rate} must be in [0, 1)")
    if problems:
        raise ValueError("; ".join(problems))
    return vit


def layer_decay_rules(depth: int, decay: float, scale: float = 1.0,
                      prefix: str = "backbone/") -> tuple[tuple[str, float], ...]:
    """Layer-wise learning-rate decay as `train.param_rules` (BEiT/ViTDet fine-tuning):
    block i trains at scale * decay ** (depth - i), the embeddings at scale * decay **
    (depth + 1), the final norm at scale. Put them before rules that would match first.

    >>> layer_decay_rules(12, 0.7)[0]
    ('backbone/(patch_embed|pos_embed|prefix_tokens|prefix_pos_embed)(/.*)?', 0.00968...)
    """
    rules = [(f"{prefix}(patch_embed|pos_embed|prefix_tokens|prefix_pos_embed)(/.*)?",
              scale * decay ** (depth + 1))]
    rules += [(f"{prefix}blocks_{i}/.*", scale * decay ** (depth - i)) for i in range(depth)]
    rules.append((f"{prefix}norm/.*", scale))
    return tuple(rules)


# model.backbone -> builder (model_config, dtype) -> backbone module (merged in detr_jax.models)
VIT_BACKBONES: dict[str, Callable[[Any, Any], nn.Module]] = {
    name: functools.partial(build_vit, spec) for name, spec in VITS.items()
}
