"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", 2021) in plain JAX.

Each query looks at a few points per head and level instead of every key: a linear layer
predicts offsets around the query's reference point and another the points' weights
(softmax over levels x points); the value is sampled at those locations by bilinear
interpolation and the weighted samples are summed. The sampling is exactly the
reference's pure-PyTorch `ms_deform_attn_core_pytorch` (and Hugging Face's
`MultiScaleDeformableAttention`): `grid_sample` with `align_corners=False` and zero
padding, written as a gather (no custom op to build, static shapes, so it runs under
jit, vmap and shard_map on any backend and is differentiated by JAX).

The value is the flat view of the feature levels (`neck.flatten_levels`): levels in order,
each row-major, with the static `spatial_shapes` ((h_l, w_l), ...). Sampling locations are
normalized (x, y): (0, 0) is the top-left corner of a level's map and (1, 1) its
bottom-right corner, so pixel centers sit at ((j + 0.5) / w, (i + 0.5) / h).

`MultiScaleDeformableAttention` sows the sampling locations and their weights into the
"intermediates" collection (SAMPLING_LOCATIONS, SAMPLING_WEIGHTS), kept only when the
caller asks (`apply(..., mutable=["intermediates"])`), as the dense attention sows its maps.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from detr_jax.models.transformer import _LAYER, xavier_uniform
from detr_jax.ops.formulation import for_onnxruntime

SAMPLING_LOCATIONS = "sampling_locations"
SAMPLING_WEIGHTS = "sampling_weights"

# The 4 corners of a bilinear cell as (dx, dy) from its top-left pixel.
_CORNERS = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
# How a sample is read at its location (`ms_deform_attn_sample`).
SAMPLING_METHODS = ("bilinear", "discrete")


# The scope names every op of the sampling in profiles (scripts/profile_deformable.py).
@jax.named_scope("ms_deform_attn_sample")
def ms_deform_attn_sample(value: jnp.ndarray, spatial_shapes: tuple[tuple[int, int], ...],
                          sampling_locations: jnp.ndarray, attention_weights: jnp.ndarray,
                          method: str = "bilinear") -> jnp.ndarray:
    """The weighted sum of bilinear samples of `value` at `sampling_locations`.

    Args:
      value: [B, S, H, Dh], every level's positions (levels in order, each row-major),
        S = sum of h_l * w_l.
      spatial_shapes: ((h_l, w_l), ...) per level, static python ints.
      sampling_locations: [B, Q, H, L, P, 2] normalized (x, y) per head, level and point;
        any real values (a corner of the bilinear cell off the map contributes zero).
      attention_weights: [B, Q, H, L, P], the weight of each sample.
      method: SAMPLING_METHODS: "bilinear", or "discrete" (RT-DETRv2's deployment option,
        Hugging Face's `multi_scale_deformable_attention_v2(method="discrete")`): the one
        pixel int(location * size + 0.5) per axis, truncated and clamped onto the map (so a
        sample off the map reads its edge); no gradient reaches the locations.
    Returns [B, Q, H * Dh] in value's dtype: for each query and head,
    sum over (l, p) of attention_weights * grid_sample(value_l, 2 * location - 1) (or the
    discrete sample).
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"deformable attention sampling method {method!r}: expected one of {SAMPLING_METHODS}")
    batch, length, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if len(spatial_shapes) != levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {levels} levels of sampling locations")
    if sum(h * w for h, w in spatial_shapes) != length:
        raise ValueError(f"spatial shapes {spatial_shapes} cover {sum(h * w for h, w in spatial_shapes)} "
                         f"positions, the value has {length}")
    # Coordinates and corner weights in float32 at least, whatever the value's dtype:
    # bfloat16 (8 significant bits) rounds a location in [0.5, 1) to 1/256 of the map, a
    # quarter pixel on a 128-pixel map and a pixel on a 512-pixel one, and the bilinear
    # weights are the fractional parts of those coordinates. float64 inputs stay float64
    # (the gradient checks run in it).
    compute = jnp.promote_types(jnp.promote_types(sampling_locations.dtype, value.dtype), jnp.float32)
    sizes = jnp.asarray([(w, h) for h, w in spatial_shapes], compute)  # [L, 2] (x, y)
    level_starts = np.cumsum([0] + [h * w for h, w in spatial_shapes[:-1]]).tolist()
    starts = jnp.asarray(level_starts, jnp.int32)  # [L]
    samples_per_query = points * (1 if method == "discrete" else 4)

    def sample_level(size, start, locations, weights):
        """size [2] (w, h), start [] (the level's first flat position), locations
        [B, Q, H, P, 2], weights [B, Q, H, P] -> the level's weighted sum [B, Q, H, Dh]."""
        if method == "discrete":
            # The reference's (loc * size + 0.5).to(int64).clamp(0, size - 1): clamped in
            # float first (no integer overflow far off the map), where truncation is floor.
            corner = jnp.floor(jnp.clip(locations * size + 0.5, 0, size - 1))[..., None, :]
            corner = jax.lax.stop_gradient(corner).astype(jnp.int32)  # [B, Q, H, P, 1, 2 (x, y)]
            weight = weights[..., None]
        else:
            # grid_sample with align_corners=False: grid g = 2 * loc - 1 maps to the pixel
            # coordinate ((g + 1) * size - 1) / 2 = loc * size - 0.5 (pixel centers at integers).
            pixel = locations * size - 0.5
            top_left = jnp.floor(pixel)
            frac = pixel - top_left
            corner = top_left[..., None, :] + _CORNERS  # [B, Q, H, P, 4 corners, 2 (x, y)]
            # Bilinear weight of each corner: (1 - fx or fx) * (1 - fy or fy).
            weight = jnp.prod(jnp.where(_CORNERS == 1, frac[..., None, :], 1 - frac[..., None, :]), axis=-1)
            # Zero padding: a corner off the map contributes nothing (tested in float, before
            # the integer cast, so far-off locations cannot overflow); its index is clipped onto
            # the map only to keep the gather in bounds. `where`, not a product, so that a
            # non-finite weight of an off-map corner cannot leak either.
            inside = jnp.all((corner >= 0) & (corner <= size - 1), axis=-1)
            weight = jnp.where(inside, weight * weights[..., None], 0)
            corner = jnp.clip(corner, 0, size - 1).astype(jnp.int32)
        index = start + corner[..., 1] * size[0].astype(jnp.int32) + corner[..., 0]  # [B, Q, H, P, 4]

        # A gather over the flat spatial axis keeping the value's [B, S, H, Dh] layout:
        # heads are a batch dimension of the gather and each sample is a contiguous Dh
        # slice, so neither the value nor the output is transposed, only the index and
        # weight arrays, which have no Dh axis.
        index = jnp.moveaxis(index, 2, -1).reshape(batch, queries * samples_per_query, heads, 1)
        weight = jnp.moveaxis(weight, 2, -1).reshape(batch, queries, samples_per_query, heads, 1)
        samples = jnp.take_along_axis(value, index, axis=1, mode="promise_in_bounds")
        samples = samples.reshape(batch, queries, samples_per_query, heads, head_dim)
        samples = samples.astype(compute)
        if for_onnxruntime():
            # A multiply and a sum: onnxruntime runs a batched dot as its slow Einsum.
            return jnp.sum(samples * weight, axis=2)
        # The weighted sum over the P * 4 samples as a batched dot over (B, Q, H), accumulated
        # in `compute`: XLA:CPU hands a multiply-and-sum to YNNPACK's fusion, which ran it
        # several times slower (docs/BENCHMARKS.md, Deformable DETR-R50, 2026-12-07).
        return jax.lax.dot_general(weight[..., 0], samples, (((2,), (2,)), ((0, 1, 3), (0, 1, 3))))

    locations, weights = sampling_locations.astype(compute), attention_weights.astype(compute)
    if for_onnxruntime():
        # The ONNX export: one gather per level, unrolled, each level's size and offset a
        # constant (jax2onnx turns a scan into an ONNX Loop whose gather input it types
        # double, which onnxruntime refuses; and inference keeps no residuals anyway).
        per_level = [sample_level(np.asarray((w, h), compute), start, locations[:, :, :, level], weights[:, :, :, level])
                     for level, ((h, w), start) in enumerate(zip(spatial_shapes, level_starts))]
        return sum(per_level).reshape(batch, queries, heads * head_dim).astype(value.dtype)

    # One level per step of a scan, so that at most one level's samples [B, Q, P * 4, H, Dh]
    # exist at a time (XLA keeps a gather's output when it cannot fuse it into the sum, as
    # on CPU); checkpointed, so that the backward pass re-gathers them instead of keeping
    # every level's as residuals: what is saved is the inputs, as the reference's CUDA
    # kernel does. (Measured on CPU, S = Q = 5440, H = 8, Dh = 32, L = P = 4: 0.25 GB of
    # temporaries forward and 0.58 GB for a gradient, against 0.74 and 1.58 GB for one
    # gather of all levels.) The levels' sums come out stacked [L, B, Q, H, Dh] rather than
    # accumulated in the carry: a carry initialized with zeros would not vary over a
    # shard_map's axes as the sums do, and scan requires both to agree.
    _, per_level = jax.lax.scan(jax.checkpoint(lambda carry, level: (carry, sample_level(*level))), None,
                                (sizes, starts, jnp.moveaxis(locations, 3, 0), jnp.moveaxis(weights, 3, 0)))
    return per_level.sum(0).reshape(batch, queries, heads * head_dim).astype(value.dtype)


def points_per_level(num_points: int | tuple[int, ...], num_levels: int) -> tuple[int, ...]:
    """The sampling points of each level: `num_points` on every level, or the per-level
    tuple itself (RT-DETRv2's `num_points_list`); ValueError when it does not fit."""
    points = (num_points,) * num_levels if isinstance(num_points, (int, np.integer)) else tuple(num_points)
    if len(points) != num_levels or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1
                                        for p in points):
        raise ValueError(f"num_points={num_points!r}: expected a positive integer or {num_levels} of them (one "
                         "per level)")
    return tuple(int(p) for p in points)


def sampling_offsets_bias_init(num_heads: int, num_levels: int, num_points: int | tuple[int, ...]):
    """The reference's initial offsets, flat [H * sum(P_l) * 2] in (head, level, point, xy)
    order: head h points along the angle 2 pi h / H, scaled so the larger coordinate is 1,
    the same on every level, point p at (p + 1) times that step (in pixels of the level).
    In float32 as the reference's torch computation (bit for bit with it at 2 and 8 heads).
    num_points: P on every level, or P_l per level (official RT-DETRv2's init)."""
    points = points_per_level(num_points, num_levels)

    def init(key, shape, dtype=jnp.float32):
        del key
        thetas = np.arange(num_heads, dtype=np.float32) * np.float32(2.0 * math.pi / num_heads)
        grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        steps = np.concatenate([np.arange(1, p + 1, dtype=np.float32) for p in points])
        grid = grid[:, None, :] * steps[:, None]  # [H, sum(P_l), 2]
        return jnp.asarray(grid.reshape(shape), dtype)

    return init


class MultiScaleDeformableAttention(nn.Module):
    """Hugging Face's `DeformableDetrMultiscaleDeformableAttention` (the reference's `MSDeformAttn`).

    Parameters, named as Hugging Face's so that a converter maps them name for name
    (Dense kernel = torch weight transposed): sampling_offsets [E, H * L * P * 2],
    attention_weights [E, H * L * P], value_proj [E, E], output_proj [E, E], each with a
    bias. Initialized as the reference: offsets weight 0 and bias the directional grid of
    `sampling_offsets_bias_init` (so at first head h samples P points along its own
    direction on every level), attention weights 0 (uniform over levels x points), value
    and output projections xavier-uniform with zero bias.

    RT-DETRv2's switches (Hugging Face's `RTDetrV2MultiscaleDeformableAttention`, official
    lyuwenyu/RT-DETR `rtdetrv2_decoder.MSDeformableAttention`; the defaults are v1's):
      num_points: a tuple, P_l points on level l (`num_points_list`); the projections then
        have H * sum(P_l) (* 2) outputs in (head, level, point) order, the softmax runs over
        all sum(P_l) points of a head;
      offset_scale: a box reference's offsets are scaled by (w, h) * offset_scale / P_l
        (v1: 0.5 / P);
      sampling: "bilinear" or "discrete" (`ms_deform_attn_sample`'s method).
    """

    embed_dim: int
    num_heads: int = 8
    num_levels: int = 4
    num_points: int | tuple[int, ...] = 4
    offset_scale: float = 0.5
    sampling: str = "bilinear"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: jnp.ndarray, reference_points: jnp.ndarray, value: jnp.ndarray,
                 spatial_shapes: tuple[tuple[int, int], ...], value_mask: jnp.ndarray | None = None,
                 query_pos: jnp.ndarray | None = None) -> jnp.ndarray:
        """Deformable attention of the queries over the flat feature levels.

        Args:
          query: [B, Q, E] (the flat levels themselves in the encoder, object queries in
            the decoder).
          reference_points: [B, Q, L, 2] normalized (x, y) per level (already scaled by each
            level's valid ratio); the offsets are in pixels of the level. Or [B, Q, L, 4]
            normalized (cx, cy, w, h) boxes: the offsets are in units of the box, scaled by
            (w, h) * offset_scale / P_l (Hugging Face and the reference), so with the initial
            grid the farthest point reaches the box's edge along its head's direction.
          value: [B, S, E], the flat levels (`neck.flatten_levels`), S = sum of h_l * w_l.
          spatial_shapes: ((h_l, w_l), ...) per level, static python ints.
          value_mask: [B, S] bool, True = a position on the image (the house convention and
            Hugging Face's `attention_mask`; the reference's `input_padding_mask` is the
            opposite). Padding is zeroed in the projected value, so a sample landing on it
            contributes nothing; its weight is not renormalized away (as the reference).
          query_pos: [B, Q, E] position embedding added to the query before the offsets and
            weights are predicted (Hugging Face's `hidden_states + position_embeddings`).
        Returns [B, Q, E]. Sown into "intermediates": SAMPLING_LOCATIONS [B, Q, H, L, P, 2]
        (normalized x, y) and SAMPLING_WEIGHTS [B, Q, H, L, P] (softmax over L x P), float32;
        with P_l per level, P = max(P_l) and a level's points past its P_l have weight 0.
        """
        heads, levels = self.num_heads, self.num_levels
        points = points_per_level(self.num_points, levels)
        most, total = max(points), sum(points)
        if self.embed_dim % heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {heads}")
        if len(spatial_shapes) != levels:
            raise ValueError(f"{len(spatial_shapes)} spatial shapes for num_levels {levels}")
        batch, queries, _ = query.shape

        def dense(features, name, kernel_init, bias_init):
            return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype, name=name)

        zeros = nn.initializers.zeros
        if query_pos is not None:
            query = query + query_pos
        value = dense(self.embed_dim, "value_proj", xavier_uniform, zeros)(value)
        if value_mask is not None:
            value = jnp.where(value_mask[..., None], value, 0)
        value = value.reshape(value.shape[:2] + (heads, self.embed_dim // heads))

        offsets = dense(heads * total * 2, "sampling_offsets", zeros,
                        sampling_offsets_bias_init(heads, levels, points))(query)
        logits = dense(heads * total, "attention_weights", zeros, zeros)(query)
        # Softmax and locations in float32 at least, whatever the compute dtype (see
        # ms_deform_attn_sample: a bfloat16 location is a pixel off on a 512-pixel map).
        weights = nn.softmax(logits.reshape(batch, queries, heads, total).astype(jnp.float32), axis=-1)
        loc_dtype = jnp.promote_types(reference_points.dtype, jnp.float32)
        offsets = offsets.reshape(batch, queries, heads, total, 2).astype(loc_dtype)
        if total == levels * most:
            weights = weights.reshape(batch, queries, heads, levels, most)
            offsets = offsets.reshape(batch, queries, heads, levels, most, 2)
        else:  # P_l per level: padded to [L, max P_l] with points of weight 0
            starts = np.cumsum((0,) + points[:-1])
            index = np.asarray([[start + min(p, count - 1) for p in range(most)]
                                for start, count in zip(starts, points)])
            real = np.arange(most)[None, :] < np.asarray(points)[:, None]  # [L, max P_l]
            weights = jnp.where(real, weights[:, :, :, index], 0)
            offsets = offsets[:, :, :, index]
        reference_points = reference_points.astype(loc_dtype)
        if reference_points.shape[-1] == 2:
            size = jnp.asarray([(w, h) for h, w in spatial_shapes], loc_dtype)  # [L, 2]
            locations = reference_points[:, :, None, :, None, :] + offsets / size[:, None, :]
        elif reference_points.shape[-1] == 4:
            centers, sizes = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            per_point = np.asarray(points, np.float32)[:, None, None]  # [L, 1, 1]: each point's P_l
            locations = centers + offsets / per_point * sizes * self.offset_scale
        else:
            raise ValueError(f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), not {reference_points.shape}")
        self.sow("intermediates", SAMPLING_LOCATIONS, locations)
        self.sow("intermediates", SAMPLING_WEIGHTS, weights)

        out = ms_deform_attn_sample(value, spatial_shapes, locations, weights, self.sampling)
        return dense(self.embed_dim, "output_proj", xavier_uniform, zeros)(out)


def sampling_points(intermediates: dict) -> dict[str, tuple[jnp.ndarray, jnp.ndarray]]:
    """Per-layer sampling locations and weights from a detector's sown "intermediates".

    The deformable counterpart of `transformer.attention_maps`, read the same way: a
    module's stack (encoder or decoder) is the first path component naming one, its layer
    the last `[encoder_|decoder_]layer{i}` component, its kind the module name (self_attn,
    cross_attn); sown values elsewhere are left out.

    Returns {"encoder_self" | "decoder_cross": (locations [L_stack, B, Q, H, L, P, 2]
    normalized (x, y) over each level's padded map, weights [L_stack, B, Q, H, L, P],
    softmax over L x P)}, float32, for the stacks that have deformable attention; Q is the
    number of queries (in the encoder: every flat position).
    """
    found: dict[str, dict[int, dict[str, jnp.ndarray]]] = {}
    for path, value in traverse_util.flatten_dict(intermediates).items():
        stack = next((s for s in ("encoder", "decoder") for p in path if p.startswith(s)), None)
        layers = [int(m[1]) for p in path if (m := _LAYER.fullmatch(p))]
        kind = next((k for k in ("self_attn", "cross_attn") if k in path), None)
        if path[-1] not in (SAMPLING_LOCATIONS, SAMPLING_WEIGHTS) or stack is None or not layers or kind is None:
            continue
        found.setdefault(f"{stack}_{kind.removesuffix('_attn')}", {}).setdefault(layers[-1], {})[path[-1]] = value[0]
    return {name: tuple(jnp.stack([per_layer[i][key] for i in sorted(per_layer)])
                        for key in (SAMPLING_LOCATIONS, SAMPLING_WEIGHTS))
            for name, per_layer in found.items()}
