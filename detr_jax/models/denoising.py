"""Contrastive denoising (DINO, RT-DETR): noised ground truth as extra decoder queries.

In training, a detector with denoising turns its padded targets into `num_groups` groups of
queries in front of its matching queries. Each group holds every target twice: a positive
(box jittered by less than half its size, trained to reconstruct the target) and a
negative (box pushed further out, trained as "no object"); labels are flipped to a random
class now and then. The decoder runs both kinds in one pass, a self-attention mask keeping
the groups from each other and the matching queries from all of them; the "dn" output
branch is matched by construction (`target_to_query`).

Shapes are fixed (DESIGN.md, "Fixed shapes in training"): with M = `data.max_boxes` (the
padded target count) and G = max(1, num_denoising // M), both static,

  Qdn = 2 * M * G denoising queries, group g at [2Mg, 2M(g+1)): positives of target slots
  0..M-1 at 2Mg + m, negatives at 2Mg + M + m (the references' layout);

whatever the batch holds. The references size the groups from the batch instead
(transformers' `get_contrastive_denoising_training_group`, which RT-DETR and RT-DETRv2
use: max_gt = the batch's largest target count, G = max(1, num_denoising // max_gt),
Qdn = 2 * max_gt * G, and no denoising at all when max_gt == 0), so shapes, and with them
the compiled step, change from batch to batch. Both coincide exactly, every output equal,
when the batch's largest target count equals M; otherwise ours has more padded slots per
group and possibly fewer groups (num_denoising 100, M = 100, a batch of at most 20
objects: G = 1 here, 5 there), so keep `data.max_boxes` near the data's real maximum.

Padded slots (valid False: images with fewer than M targets, both halves of every group)
are the reference's padded slots: label `num_classes` (content = `class_embed[num_classes]`,
a row that gets no gradient, as torch's `nn.Embedding(padding_idx=num_classes)`), box 0,
not noised, no target (`target_to_query` -1), and, like every unassigned dn query, trained
as background by the criterion. The [Q', Q'] attention mask cannot tell images apart, so,
as in the reference, they are visible within their group; `hide_padded_slots` makes the
per-image [B, Q', Q'] mask that hides them (not the reference's: opt-in). A batch with no
object gives G groups of padded slots: finite, no target, no recompile.

The mask convention is ours, True = may attend (`QueryState.self_attention_mask`), the
inverse of the references' `attn_mask` (True / -inf = blocked): a dn query sees its own
group (padded slots included) and every matching query; a matching query sees no dn query.

Noise (`DenoisingNoise`, drawn from the "queries" rng stream or passed in as arrays so a
test can feed a reference the same draws), per slot as the reference:
  labels: where label_uniform < label_noise_ratio * 0.5 (and the slot is valid), the label
    becomes new_labels (uniform in [0, num_classes)); the reference's
    `torch.rand_like(...) < ratio * 0.5`, `torch.randint_like(..., 0, num_classes)`;
  boxes: xyxy += box_part' * box_sign * tile(wh / 2, 2) * box_noise_scale, box_part' =
    box_part (positives, in [0, 1)) or box_part + 1 (negatives, in [1, 2)), clipped to
    [0, 1], back to cxcywh.
The reference returns inverse_sigmoid of the noised boxes (eps 1e-5) as its decoder's
unactivated reference points; the QueryState here keeps normalized cxcywh boxes (the
decoder takes the logit it needs, as for every query generator).

DINO's `prepare_for_cdn` (IDEA-Research/DINO models/dino/dn_components.py) is the same
construction (same slot layout, the same label and box noise, mask and positive indices)
except for:
  - padded slots: content zeros and box logit 0 (box (0.5, 0.5, 0.5, 0.5)) where RT-DETR has
    `class_embed[num_classes]` and box 0: reproduce it with a zero row num_classes in the
    table (it gets no gradient, so it stays zero) and `padded_box=0.5`;
  - groups: dn_number < 50 gives 2 * dn_number groups (not divided by the targets); from
    50 on, dn_number // max_gt as here; zero objects: no dn queries at all;
  - draws: it keeps the targets flat over the batch (repeat r = 0..2G-1, image, target), and
    draws new labels only for the flipped slots, so feeding it our draws means reordering
    them and taking new_labels at the flipped slots;
  - box noise order: (box_part * diff) * box_noise_scale instead of
    box_part * (diff * box_noise_scale): equal at scale 1.0, within an ulp otherwise;
  - its decoder's inverse_sigmoid has eps 1e-3 (RT-DETR's 1e-5): the decoder's business.
The reference RT-DETR skips the inverse_sigmoid when box_noise_scale <= 0 (its decoder
then reads normalized boxes as logits); here boxes are always normalized.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp

from detr_jax.models.queries import QueryState, concat
from detr_jax.ops import box_ops


def denoising_groups(num_denoising: int, max_boxes: int) -> int:
    """G = max(1, num_denoising // max_boxes): the number of groups, static."""
    if num_denoising <= 0:
        raise ValueError(f"num_denoising must be positive (got {num_denoising}); without denoising do not call it")
    if max_boxes <= 0:
        raise ValueError(f"max_boxes must be positive (got {max_boxes})")
    return max(1, num_denoising // max_boxes)


@flax.struct.dataclass
class DenoisingNoise:
    """The random draws of one denoising call, per slot (Qdn = 2 * M * G, slot layout in
    the module docstring), in the shapes and order of the reference's draws.

    label_uniform: [B, Qdn] float32 in [0, 1): a label flips where < label_noise_ratio / 2.
    new_labels: [B, Qdn] int32 in [0, num_classes): the label it flips to.
    box_sign: [B, Qdn, 4] float32, -1 or +1 per xyxy coordinate.
    box_part: [B, Qdn, 4] float32 in [0, 1): the noise's size, as a fraction of half the
      box's width or height (negatives add 1).
    """

    label_uniform: jax.Array
    new_labels: jax.Array
    box_sign: jax.Array
    box_part: jax.Array

    @classmethod
    def draw(cls, rng: jax.Array, batch_size: int, num_dn_queries: int, num_classes: int) -> "DenoisingNoise":
        """Uniform draws from `rng` (the detector's "queries" stream) for [B, Qdn] slots."""
        k_flip, k_label, k_sign, k_part = jax.random.split(rng, 4)
        slots = (batch_size, num_dn_queries)
        return cls(
            label_uniform=jax.random.uniform(k_flip, slots, jnp.float32),
            new_labels=jax.random.randint(k_label, slots, 0, num_classes, jnp.int32),
            box_sign=jnp.where(jax.random.bernoulli(k_sign, 0.5, slots + (4,)), 1.0, -1.0).astype(jnp.float32),
            box_part=jax.random.uniform(k_part, slots + (4,), jnp.float32),
        )


@flax.struct.dataclass
class DenoisingQueries:
    """What `contrastive_denoising` returns.

    queries: the dn queries as a QueryState: content [B, Qdn, E] (class embeddings of the
      noised labels), reference [B, Qdn, 4] noised boxes, normalized cxcywh float32 (not
      their logits), self_attention_mask [Qdn, Qdn] (the groups' block diagonal).
    self_attention_mask: [Qdn + Q, Qdn + Q] bool, True = may attend, for the dn queries
      followed by the Q matching queries (see `prepend`).
    target_to_query: [B, G * M] int32: entry g * M + m is the dn query that reconstructs
      target slot m in group g (2 * M * g + m, its positive), -1 for padded slots. The
      criterion reads it against the targets tiled G times along M (`tile_targets`),
      normalizing by G * num_boxes as the references do.
    labels: [B, Qdn] int32, the noised labels (num_classes on padded slots).
    slot_valid: [B, Qdn] bool, True where a slot holds a target (positive or negative).
    num_groups: G (static).
    """

    queries: QueryState
    self_attention_mask: jax.Array
    target_to_query: jax.Array
    labels: jax.Array
    slot_valid: jax.Array
    num_groups: int = flax.struct.field(pytree_node=False)

    @property
    def num_dn_queries(self) -> int:
        return self.queries.num_queries

    def prepend(self, matching: QueryState) -> QueryState:
        """The dn queries, then `matching`'s Q queries, with the whole [Qdn + Q, Qdn + Q] mask."""
        expected = self.self_attention_mask.shape[-1] - self.num_dn_queries
        if matching.num_queries != expected:
            raise ValueError(f"built for {expected} matching queries, given {matching.num_queries}")
        if matching.self_attention_mask is not None:
            raise ValueError("the matching queries have their own mask: combine it with self_attention_mask first")
        dn = self.queries.replace(self_attention_mask=None)
        return concat(dn, matching, self.self_attention_mask)


def denoising_attention_mask(num_groups: int, max_boxes: int, num_queries: int) -> jax.Array:
    """[Qdn + Q, Qdn + Q] bool, True = may attend (Qdn = 2 * max_boxes * num_groups): a dn
    query sees its own group and the matching queries; a matching query sees only matching
    queries. The inverse of the references' attn_mask."""
    group_size = 2 * max_boxes
    num_dn = group_size * num_groups
    total = num_dn + num_queries
    index = jnp.arange(total)
    is_dn = index < num_dn
    group = jnp.where(is_dn, index // group_size, -1)
    same_group = group[:, None] == group[None, :]
    # key is a matching query: everyone may see it; key is a dn query: only its own group.
    return jnp.where(is_dn[None, :], same_group & is_dn[:, None], True)


def hide_padded_slots(self_attention_mask: jax.Array, slot_valid: jax.Array) -> jax.Array:
    """[Q', Q'] and slot_valid [B, Qdn] -> [B, Q', Q']: no query sees a padded dn slot but
    that slot itself (rows are never empty). Not the references' (they cannot hide them):
    opt-in for a detector whose decoder takes a per-image mask."""
    batch, num_dn = slot_valid.shape
    total = self_attention_mask.shape[-1]
    visible_key = jnp.concatenate([slot_valid, jnp.ones((batch, total - num_dn), bool)], axis=1)  # [B, Q']
    itself = jnp.eye(total, dtype=bool)
    return self_attention_mask[None] & (visible_key[:, None, :] | itself[None])


def tile_targets(targets: Mapping[str, jax.Array], num_groups: int) -> dict:
    """{"labels" [B, M], "boxes" [B, M, 4], "valid" [B, M]} -> the same tiled to [B, G * M]
    (slot g * M + m is target m), the targets `target_to_query` [B, G * M] indexes; their
    valid count is G * num_boxes, the references' dn normalizer."""
    return {key: jnp.concatenate([targets[key]] * num_groups, axis=1) for key in ("labels", "boxes", "valid")}


def contrastive_denoising(
    targets: Mapping[str, jax.Array],
    class_embed: jax.Array,
    *,
    num_classes: int,
    num_queries: int,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
    noise: DenoisingNoise | None = None,
    rng: jax.Array | None = None,
    padded_box: float = 0.0,
) -> DenoisingQueries:
    """The contrastive denoising groups of a padded batch (module docstring).

    Args:
      targets: {"labels" [B, M] int, "boxes" [B, M, 4] normalized cxcywh, "valid" [B, M]
        bool}; padded slots may hold anything (NaN included), they are replaced.
      class_embed: [num_classes + 1, E] the detector's label embedding table (transformers'
        `denoising_class_embed`, DINO's `label_enc`); row num_classes embeds padded slots
        and gets no gradient (padding_idx).
      num_classes: K; noised labels are drawn in [0, K).
      num_queries: Q, the matching queries that follow (for the mask).
      num_denoising: the reference's num_denoising / DINO's dn_number; G = max(1,
        num_denoising // M).
      label_noise_ratio, box_noise_scale: the references' (DINO's defaults 0.5, 1.0).
      noise: the draws; or rng: to draw them (exactly one of the two).
      padded_box: the padded slots' box value (0.0: RT-DETR; 0.5: DINO).
    Returns:
      DenoisingQueries ([B, Qdn, ...] fields, Qdn = 2 * M * G; see its docstring).
    """
    labels, boxes, valid = targets["labels"], targets["boxes"], targets["valid"].astype(bool)
    batch, max_boxes = valid.shape
    if class_embed.shape[0] != num_classes + 1:
        raise ValueError(f"class_embed has {class_embed.shape[0]} rows, expected num_classes + 1 = {num_classes + 1}")
    num_groups = denoising_groups(num_denoising, max_boxes)
    num_dn = 2 * max_boxes * num_groups
    if (noise is None) == (rng is None):
        raise ValueError("pass exactly one of noise (the draws) and rng (to draw them)")
    if noise is None:
        noise = DenoisingNoise.draw(rng, batch, num_dn, num_classes)
    for name, value, shape in (("label_uniform", noise.label_uniform, (batch, num_dn)),
                               ("new_labels", noise.new_labels, (batch, num_dn)),
                               ("box_sign", noise.box_sign, (batch, num_dn, 4)),
                               ("box_part", noise.box_part, (batch, num_dn, 4))):
        if tuple(value.shape) != shape:
            raise ValueError(f"noise.{name} has shape {tuple(value.shape)}, expected {shape}")

    # The reference's padded [B, M] targets, tiled to [B, Qdn]: 2G copies (positives, negatives).
    labels = jnp.where(valid, labels.astype(jnp.int32), num_classes)
    boxes = jnp.where(valid[..., None], boxes.astype(jnp.float32), 0.0)
    copies = 2 * num_groups
    slot_labels = jnp.tile(labels, (1, copies))
    slot_boxes = jnp.tile(boxes, (1, copies, 1))
    slot_valid = jnp.tile(valid, (1, copies))
    negative = (jnp.arange(num_dn) // max_boxes) % 2 == 1  # [Qdn]

    if label_noise_ratio > 0:
        flip = (noise.label_uniform < label_noise_ratio * 0.5) & slot_valid
        slot_labels = jnp.where(flip, noise.new_labels.astype(jnp.int32), slot_labels)

    if box_noise_scale > 0:
        corners = box_ops.cxcywh_to_xyxy(slot_boxes)
        diff = jnp.tile(slot_boxes[..., 2:] * 0.5, (1, 1, 2)) * box_noise_scale
        part = noise.box_part.astype(jnp.float32)
        part = jnp.where(negative[None, :, None], part + 1.0, part) * noise.box_sign.astype(jnp.float32)
        corners = jnp.clip(corners + part * diff, 0.0, 1.0)
        slot_boxes = box_ops.xyxy_to_cxcywh(corners)
    slot_boxes = jnp.where(slot_valid[..., None], slot_boxes, jnp.float32(padded_box))

    # nn.Embedding(padding_idx=num_classes): the padded row is read, never trained.
    table = jnp.concatenate([class_embed[:num_classes], jax.lax.stop_gradient(class_embed[num_classes:])])
    content = jnp.take(table, slot_labels, axis=0)

    mask = denoising_attention_mask(num_groups, max_boxes, num_queries)
    slot = jnp.arange(max_boxes)[None, :] + 2 * max_boxes * jnp.arange(num_groups)[:, None]  # [G, M]
    target_to_query = jnp.where(jnp.tile(valid, (1, num_groups)), slot.reshape(-1)[None, :], -1).astype(jnp.int32)

    queries = QueryState(content=content, reference=slot_boxes, self_attention_mask=mask[:num_dn, :num_dn])
    return DenoisingQueries(queries=queries, self_attention_mask=mask, target_to_query=target_to_query,
                            labels=slot_labels, slot_valid=slot_valid, num_groups=num_groups)
