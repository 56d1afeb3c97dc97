"""DETR's transformer: encoder over image features, decoder over learned object queries.

Sequences are batch-first: [B, L, E]. Positional encodings are added to queries and keys
of every attention, never to values (DETR's choice). Key padding masks are True for real
positions. Post-norm (the paper) by default; `pre_norm=True` normalizes before each
sub-layer and adds a final encoder LayerNorm. The decoder returns every layer's output,
each passed through the shared final LayerNorm, for the auxiliary losses.

Initialization follows the reference: every matrix xavier-uniform (the q/k/v projections
as slices of PyTorch's fused [3E, E] in_proj matrix), attention biases zero, FFN biases
PyTorch's Linear default.

Attention weights are sown into the "intermediates" collection, so they are kept only
when the caller asks (`apply(..., mutable=["intermediates"])`, see `attention_maps`);
otherwise sowing is a no-op and nothing extra is computed or kept.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from detr_jax.ops.formulation import for_onnxruntime

ATTENTION_WEIGHTS = "attention_weights"

xavier_uniform = nn.initializers.xavier_uniform()
# xavier_uniform_ of the fused [3E, E] in_proj matrix, seen from one [E, E] slice:
# bound sqrt(6 / (E + 3E)) = sqrt(3 * 0.5 / E).
fused_qkv_xavier_uniform = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def torch_linear_bias_init(fan_in: int) -> Callable:
    """PyTorch's default Linear/Conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's default Linear/Conv weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_dense(features: int, fan_in: int, name: str, dtype: Any, kernel_init: Callable | None = None) -> nn.Dense:
    """A Dense layer initialized as PyTorch's nn.Linear (kernel init overridable)."""
    return nn.Dense(
        features,
        kernel_init=kernel_init or torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(fan_in),
        dtype=dtype,
        name=name,
    )


def attend(module: nn.Module, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, key_mask: jnp.ndarray | None,
           dropout: float, deterministic: bool, attention_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Attention of projected, scaled, head-split queries over keys, inside `module`'s compact
    call: q [B, Lq, H, Dk], k [B, Lk, H, Dk], v [B, Lk, H, Dv], key_mask [B, Lk] bool (True =
    attend), attention_mask [Lq, Lk] or [B, Lq, Lk] bool (True = query i may attend to key
    j; denoising groups) -> [B, Lq, H * Dv]. The weights [B, H, Lq, Lk] are sown into `module`'s
    "intermediates" (ATTENTION_WEIGHTS) and dropped out with rate `dropout` in training.

    Traced for onnxruntime (`detr_jax.ops.formulation`, the ONNX export) both products are
    batched matrix products over heads-first operands, ONNX MatMul (the attention-weighted
    sum is otherwise an Einsum, which onnxruntime runs slowly), and the key mask an added
    bias."""
    key_mask = _combined_mask(key_mask, attention_mask)
    if for_onnxruntime():
        return _attend_for_onnxruntime(module, q, k, v, key_mask, dropout, deterministic)
    # The dot_general jnp.einsum("bqhd,bkhd->bhqk") lowers to, written out: ONNX
    # converters map it to MatMul, where an einsum becomes onnxruntime's slow Einsum.
    logits = jax.lax.dot_general(q, k, (((3,), (3,)), ((0, 2), (0, 2)))).astype(jnp.float32)
    if key_mask is not None:
        logits = jnp.where(key_mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    module.sow("intermediates", ATTENTION_WEIGHTS, weights)  # masked keys 0
    weights = nn.Dropout(dropout)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    return out.reshape(out.shape[:-2] + (-1,))


def _combined_mask(key_mask: jnp.ndarray | None, attention_mask: jnp.ndarray | None) -> jnp.ndarray | None:
    """The key padding mask [B, Lk] and an attention mask [Lq, Lk] or [B, Lq, Lk] as one
    mask broadcastable to the logits [B, H, Lq, Lk] (True = attend), or None."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if attention_mask is not None:
        extra = attention_mask[None, None] if attention_mask.ndim == 2 else attention_mask[:, None]
        mask = extra if mask is None else mask & extra
    return mask


def _attend_for_onnxruntime(module: nn.Module, q, k, v, key_mask, dropout: float, deterministic: bool):
    """`attend` as onnxruntime runs it best: MatMul over [B, H, L, D] operands.

    The masked keys get finfo.min added (not put in place of the logit): the same weights,
    since a logit is far too small to move finfo.min by one unit of its precision, and
    softmax gives them exp(finfo.min - max) = 0 either way."""
    heads_first = (0, 2, 1, 3)
    logits = jnp.matmul(q.transpose(heads_first), k.transpose(0, 2, 3, 1)).astype(jnp.float32)
    if key_mask is not None:
        bias = jnp.where(key_mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1)
    module.sow("intermediates", ATTENTION_WEIGHTS, weights)
    weights = nn.Dropout(dropout)(weights, deterministic=deterministic)
    out = jnp.matmul(weights.astype(v.dtype), v.transpose(heads_first)).transpose(heads_first)
    return out.reshape(out.shape[:-2] + (-1,))


class MultiHeadAttention(nn.Module):
    """PyTorch-style multi-head attention with dropout on the attention weights.

    Parameters: q_proj, k_proj, v_proj, out_proj (each [E, E] + bias).
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        query: jnp.ndarray,
        key: jnp.ndarray,
        value: jnp.ndarray,
        key_mask: jnp.ndarray | None = None,
        deterministic: bool = True,
        attention_mask: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """query: [B, Lq, E]; key, value: [B, Lk, E]; key_mask: [B, Lk] bool (True = attend);
        attention_mask: [Lq, Lk] or [B, Lq, Lk] bool (True = query i may attend to key j).

        Returns [B, Lq, E].
        """
        embed = query.shape[-1]
        head_dim = embed // self.num_heads

        def proj(name, x, kernel_init):
            return nn.Dense(embed, kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                            dtype=self.dtype, name=name)(x)

        def split_heads(x):  # [B, L, E] -> [B, L, H, D]
            return x.reshape(x.shape[:-1] + (self.num_heads, head_dim))

        q = split_heads(proj("q_proj", query, fused_qkv_xavier_uniform))
        k = split_heads(proj("k_proj", key, fused_qkv_xavier_uniform))
        v = split_heads(proj("v_proj", value, fused_qkv_xavier_uniform))
        # Scale q before the product, as PyTorch does (bitwise-closer to the reference).
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        out = attend(self, q, k, v, key_mask, self.dropout, deterministic, attention_mask)
        return proj("out_proj", out, xavier_uniform)


class FeedForward(nn.Module):
    """linear1 -> activation (ReLU, or RT-DETR's exact GELU: `activation`) -> dropout ->
    linear2; with `prelu`, PyTorch's nn.PReLU instead (DAB-DETR's): one learned negative
    slope `prelu` [1], initially 0.25."""

    dim_feedforward: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    prelu: bool = False
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        """x: [B, L, E] -> [B, L, E]."""
        embed = x.shape[-1]
        h = torch_dense(self.dim_feedforward, embed, "linear1", self.dtype, xavier_uniform)(x)
        if self.prelu:
            slope = self.param("prelu", nn.initializers.constant(0.25), (1,))
            h = jnp.where(h >= 0, h, slope.astype(h.dtype) * h)
        else:
            h = self.activation(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return torch_dense(embed, self.dim_feedforward, "linear2", self.dtype, xavier_uniform)(h)


def layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    """PyTorch's nn.LayerNorm (eps 1e-5) computing in `dtype`."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name)


class EncoderLayer(nn.Module):
    """Self-attention + FFN (with a PReLU: `prelu`; another `activation`), each with residual,
    dropout and LayerNorm."""

    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: Any = jnp.float32
    prelu: bool = False
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

    @nn.compact
    def __call__(self, src, pos, key_mask, deterministic: bool = True):
        """src, pos: [B, S, E]; key_mask: [B, S] bool (True = real). Returns [B, S, E]."""
        attn = MultiHeadAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")
        ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, self.prelu, self.activation, name="ffn")
        norm1, norm2 = layer_norm("norm1", self.dtype), layer_norm("norm2", self.dtype)
        drop = nn.Dropout(self.dropout)
        if self.pre_norm:
            x = norm1(src)
            src = src + drop(attn(x + pos, x + pos, x, key_mask, deterministic), deterministic=deterministic)
            x = norm2(src)
            return src + drop(ffn(x, deterministic), deterministic=deterministic)
        x = src + pos
        src = norm1(src + drop(attn(x, x, src, key_mask, deterministic), deterministic=deterministic))
        return norm2(src + drop(ffn(src, deterministic), deterministic=deterministic))


class DecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the encoder memory, FFN."""

    num_heads: int
    dim_feedforward: int
    dropout: float
    pre_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, memory_mask, deterministic: bool = True):
        """tgt, query_pos: [B, Q, E]; memory, pos: [B, S, E]; memory_mask: [B, S] bool.

        Returns [B, Q, E].
        """
        self_attn = MultiHeadAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")
        cross_attn = MultiHeadAttention(self.num_heads, self.dropout, self.dtype, name="cross_attn")
        ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
        norm1, norm2, norm3 = (layer_norm(f"norm{i}", self.dtype) for i in (1, 2, 3))
        drop = nn.Dropout(self.dropout)
        keys = memory + pos
        if self.pre_norm:
            x = norm1(tgt)
            tgt = tgt + drop(self_attn(x + query_pos, x + query_pos, x, None, deterministic),
                             deterministic=deterministic)
            x = norm2(tgt)
            tgt = tgt + drop(cross_attn(x + query_pos, keys, memory, memory_mask, deterministic),
                             deterministic=deterministic)
            x = norm3(tgt)
            return tgt + drop(ffn(x, deterministic), deterministic=deterministic)
        x = tgt + query_pos
        tgt = norm1(tgt + drop(self_attn(x, x, tgt, None, deterministic), deterministic=deterministic))
        tgt = norm2(tgt + drop(cross_attn(tgt + query_pos, keys, memory, memory_mask, deterministic),
                               deterministic=deterministic))
        return norm3(tgt + drop(ffn(tgt, deterministic), deterministic=deterministic))


class Transformer(nn.Module):
    """Encoder-decoder; returns every decoder layer's (normalized) output and the memory."""

    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, src, mask, query_embed, pos, deterministic: bool = True):
        """src: [B, S, E] flattened features; mask: [B, S] bool (True = real);
        query_embed: [Q, E] learned queries; pos: [B, S, E] positional encoding.

        Returns (hs [L, B, Q, E] with L = num_decoder_layers, memory [B, S, E]).
        """
        pos = pos.astype(self.dtype)
        memory = src.astype(self.dtype)
        layer_args = dict(num_heads=self.num_heads, dim_feedforward=self.dim_feedforward,
                          dropout=self.dropout, pre_norm=self.pre_norm, dtype=self.dtype)
        for i in range(self.num_encoder_layers):
            memory = EncoderLayer(**layer_args, name=f"encoder_layer{i}")(memory, pos, mask, deterministic)
        if self.pre_norm:
            memory = layer_norm("encoder_norm", self.dtype)(memory)

        batch = src.shape[0]
        query_pos = jnp.broadcast_to(query_embed.astype(self.dtype)[None], (batch,) + query_embed.shape)
        tgt = jnp.zeros_like(query_pos)
        decoder_norm = layer_norm("decoder_norm", self.dtype)
        intermediate = []
        for i in range(self.num_decoder_layers):
            tgt = DecoderLayer(**layer_args, name=f"decoder_layer{i}")(
                tgt, memory, pos, query_pos, mask, deterministic)
            intermediate.append(decoder_norm(tgt))
        return jnp.stack(intermediate), memory


def build_transformer(model_config, dtype: Any) -> Transformer:
    """DETR's transformer from the `model` config section."""
    m = model_config
    return Transformer(num_heads=m.num_heads, num_encoder_layers=m.num_encoder_layers,
                       num_decoder_layers=m.num_decoder_layers, dim_feedforward=m.dim_feedforward,
                       dropout=m.dropout, pre_norm=m.pre_norm, dtype=dtype)


# A layer's module name: DETR's transformer/encoder_layer{i}, decoder_layer{i}; the
# conditional family's encoder_layer{i} and decoder/layer{i}.
_LAYER = re.compile(r"(?:encoder_|decoder_)?layer(\d+)")


def attention_maps(intermediates: dict) -> dict[str, jnp.ndarray]:
    """Per-layer attention weights from a detector's sown "intermediates" collection.

    Args:
      intermediates: `state["intermediates"]` of `apply(..., mutable=["intermediates"])`
        (or a subtree of it). Every attention module that `attend`s sows its weights; a
        map belongs to the encoder or the decoder by the first path component naming one,
        to layer i by the last component `[encoder_|decoder_]layer{i}`, and is self- or
        cross-attention by its module's name (self_attn, cross_attn). Maps elsewhere (a
        mask head's) are not layers' and are left out.
    Returns (float32, softmax over keys, zero weight on masked keys):
      encoder_self   [L_enc, B, heads, S, S]  (absent with no encoder layer)
      decoder_self   [L_dec, B, heads, Q, Q]
      decoder_cross  [L_dec, B, heads, Q, S]
    with S = h * w feature positions in row-major order.
    """
    found: dict[str, dict[int, jnp.ndarray]] = {}
    for path, value in traverse_util.flatten_dict(intermediates).items():
        stack = next((s for s in ("encoder", "decoder") for p in path if p.startswith(s)), None)
        layers = [int(m[1]) for p in path if (m := _LAYER.fullmatch(p))]
        kind = next((k for k in ("self_attn", "cross_attn") if k in path), None)
        if path[-1] != ATTENTION_WEIGHTS or stack is None or not layers or kind is None:
            continue
        found.setdefault(f"{stack}_{kind.removesuffix('_attn')}", {})[layers[-1]] = value[0]
    return {name: jnp.stack([maps[i] for i in sorted(maps)]) for name, maps in found.items()}
