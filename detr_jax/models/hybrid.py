"""Hybrid matching (H-DETR: Jia et al., "DETRs with Hybrid Matching", CVPR 2023): a
training-time group of one-to-many queries.

In training, a detector with hybrid matching runs `num_queries_one2many` extra queries
after its Q one-to-one (matching) queries, through the same decoder in the same pass and
with the same heads. A self-attention mask keeps the two groups apart: a one-to-many query
sees only one-to-many queries, a one-to-one query only one-to-one queries (and denoising
queries, if any, see no one-to-many query; `isolate_last`). The one-to-many predictions
are the `one2many` output branch (every decoder layer), which the criterion matches with
its matcher (Hungarian) against the targets repeated `k_one2many` times
(`denoising.tile_targets`, carried in the branch as "targets"), so each target is assigned
k queries; its loss is normalized by k times the boxes, as the reference's, and weighted
by `loss.one2many_coef` (the reference's lambda_one2many). At inference only the Q
one-to-one queries exist: the predictions, the Predictor and export are those of the
detector without the switch (the extra query parameters are simply not read).

The official HDETR/H-Deformable-DETR (models/deformable_detr.py, engine.py
`train_hybrid`), which this follows:
  - learned queries: one `query_embed` of Q + Q_one2many rows, the first Q the one-to-one
    ones (at inference only those are read);
  - two-stage: the top-(Q + Q_one2many) encoder proposals are selected (the transformer's
    `two_stage_num_proposals`), the best Q being the one-to-one queries: those are exactly
    the top-Q chosen at inference;
  - mask: `self_attn_mask[Q:, :Q] = self_attn_mask[:Q, Q:] = True` (blocked), no other;
  - targets: `target["boxes"].repeat(k_one2many, 1)` (the whole list k times, our
    `tile_targets`); the one-to-many criterion is the same SetCriterion (matcher, terms,
    weights) on `pred_*_one2many` and `aux_outputs_one2many`; the two-stage encoder
    proposals are trained once, in the one-to-one loss (the branch has no `enc`);
  - recipe (configs/two_stage/deformable-detr-hybrid-branch/12eps/
    r50_hybrid_branch_lambda1_group6_t1500_*.sh): Q = 300, Q_one2many = 1500,
    k_one2many = 6, lambda_one2many = 1.0 (main.py's own k default is 5).
Deviations: the official logs `loss_*_one2many` already multiplied by lambda and names an
aux layer `loss_ce_0_one2many`; here the metrics are unweighted like every branch's and
named as the other branches (`loss_ce_one2many_0`); lambda multiplies them in the total.
The repeated targets keep their padded slots (M' = k * M slots, k * n valid), which only
changes the order the Hungarian solver sees tied costs in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.models.denoising import tile_targets
from detr_jax.models.queries import QueryState

# model.transformer_args of every detector with the switch, and their defaults (off; k as
# the official hybrid-branch configs).
HYBRID_ARGS = {
    "num_queries_one2many": 0,  # extra one-to-many queries in training (0: no hybrid matching)
    "k_one2many": 6,            # the one2many branch is matched against the targets repeated k times
}


def check_hybrid_args(args: Mapping[str, Any]) -> dict[str, int]:
    """num_queries_one2many (>= 0) and k_one2many (>= 1) of `args`, as ints; ValueError
    for a bad value."""
    checked = {}
    for key, low in (("num_queries_one2many", 0), ("k_one2many", 1)):
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"model.transformer_args {key}={value!r}: expected an integer >= {low}")
        checked[key] = int(value)
    return checked


def isolate_last(queries: QueryState, count: int) -> QueryState:
    """`queries` with its last `count` queries (the one-to-many group) and the others kept
    from each other by the self-attention mask (True = may attend): within each side the
    existing mask (or everything) still holds."""
    total = queries.num_queries
    one2many = np.arange(total) >= total - count
    same_side = jnp.asarray(one2many[:, None] == one2many[None, :])
    mask = queries.self_attention_mask
    return queries.replace(self_attention_mask=same_side if mask is None else mask & same_side)


def split_one2many(logits: jax.Array, boxes: jax.Array, num_one2many: int, targets: Mapping[str, jax.Array] | None,
                   k_one2many: int) -> tuple[jax.Array, jax.Array, dict]:
    """Every layer's predictions over [one-to-one | one-to-many] queries -> (the one-to-one
    logits [L, B, Q, C] and boxes [L, B, Q, 4], the `one2many` branch {pred_logits,
    pred_boxes [L, B, Q_one2many, ...], targets: the padded targets repeated k_one2many
    times, [B, k * M]})."""
    if targets is None:
        raise ValueError("hybrid matching (num_queries_one2many > 0) in training needs the targets")
    first = logits.shape[2] - num_one2many
    branch = {"pred_logits": logits[:, :, first:], "pred_boxes": boxes[:, :, first:],
              "targets": tile_targets(targets, k_one2many)}
    return logits[:, :, :first], boxes[:, :, :first], branch
