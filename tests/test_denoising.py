"""Contrastive denoising (detr_jax/models/denoising.py) against transformers' RT-DETR
`get_contrastive_denoising_training_group`, given the same random draws.

How the draws reach the reference: it draws with `torch.rand_like` (the label flip
uniforms, then the box noise part) and `torch.randint_like` (the new labels, then the box
signs as 0/1), in that order, each once per call. The test patches both (pytest's
monkeypatch on the torch module, which the reference looks them up on at call time) with
functions that return our `DenoisingNoise` arrays, telling the calls apart by their
arguments (the input's rank, randint's `high`) and checking each shape, and that each is
asked for exactly once. Seeding torch could never give the same numbers as a jax rng; this
gives the reference exactly our numbers.

Parity holds when the batch's largest target count equals M (the reference sizes its
groups from the batch; we from M): then every output is equal.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from detr_jax.criterion.class_convention import SigmoidFocal
from detr_jax.criterion.losses import LossContext, loss_boxes, loss_labels
from detr_jax.criterion.matcher import Matching
from detr_jax.models.conditional_decoder import inverse_sigmoid
from detr_jax.models.denoising import (DenoisingNoise, contrastive_denoising, denoising_attention_mask,
                                       denoising_groups, hide_padded_slots, tile_targets)
from detr_jax.models.queries import QueryState

torch = pytest.importorskip("torch")
rt_detr = pytest.importorskip("transformers.models.rt_detr.modeling_rt_detr")

K, E, Q = 6, 8, 5  # classes, width, matching queries
hide = jax.jit(hide_padded_slots)


def padded_targets(counts, max_boxes, seed=0):
    """Padded targets with counts[b] valid slots first; padded slots hold garbage (NaN boxes,
    label -7) that must not leak."""
    rng = np.random.default_rng(seed)
    batch = len(counts)
    cxcy = rng.uniform(0.2, 0.8, (batch, max_boxes, 2))
    wh = rng.uniform(0.05, 0.5, (batch, max_boxes, 2))
    boxes = np.concatenate([cxcy, wh], -1).astype(np.float32)
    labels = rng.integers(0, K, (batch, max_boxes)).astype(np.int32)
    valid = np.arange(max_boxes)[None, :] < np.asarray(counts)[:, None]
    boxes[~valid] = np.nan
    labels[~valid] = -7
    return {"labels": labels, "boxes": boxes, "valid": valid}


def embedding_table(seed=1):
    # transformers re-initializes the whole table (xavier), padding row included: nonzero.
    return np.random.default_rng(seed).normal(size=(K + 1, E)).astype(np.float32)


def draws(counts, max_boxes, num_denoising, seed=2):
    groups = denoising_groups(num_denoising, max_boxes)
    return jax.jit(DenoisingNoise.draw, static_argnums=(1, 2, 3))(
        jax.random.key(seed), len(counts), 2 * max_boxes * groups, K)


# jitted: one compilation per layout instead of one per op (eager), the file's time.
build = jax.jit(contrastive_denoising, static_argnames=(
    "num_classes", "num_queries", "num_denoising", "label_noise_ratio", "box_noise_scale", "padded_box"))


def ours(targets, table, noise, num_denoising, **kw):
    return build({k: jnp.asarray(v) for k, v in targets.items()}, jnp.asarray(table), num_classes=K,
                 num_queries=Q, num_denoising=num_denoising, noise=noise, **kw)


def feed_draws(monkeypatch, noise: DenoisingNoise, num_classes: int) -> list[str]:
    """Patches torch.rand_like and torch.randint_like (module docstring) to return `noise`'s
    arrays to transformers' RT-DETR denoising; returns the list the draws asked for are
    appended to, by name, in the order asked."""
    as_torch = {name: torch.from_numpy(np.array(getattr(noise, name)))
                for name in ("label_uniform", "new_labels", "box_sign", "box_part")}
    asked = []

    def rand_like(input, dtype=None, **kw):
        name = "label_uniform" if input.dim() == 2 else "box_part"
        asked.append(name)
        assert tuple(input.shape) == tuple(as_torch[name].shape)
        return as_torch[name].to(dtype or input.dtype)

    def randint_like(input, low, high=None, dtype=None, **kw):
        if high == 2:  # the box signs, as 0/1
            asked.append("box_sign")
            assert tuple(input.shape) == tuple(as_torch["box_sign"].shape)
            return ((as_torch["box_sign"] + 1) / 2).to(dtype or input.dtype)
        asked.append("new_labels")
        assert (low, high) == (0, num_classes) and tuple(input.shape) == tuple(as_torch["new_labels"].shape)
        return as_torch["new_labels"].to(dtype or input.dtype)

    monkeypatch.setattr(torch, "rand_like", rand_like)
    monkeypatch.setattr(torch, "randint_like", randint_like)
    return asked


def reference(targets, table, noise, num_denoising, monkeypatch, logits=False, label_noise_ratio=0.5,
              box_noise_scale=1.0):
    """transformers' group construction on the same targets (list form) and the same draws.
    Returns (noised labels, content, boxes: normalized unless logits, attn_mask, meta)."""
    asked = feed_draws(monkeypatch, noise, K)
    if not logits:
        monkeypatch.setattr(rt_detr, "inverse_sigmoid", lambda x, eps=1e-5: x)
    embed = torch.nn.Embedding(K + 1, E, padding_idx=K)
    with torch.no_grad():
        embed.weight.copy_(torch.from_numpy(table))
    seen = []

    def class_embed(labels):
        seen.append(labels.clone())
        return embed(labels)

    listed = [{"class_labels": torch.from_numpy(targets["labels"][b][targets["valid"][b]]).long(),
               "boxes": torch.from_numpy(targets["boxes"][b][targets["valid"][b]])}
              for b in range(len(targets["valid"]))]
    with torch.no_grad():
        content, boxes, attn_mask, meta = rt_detr.get_contrastive_denoising_training_group(
            listed, K, Q, class_embed, num_denoising_queries=num_denoising, label_noise_ratio=label_noise_ratio,
            box_noise_scale=box_noise_scale)
    monkeypatch.undo()
    expected = (["label_uniform", "new_labels"] if label_noise_ratio > 0 else []) + (
        ["box_sign", "box_part"] if box_noise_scale > 0 else [])
    assert asked == expected, asked
    return seen[0].numpy(), content.numpy(), boxes.numpy(), attn_mask.numpy(), meta


def mismatches(dn, ref, counts, max_boxes):
    """The parity checks, as a list of what differs (empty: equal)."""
    labels, content, boxes, attn_mask, meta = ref
    found = []
    if dn.num_groups != meta["dn_num_group"] or dn.num_dn_queries != meta["dn_num_split"][0]:
        return [f"layout: ours G={dn.num_groups} Qdn={dn.num_dn_queries}, reference {meta}"]
    if not np.array_equal(np.asarray(dn.labels), labels):
        found.append("labels")
    if not np.allclose(np.asarray(dn.queries.content), content, rtol=0, atol=1e-6):
        found.append("content")
    if not np.allclose(np.asarray(dn.queries.reference), boxes, rtol=0, atol=1e-6):
        found.append("boxes")
    if not np.array_equal(np.asarray(dn.self_attention_mask), attn_mask == 0):  # theirs: -inf = blocked
        found.append("mask")
    t2q = np.asarray(dn.target_to_query).reshape(len(counts), dn.num_groups, max_boxes)
    for b, n in enumerate(counts):
        if not (np.array_equal(t2q[b, :, :n].reshape(-1), meta["dn_positive_idx"][b].numpy())
                and (t2q[b, :, n:] == -1).all()):
            found.append(f"target_to_query[{b}]")
    return found


@pytest.mark.parametrize("counts,max_boxes,num_denoising", [
    ((4, 2), 4, 10),   # G = 2
    ((3, 0, 1), 3, 7),  # an image without objects, G = 2
    ((4, 1), 4, 3),    # num_denoising < M: one group
])
def test_parity_with_transformers(counts, max_boxes, num_denoising, monkeypatch):
    targets, table = padded_targets(counts, max_boxes), embedding_table()
    noise = draws(counts, max_boxes, num_denoising)
    dn = ours(targets, table, noise, num_denoising)
    ref = reference(targets, table, noise, num_denoising, monkeypatch)
    assert mismatches(dn, ref, counts, max_boxes) == []
    labels, content, boxes, attn_mask, meta = ref
    # the draws did something: some labels flipped, negatives farther than positives
    flipped = (np.asarray(noise.label_uniform) < 0.25) & np.asarray(dn.slot_valid)
    assert flipped.any()
    valid = np.asarray(dn.slot_valid).reshape(len(counts), dn.num_groups, 2, max_boxes)
    shift = np.abs(boxes - np.tile(np.nan_to_num(targets["boxes"]), (1, 2 * dn.num_groups, 1))).sum(-1)
    shift = shift.reshape(valid.shape)
    assert shift[:, :, 1][valid[:, :, 1]].mean() > shift[:, :, 0][valid[:, :, 0]].mean()
    # and the reference's own output (logits, eps 1e-5) is our boxes' inverse_sigmoid
    _, _, box_logits, _, _ = reference(targets, table, noise, num_denoising, monkeypatch, logits=True)
    np.testing.assert_allclose(np.asarray(inverse_sigmoid(dn.queries.reference)), box_logits, rtol=1e-6, atol=1e-5)


def test_parity_without_noise(monkeypatch):
    """label_noise_ratio 0 / box_noise_scale 0: the reference draws nothing; neither do we use draws."""
    counts, max_boxes, num_denoising = (2, 3), 3, 6
    targets, table = padded_targets(counts, max_boxes), embedding_table()
    noise = draws(counts, max_boxes, num_denoising)
    dn = ours(targets, table, noise, num_denoising, label_noise_ratio=0.0, box_noise_scale=0.0)
    ref = reference(targets, table, noise, num_denoising, monkeypatch, label_noise_ratio=0.0, box_noise_scale=0.0)
    assert mismatches(dn, ref, counts, max_boxes) == []


def test_the_parity_check_catches_mistakes(monkeypatch):
    counts, max_boxes, num_denoising = (4, 2), 4, 10
    targets, table = padded_targets(counts, max_boxes), embedding_table()
    noise = draws(counts, max_boxes, num_denoising)
    dn = ours(targets, table, noise, num_denoising)
    ref = reference(targets, table, noise, num_denoising, monkeypatch)
    assert mismatches(dn, ref, counts, max_boxes) == []
    # the mask not inverted (the references' True = blocked taken as ours)
    assert mismatches(dn.replace(self_attention_mask=~dn.self_attention_mask), ref, counts, max_boxes) == ["mask"]
    # negatives without the +1 push: the same as feeding negatives box_part - 1
    negative = (np.arange(dn.num_dn_queries) // max_boxes) % 2 == 1
    part = np.asarray(noise.box_part)
    unpushed = noise.replace(box_part=np.where(negative[None, :, None], part - 1.0, part).astype(np.float32))
    assert mismatches(ours(targets, table, unpushed, num_denoising), ref, counts, max_boxes) == ["boxes"]
    # positives indexed in the negative half
    t2q = np.asarray(dn.target_to_query)
    shifted = np.where(t2q >= 0, t2q + max_boxes, -1)
    assert mismatches(dn.replace(target_to_query=shifted), ref, counts, max_boxes) == [
        "target_to_query[0]", "target_to_query[1]"]
    # label noise at the full ratio instead of half of it
    twice = noise.replace(label_uniform=np.asarray(noise.label_uniform) * np.float32(0.5))
    assert "labels" in mismatches(ours(targets, table, twice, num_denoising), ref, counts, max_boxes)


def test_fixed_shapes_and_no_retrace():
    max_boxes, num_denoising, table = 4, 10, jnp.asarray(embedding_table())
    traces = []

    @jax.jit
    def build(targets, rng):
        traces.append(1)
        return contrastive_denoising(targets, table, num_classes=K, num_queries=Q, num_denoising=num_denoising,
                                     rng=rng)

    results = []
    for step, counts in enumerate([(4, 2), (1, 0), (0, 0), (3, 4)]):
        targets = {k: jnp.asarray(v) for k, v in padded_targets(counts, max_boxes, seed=step).items()}
        dn = build(targets, jax.random.key(step))
        results.append((counts, dn))
    assert len(traces) == 1
    G, Qdn = 2, 16
    for counts, dn in results:
        assert dn.num_groups == G
        assert dn.queries.content.shape == (2, Qdn, E) and dn.queries.reference.shape == (2, Qdn, 4)
        assert dn.self_attention_mask.shape == (Qdn + Q, Qdn + Q) and dn.target_to_query.shape == (2, G * max_boxes)
        assert all(np.isfinite(np.asarray(x)).all() for x in (dn.queries.content, dn.queries.reference))
        slot_valid = np.asarray(dn.slot_valid).reshape(2, 2 * G, max_boxes)
        t2q = np.asarray(dn.target_to_query).reshape(2, G, max_boxes)
        for b, n in enumerate(counts):
            assert (slot_valid[b, :, :n]).all() and not slot_valid[b, :, n:].any()
            assert (t2q[b, :, n:] == -1).all()
            np.testing.assert_array_equal(t2q[b, :, :n], np.arange(n)[None] + 2 * max_boxes * np.arange(G)[:, None])
        # padded slots: the padding label and box 0, whatever the padded targets held
        padded = ~np.asarray(dn.slot_valid)
        assert (np.asarray(dn.labels)[padded] == K).all()
        assert (np.asarray(dn.queries.reference)[padded] == 0).all()
        np.testing.assert_array_equal(np.asarray(dn.queries.content)[padded],
                                      np.broadcast_to(np.asarray(table)[K], (padded.sum(), E)))


def test_zero_objects():
    max_boxes, num_denoising, table = 3, 6, jnp.asarray(embedding_table())
    targets = {k: jnp.asarray(v) for k, v in padded_targets((0, 0), max_boxes).items()}
    dn = build(targets, table, num_classes=K, num_queries=Q, num_denoising=num_denoising, rng=jax.random.key(0))
    assert dn.num_groups == 2 and dn.num_dn_queries == 12
    assert np.isfinite(np.asarray(dn.queries.content)).all() and np.isfinite(np.asarray(dn.queries.reference)).all()
    assert (np.asarray(dn.target_to_query) == -1).all() and not np.asarray(dn.slot_valid).any()
    mask = np.asarray(dn.self_attention_mask)
    assert not mask[dn.num_dn_queries:, :dn.num_dn_queries].any()  # matching queries see no group
    hidden = np.asarray(hide(dn.self_attention_mask, dn.slot_valid))  # [B, Q', Q']
    assert hidden.shape == (2, 12 + Q, 12 + Q)
    for b in range(2):
        # every dn slot is seen by itself only; matching queries unchanged
        np.testing.assert_array_equal(hidden[b, :, :12], np.eye(12 + Q, dtype=bool)[:, :12])
        np.testing.assert_array_equal(hidden[b, :, 12:], mask[:, 12:])
    # a gradient through the table is finite and never reaches the padding row
    grad = jax.jit(jax.grad(lambda t: jnp.sum(contrastive_denoising(
        targets, t, num_classes=K, num_queries=Q, num_denoising=num_denoising, rng=jax.random.key(0)
    ).queries.content ** 2)))(table)
    assert np.isfinite(np.asarray(grad)).all() and (np.asarray(grad) == 0).all()


def test_hide_padded_slots_and_prepend():
    max_boxes, num_denoising = 3, 6  # test_zero_objects' layout: its compilations are reused
    targets = {k: jnp.asarray(v) for k, v in padded_targets((3, 1), max_boxes).items()}
    dn = build(targets, jnp.asarray(embedding_table()), num_classes=K, num_queries=Q, num_denoising=num_denoising,
               rng=jax.random.key(3))
    hidden = np.asarray(hide(dn.self_attention_mask, dn.slot_valid))
    valid = np.asarray(dn.slot_valid)
    mask = np.asarray(dn.self_attention_mask)
    np.testing.assert_array_equal(hidden[0], mask)  # image 0 has no padded slot
    for j in np.flatnonzero(~valid[1]):
        assert hidden[1, :, j].sum() == 1 and hidden[1, j, j]
    assert hidden.any(-1).all()
    # the padding row of the table gets no gradient, the others do
    grad = jax.jit(jax.grad(lambda t: jnp.sum(contrastive_denoising(
        targets, t, num_classes=K, num_queries=Q, num_denoising=num_denoising, rng=jax.random.key(3)
    ).queries.content ** 2)))(jnp.asarray(embedding_table()))
    assert (np.asarray(grad)[K] == 0).all() and np.abs(np.asarray(grad)[:K]).sum() > 0
    matching = QueryState(content=jnp.zeros((2, Q, E)), reference=jnp.full((2, Q, 4), 0.5))
    state = jax.jit(lambda dn, matching: dn.prepend(matching))(dn, matching)
    assert state.content.shape == (2, dn.num_dn_queries + Q, E)
    assert state.self_attention_mask.shape == (dn.num_dn_queries + Q,) * 2
    np.testing.assert_array_equal(np.asarray(jax.jit(denoising_attention_mask, static_argnums=(0, 1, 2))(
        2, max_boxes, Q)), mask)


def test_target_to_query_reproduces_the_dn_loss(monkeypatch):
    """The criterion's smallest change: targets tiled G times (`tile_targets`) read with
    target_to_query [B, G * M] give transformers' RT-DETR dn box and focal losses (indices from
    `get_cdn_matched_indices`, num_boxes * dn_num_group), on random dn predictions."""
    from transformers.loss.loss_rt_detr import RTDetrLoss
    counts, max_boxes, num_denoising = (4, 2), 4, 10
    targets, table = padded_targets(counts, max_boxes), embedding_table()
    noise = draws(counts, max_boxes, num_denoising)
    dn = ours(targets, table, noise, num_denoising)
    _, _, _, _, meta = reference(targets, table, noise, num_denoising, monkeypatch)
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, dn.num_dn_queries, K)).astype(np.float32)
    pred_boxes = np.concatenate([rng.uniform(0.2, 0.8, (2, dn.num_dn_queries, 2)),
                                 rng.uniform(0.05, 0.4, (2, dn.num_dn_queries, 2))], -1).astype(np.float32)

    listed = [{"class_labels": torch.from_numpy(targets["labels"][b][:n]).long(),
               "boxes": torch.from_numpy(targets["boxes"][b][:n])} for b, n in enumerate(counts)]
    indices = RTDetrLoss.get_cdn_matched_indices(meta, listed)
    num_boxes = float(sum(counts) * meta["dn_num_group"])
    config = rt_detr.RTDetrConfig(num_labels=K)
    criterion = RTDetrLoss(config)
    out = {"logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(pred_boxes)}
    theirs = criterion.loss_boxes(out, listed, indices, num_boxes)
    # transformers' loss_labels_focal cannot run (it passes alpha and gamma as sigmoid_focal_loss's
    # num_boxes and alpha, on a Long one-hot): its body with the focal loss written out.
    idx = criterion._get_source_permutation_idx(indices)
    target_classes = torch.full((2, dn.num_dn_queries), K, dtype=torch.int64)
    target_classes[idx] = torch.cat([t["class_labels"][j] for t, (_, j) in zip(listed, indices)])
    onehot = torch.nn.functional.one_hot(target_classes, K + 1)[..., :-1].float()
    prob = out["logits"].sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    alpha, gamma = criterion.alpha, criterion.gamma
    focal = (alpha * onehot + (1 - alpha) * (1 - onehot)) * ce * (1 - p_t) ** gamma
    theirs["loss_focal"] = focal.mean(1).sum() * dn.num_dn_queries / num_boxes

    tiled = jax.jit(tile_targets, static_argnums=1)({k: jnp.asarray(v) for k, v in targets.items()}, dn.num_groups)
    t2q = np.where(np.asarray(tiled["valid"]), np.asarray(dn.target_to_query), -1)[None]
    matching = Matching(t2q, np.ones((1, 2), bool), np.zeros((1, 2), np.int32))
    ctx = LossContext(K, SigmoidFocal(alpha=criterion.alpha, gamma=criterion.gamma))
    branch = {"pred_logits": logits[None], "pred_boxes": pred_boxes[None]}
    n = np.float32(max(np.asarray(tiled["valid"]).sum(), 1))
    assert float(n) == num_boxes
    mine = jax.jit(lambda branch, tiled, matching, n: {
        **loss_boxes(branch, tiled, matching, n, ctx), **loss_labels(branch, tiled, matching, n, ctx)})(
        branch, tiled, matching, n)
    np.testing.assert_allclose(float(mine["loss_bbox"][0]), float(theirs["loss_bbox"]), rtol=1e-5)
    np.testing.assert_allclose(float(mine["loss_giou"][0]), float(theirs["loss_giou"]), rtol=1e-5)
    np.testing.assert_allclose(float(mine["loss_ce"][0]), float(theirs["loss_focal"]), rtol=1e-5)
