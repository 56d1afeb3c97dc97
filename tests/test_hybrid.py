"""Hybrid matching (H-DETR, `models.hybrid`) as a switch of Deformable DETR and DINO: the
one2many branch exists in training only and its metrics carry the branch's suffix; the
self-attention mask keeps the one-to-many queries from the one-to-one ones (and from
denoising queries); the repeated-target matching assigns each target k times; the
branch's loss is the official one (the criterion on the branch against the targets
repeated k times), weighted by loss.one2many_coef. With the switch off, models and losses
are unchanged (tests/test_parity_deformable.py, tests/test_parity_dino.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REFINE_TWO_STAGE, tiny_deformable_config, tiny_dino_config
from detr_jax.criterion.losses import SetCriterion
from detr_jax.models import build_class_convention, build_model
from detr_jax.models.denoising import tile_targets
from detr_jax.models.detr import variable_shapes

Q, Q_ONE2MANY, K_ONE2MANY = 6, 10, 3  # k * (at most 3 objects) <= Q_ONE2MANY
HYBRID = {"num_queries_one2many": Q_ONE2MANY, "k_one2many": K_ONE2MANY}
MEMBERS = {
    "deformable": lambda: tiny_deformable_config(HYBRID, **{"model.dropout": 0.0}),
    "deformable_two_stage": lambda: tiny_deformable_config({**REFINE_TWO_STAGE, **HYBRID},
                                                           **{"model.dropout": 0.0}),
    "dino": lambda: tiny_dino_config(HYBRID, **{"model.dropout": 0.0}),
}


def batch():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 255, (2, 64, 64, 3)), jnp.uint8)
    mask = jnp.ones((2, 64, 64), bool).at[1, 48:].set(False)
    centre = rng.uniform(0.3, 0.7, (2, 4, 2))
    boxes = jnp.asarray(np.concatenate([centre, rng.uniform(0.1, 0.3, (2, 4, 2))], -1), jnp.float32)
    targets = {"labels": jnp.asarray(rng.integers(0, 3, (2, 4)), jnp.int32), "boxes": boxes,
               "valid": jnp.asarray([[True, True, True, False], [True, False, False, False]])}
    return images, mask, targets


class Member:
    """One member with hybrid matching: its config, model, variables, jitted training and
    inference applications, criterion."""

    def __init__(self, name):
        self.config = MEMBERS[name]()
        self.model = build_model(self.config.model)
        self.images, self.mask, self.targets = batch()
        rngs = {"params": jax.random.PRNGKey(0), "queries": jax.random.PRNGKey(1)}
        self.variables = jax.jit(lambda i, m, t: self.model.init(rngs, i, m, train=True, targets=t))(
            self.images, self.mask, self.targets)
        self.train = jax.jit(lambda v, i, m, t: self.model.apply(
            v, i, m, train=True, targets=t, rngs={"dropout": jax.random.PRNGKey(2), "queries": jax.random.PRNGKey(3)}))
        self.infer = jax.jit(self.model.apply)
        self.criterion = SetCriterion.from_config(self.config.loss, self.config.model.num_classes,
                                                  classes=build_class_convention(self.config))

    def trained(self, variables=None):
        return self.train(self.variables if variables is None else variables, self.images, self.mask, self.targets)


@functools.lru_cache(maxsize=None)
def member_named(name: str) -> Member:
    return Member(name)


@pytest.fixture(scope="module", params=sorted(MEMBERS))
def member(request):
    return member_named(request.param)


def test_the_one2many_branch_exists_in_training_only(member):
    out = member.trained()
    layers, num_classes = member.config.model.num_decoder_layers, member.config.model.num_classes
    assert out["pred_logits"].shape == (layers, 2, Q, num_classes)
    branch = out["one2many"]
    assert branch["pred_logits"].shape == (layers, 2, Q_ONE2MANY, num_classes)
    assert branch["pred_boxes"].shape == (layers, 2, Q_ONE2MANY, 4)
    for key, value in tile_targets(member.targets, K_ONE2MANY).items():
        np.testing.assert_array_equal(branch["targets"][key], value)
    plain = member.infer(member.variables, member.images, member.mask)
    assert "one2many" not in plain and plain["pred_logits"].shape == out["pred_logits"].shape
    # The one-to-one queries see no one-to-many query: their predictions are inference's
    # (two-stage and DINO: the top-(Q + Q_one2many) proposals' best Q are inference's top Q).
    np.testing.assert_allclose(out["pred_logits"], plain["pred_logits"], atol=1e-5)
    np.testing.assert_allclose(out["pred_boxes"], plain["pred_boxes"], atol=1e-5)
    if "enc" in out:
        np.testing.assert_allclose(out["enc"]["pred_logits"], plain["enc"]["pred_logits"], atol=1e-5)


@pytest.mark.parametrize("name", ["deformable", "dino"])
def test_perturbing_the_one2many_queries_leaves_the_others_alone(name):
    """New one-to-many query embeddings (rows Q: of query_embed / tgt_embed) change the
    one2many predictions and nothing else (DINO: nor the denoising queries')."""
    member = member_named(name)
    table = "query_embed" if name == "deformable" else "tgt_embed"
    params = member.variables["params"]
    assert params[table].shape[0] == Q + Q_ONE2MANY
    noise = jax.random.normal(jax.random.PRNGKey(7), params[table][Q:].shape)
    perturbed = {**member.variables, "params": {**params, table: params[table].at[Q:].add(noise)}}
    before, after = member.trained(), member.trained(perturbed)
    changed = np.asarray(before["one2many"]["pred_logits"]) - np.asarray(after["one2many"]["pred_logits"])
    assert np.abs(changed).max() > 1e-3
    for branch in ("main", "dn", "enc"):
        if branch == "main":
            first, second = before, after
        elif branch in before:
            first, second = before[branch], after[branch]
        else:
            continue
        np.testing.assert_array_equal(first["pred_logits"], second["pred_logits"], err_msg=branch)
        np.testing.assert_array_equal(first["pred_boxes"], second["pred_boxes"], err_msg=branch)


def test_the_repeated_targets_are_each_assigned_k_queries(member):
    out = member.trained()
    matching = member.criterion.match(out["one2many"], member.targets)
    t2q = np.asarray(matching.target_to_query)  # [L, B, k * M]
    valid = np.asarray(member.targets["valid"])
    m = valid.shape[1]
    assert t2q.shape == (member.config.model.num_decoder_layers, 2, K_ONE2MANY * m)
    for layer in t2q:
        for image, slots in enumerate(layer):
            copies = slots.reshape(K_ONE2MANY, m)  # copy g of target m at g * M + m
            for target in range(m):
                queries = copies[:, target]
                if valid[image, target]:
                    assert (queries >= 0).all() and len(set(queries)) == K_ONE2MANY  # k distinct queries
                else:
                    assert (queries == -1).all()
            assigned = slots[slots >= 0]
            assert len(set(assigned)) == len(assigned)  # a query takes at most one target


def test_the_branch_loss_is_the_criterion_against_repeated_targets_weighted_by_lambda(member):
    out = member.trained()
    total, metrics = member.criterion(out, member.targets)
    layers = member.config.model.num_decoder_layers
    for key in ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"):
        assert f"{key}_one2many" in metrics, key
    for layer in range(layers - 1):
        for key in ("loss_ce", "loss_bbox", "loss_giou"):
            assert f"{key}_one2many_{layer}" in metrics
    # The official one-to-many loss: the same criterion on the branch alone, against the
    # targets repeated k times (normalized by k times the boxes).
    alone = {"pred_logits": out["one2many"]["pred_logits"], "pred_boxes": out["one2many"]["pred_boxes"]}
    _, reference = member.criterion(alone, tile_targets(member.targets, K_ONE2MANY))
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        for suffix in [""] + [f"_{layer}" for layer in range(layers - 1)]:
            np.testing.assert_allclose(metrics[f"{key}_one2many{suffix}"], reference[f"{key}{suffix}"], rtol=1e-6,
                                       err_msg=key + suffix)
    # lambda weighs the branch: the total is linear in it, its slope the branch's weighted loss.
    without = dataclasses.replace(member.criterion, branch_weights={"one2many": 0.0})
    half = dataclasses.replace(member.criterion, branch_weights={"one2many": 0.5})
    total_without, _ = without(out, member.targets)
    total_half, _ = half(out, member.targets)
    np.testing.assert_allclose(float(total) - float(total_without), float(reference["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(total_half) - float(total_without), 0.5 * float(reference["loss"]), rtol=1e-5)


def test_training_gradients_are_finite_with_and_without_objects():
    member = member_named("dino")

    def loss(variables, targets):
        out = member.model.apply(variables, member.images, member.mask, train=True, targets=targets,
                                 rngs={"dropout": jax.random.PRNGKey(2), "queries": jax.random.PRNGKey(3)})
        return member.criterion(out, targets)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    for valid in (member.targets["valid"], jnp.zeros_like(member.targets["valid"])):
        targets = {**member.targets, "valid": valid}
        (total, metrics), grads = step(member.variables, targets)
        assert np.isfinite(float(total)) and np.isfinite(float(metrics["loss_ce_one2many"]))
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert step._cache_size() == 1  # noqa: SLF001: no recompile for a batch without objects


@pytest.mark.parametrize("args, message", [
    ({"num_queries_one2many": -1}, "num_queries_one2many"),
    ({"k_one2many": 0}, "k_one2many"),
    ({"k_one2many": 2.5}, "k_one2many"),
])
def test_bad_settings_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_deformable_config(args).model)


def test_the_switch_adds_only_query_rows():
    """num_queries_one2many = 0 (the default) is the model without the switch; on, it adds
    Q_one2many rows to query_embed and changes no other parameter."""
    on, off = build_model(tiny_deformable_config(HYBRID).model), build_model(tiny_deformable_config().model)
    assert off.num_queries_one2many == 0 and on.num_queries_one2many == Q_ONE2MANY
    shapes_on, shapes_off = variable_shapes(on)["params"], variable_shapes(off)["params"]
    assert shapes_on["query_embed"].shape == (Q + Q_ONE2MANY, shapes_off["query_embed"].shape[1])
    assert shapes_off["query_embed"].shape[0] == Q
    rest = [jax.tree_util.tree_map(lambda x: x.shape, {k: v for k, v in shapes.items() if k != "query_embed"})
            for shapes in (shapes_on, shapes_off)]
    assert rest[0] == rest[1]
