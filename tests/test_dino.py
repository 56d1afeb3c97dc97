"""DINO (`model.arch=dino`) beyond parity (tests/test_parity_dino.py): the decoder switches
it turns on, training through the command line (with hybrid matching), the fault cases of
issue 30, 5 scales, and its config errors.

Issue 30's faults: batches with objects, with an image without any and with none give
finite losses in float32 and bfloat16, one program per dtype
(`test_losses_are_finite_with_and_without_objects`, in-process); 8 simulated devices
equal 1 when one device's shard has no objects, and the sharded step compiles once across
batches with objects, one empty device and none
(`test_eight_devices_equal_one_with_an_empty_device_and_no_batch_recompiles`, one
subprocess); saturated bfloat16 outputs give no NaN/Inf matching cost
(`test_matching_costs_have_no_nan_under_bfloat16_with_saturated_outputs`).

Cheap enough for CI: one tiny model and its variables per dtype for the whole module
(`tiny_model`), look-forward-twice checked on the decoder alone, one two-step
command-line run and one 8-device process at the smallest sizes."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import REPO, cli_overrides
from test_train import run_sharded_step
from detr_jax.config.loading import load_config
from detr_jax.criterion.losses import SetCriterion
from detr_jax.criterion.matcher import matching_cost
from detr_jax.models import build_class_convention, build_model
from detr_jax.models.deformable_transformer import DeformableDecoder
from detr_jax.models.detr import BoxHead
from detr_jax.models.queries import QueryState

CONFIG = REPO / "configs" / "synthetic_dino_tiny.py"
HYBRID_CONFIG = REPO / "configs" / "synthetic_dino_hybrid_tiny.py"
TINY = {"model.hidden_dim": 32, "model.num_heads": 2, "model.num_encoder_layers": 1, "model.num_decoder_layers": 2,
        "model.dim_feedforward": 64, "model.num_queries": 6, "data.max_boxes": 3,
        "model.transformer_args": {"num_feature_levels": 4, "encoder_n_points": 2, "decoder_n_points": 2,
                                   "dn_number": 6}}


def tiny_config(**overrides):
    return load_config(CONFIG, {**TINY, **overrides})


def batch(valid):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 255, (2, 64, 64, 3)), jnp.uint8)
    mask = jnp.ones((2, 64, 64), bool).at[1, 48:].set(False)
    valid = jnp.asarray(valid, bool)
    centre = rng.uniform(0.3, 0.7, (2, 3, 2))
    boxes = jnp.asarray(np.concatenate([centre, rng.uniform(0.1, 0.3, (2, 3, 2))], -1), jnp.float32)
    targets = {"labels": jnp.asarray(rng.integers(0, 3, (2, 3)), jnp.int32), "boxes": boxes, "valid": valid}
    return images, mask, targets


def init_variables(model):
    """The model's variables, initialized under jit (in training, with targets)."""
    images, mask, targets = batch([[True] * 3] * 2)
    return jax.jit(lambda i, m, t: model.init({"params": jax.random.PRNGKey(0), "queries": jax.random.PRNGKey(1)},
                                              i, m, train=True, targets=t))(images, mask, targets)


@functools.lru_cache(maxsize=None)
def tiny_model(dtype: str = "float32"):
    """(config, model, variables) of the tiny DINO, built and initialized once per dtype for
    every test of the module."""
    config = tiny_config(**{"model.dtype": dtype})
    model = build_model(config.model)
    return config, model, init_variables(model)


@functools.lru_cache(maxsize=None)
def loss_function(dtype: str):
    config, model, variables = tiny_model(dtype)
    criterion = SetCriterion.from_config(config.loss, config.model.num_classes, classes=build_class_convention(config))

    @jax.jit
    def loss(variables, images, mask, targets):
        """((loss, metrics), the model's outputs) in training."""
        out = model.apply(variables, images, mask, train=True, targets=targets,
                          rngs={"dropout": jax.random.PRNGKey(2), "queries": jax.random.PRNGKey(3)})
        return criterion(out, targets), out

    return variables, loss


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("valid", [[[True, True, False], [True, False, False]],
                                   [[True, True, False], [False] * 3], [[False] * 3] * 2],
                         ids=["objects", "one_empty_image", "no_objects"])
def test_losses_are_finite_with_and_without_objects(dtype, valid):
    """Issue 30's fault checks: a batch without objects (denoising groups of padded slots
    only), one with an image without objects, and bfloat16 give finite losses, with one
    compilation per dtype for every batch."""
    variables, loss = loss_function(dtype)
    (total, metrics), _ = loss(variables, *batch(valid))
    assert np.isfinite(float(total)), metrics
    for key in ("loss_ce_dn", "loss_bbox_dn", "loss_ce_enc", "loss_giou_enc", "loss_ce_0"):
        assert np.isfinite(float(metrics[key])), key
    assert float(metrics["nonfinite_cost"]) == 0
    if not np.any(valid):
        assert float(metrics["loss_bbox_dn"]) == 0 and float(metrics["loss_bbox"]) == 0
    assert loss._cache_size() == 1  # noqa: SLF001: both batches, one program


def saturated(variables, key):
    """`variables` with every class head's kernel and bias x 1e4 and the box heads' last
    kernels (zeros at init) N(0, 1e3): logits of |x| ~ 1e4, every sigmoid 0 or 1, boxes
    degenerate (nearly every width and height 0 or 1)."""
    params = dict(variables["params"])
    for name in ("class_embed", "enc_out_class_embed"):
        params[name] = jax.tree.map(lambda x: x * 1e4, params[name])
    for name in ("bbox_embed", "enc_out_bbox_embed"):
        last = params[name]["layers_2"]
        kernel = 1e3 * jax.random.normal(key, last["kernel"].shape)
        params[name] = {**params[name], "layers_2": {**last, "kernel": kernel}}
    return {**variables, "params": params}


def test_matching_costs_have_no_nan_under_bfloat16_with_saturated_outputs():
    """transformers issue 42202 (NaN matching costs under mixed precision, which then stop
    scipy): the bfloat16 DINO driven to its extremes (`saturated`: every class probability
    exactly 0 or 1, degenerate boxes) gives a finite matching cost in every entry of every
    matched branch (main, enc) and a finite loss; the same program as the other bfloat16
    batches (no recompile). A focal cost without its 1e-8 inside the logs gives +Inf here."""
    config, _, _ = tiny_model("bfloat16")
    variables, loss = loss_function("bfloat16")
    images, mask, targets = batch([[True, True, False], [True, False, False]])
    (total, metrics), out = loss(saturated(variables, jax.random.PRNGKey(9)), images, mask, targets)
    assert np.isfinite(float(total)) and float(metrics["nonfinite_cost"]) == 0, metrics
    matcher = SetCriterion.from_config(config.loss, config.model.num_classes,
                                       classes=build_class_convention(config)).matcher
    for name, branch in (("main", out), ("enc", out["enc"])):
        logits, boxes = np.asarray(branch["pred_logits"]), np.asarray(branch["pred_boxes"])
        # Saturated: every logit far beyond the sigmoid's range, nearly every size 0 or 1.
        sizes = boxes[..., 2:]
        assert np.abs(logits).min() > 100 and (np.minimum(sizes, 1 - sizes) < 1e-6).mean() > 0.9, name
        cost = matching_cost(branch["pred_logits"], branch["pred_boxes"], targets["labels"], targets["boxes"],
                             cost_class=matcher.cost_class, cost_bbox=matcher.cost_bbox, cost_giou=matcher.cost_giou,
                             classes=matcher.classes)
        assert np.isfinite(np.asarray(cost)).all(), name
    assert loss._cache_size() == 1  # noqa: SLF001


# After SHARDED_STEP (test_train): the 8 devices' step on every kind of batch of the same
# shapes, the compiled programs counted.
STEPS_OF_EVERY_KIND = """
batches = {"one empty device": batch, "objects": fixed_batch(batch_size=8),
           "no objects": fixed_batch(batch_size=8, empty=range(8))}
for name, kind in batches.items():
    state, metrics = run.step(state, global_batch(kind, mesh))
    print("STEP", name.replace(" ", "_"), *(float(metrics[k]) for k in STEP_METRICS))
print("PROGRAMS", run.step._cache_size())
"""
STEP_METRICS = ("loss", "loss_ce_dn", "loss_bbox_dn", "loss_bbox", "loss_ce_enc", "nonfinite_cost")


def test_eight_devices_equal_one_with_an_empty_device_and_no_batch_recompiles():
    """Issue 30's fault tests of the sharded train step (8 forced CPU devices, one process;
    DINO with denoising at width 96, for its neck's GroupNorm(32): at 64 the stride-64
    level, one cell at 64x64 images, normalizes 2 values per group, which cancels
    input_proj/conv3's gradient as width 32 does every projection's in test_train, and
    Adam's first step turns that rounding noise into 5.3e-6 of difference; 3 values per
    group leave it a true gradient, 5.2e-7): (a) a global batch of 8 whose image 3, the
    whole shard of device 3, has no objects trains on 8 devices as on 1 (RT-DETR issue
    684: such a batch hangs PyTorch's multi-GPU denoising); (b) on 8 devices, that batch,
    one with objects in every image and one without any: finite losses, no non-finite
    matching cost, one compiled step. bfloat16 is checked in-process
    (`test_losses_are_finite_with_and_without_objects`: the same kinds of batch, one
    program), which saves this process a third compilation."""
    result = run_sharded_step("tiny_dino_config(**{'model.hidden_dim': 96})", "fixed_batch(batch_size=8, empty=(3,))",
                              then=STEPS_OF_EVERY_KIND.replace("STEP_METRICS", repr(STEP_METRICS)), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # Tolerance 2e-6 on parameters, as test_train's: a whole Adam step is ~1e-4.
    assert float(out.split("MAXDIFF")[1].split()[0]) < 2e-6, out
    steps = [line.split()[1:] for line in out.splitlines() if line.startswith("STEP")]
    assert len(steps) == 3, out
    for kind, *values in steps:
        values = dict(zip(STEP_METRICS, map(float, values)))
        assert all(np.isfinite(v) for v in values.values()) and values["nonfinite_cost"] == 0, (kind, values)
        if kind == "no_objects":
            assert values["loss_bbox_dn"] == 0 and values["loss_bbox"] == 0, values
    assert "PROGRAMS 1\n" in out, out


def test_the_denoising_branch_is_matched_by_construction_and_hidden_from_the_matching_queries():
    config, model, variables = tiny_model()
    images, mask, targets = batch([[True, True, False], [True, False, False]])
    train = jax.jit(lambda v, i, m, t, key: model.apply(v, i, m, train=True, targets=t, rngs={"queries": key}))
    out = train(variables, images, mask, targets, jax.random.PRNGKey(5))
    groups = 6 // 3
    assert out["dn"]["pred_logits"].shape == (2, 2, 2 * 3 * groups, config.model.num_classes)
    t2q = np.asarray(out["dn"]["target_to_query"])
    assert t2q.tolist() == [[0, 1, -1, 6, 7, -1], [0, -1, -1, 6, -1, -1]]
    # The matching queries cannot see the dn queries: their outputs are those without targets.
    plain = jax.jit(model.apply)(variables, images, mask)
    np.testing.assert_allclose(out["pred_logits"], plain["pred_logits"], atol=1e-5)
    np.testing.assert_allclose(out["pred_boxes"], plain["pred_boxes"], atol=1e-5)
    # Other draws, other dn queries, the same matching queries.
    other = train(variables, images, mask, targets, jax.random.PRNGKey(6))
    assert np.abs(np.asarray(other["dn"]["pred_boxes"]) - np.asarray(out["dn"]["pred_boxes"])).max() > 1e-3


class DecoderWithBoxHead(nn.Module):
    """DINO's decoder (its switches, one box head shared by every layer) alone: each
    layer's boxes for tiny inputs."""

    look_forward_twice: bool

    @nn.compact
    def __call__(self, memory, queries):
        decoder = DeformableDecoder(num_layers=2, num_heads=2, dim_feedforward=16, num_points=1,
                                    position_from_reference=True, final_norm=True,
                                    look_forward_twice=self.look_forward_twice, inverse_sigmoid_eps=1e-3,
                                    name="decoder")
        bbox_embed = BoxHead(8, name="bbox_embed")  # a last layer that is not zero: its input matters
        valid_ratios = jnp.ones((memory.shape[0], len(DECODER_LEVELS), 2))
        mask = jnp.ones(memory.shape[:2], bool)
        return decoder(memory, mask, DECODER_LEVELS, valid_ratios, queries, [bbox_embed] * 2, True)[2]


DECODER_LEVELS = ((2, 2), (1, 1))


def test_look_forward_twice_trains_the_previous_layers_box_head():
    """The last layer's box loss reaches the box head through the previous layer's
    un-detached refinement (look-forward-twice); switched off, only through the last layer.
    DINO's decoder (`DeformableDecoder` with its switches) alone, on tiny inputs."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    memory = jax.random.normal(keys[0], (1, 5, 8))
    queries = QueryState(content=jax.random.normal(keys[1], (1, 3, 8)),
                         reference=jax.random.uniform(keys[2], (1, 3, 4), minval=0.2, maxval=0.6))

    @jax.jit  # one program for everything compared
    def gradients_and_boxes(key):
        params = DecoderWithBoxHead(True).init(key, memory, queries)["params"]  # the same for both
        found = []
        for look_forward_twice in (True, False):
            model = DecoderWithBoxHead(look_forward_twice)
            grads = jax.grad(lambda p: model.apply({"params": p}, memory, queries)[-1].sum())(params)
            found.append((grads["bbox_embed"]["layers_2"]["kernel"], grads["decoder"]["layer0"]["ffn"],
                          model.apply({"params": params}, memory, queries)))
        return found

    (with_twice, layer0_twice, boxes_twice), (without, layer0_without, boxes) = gradients_and_boxes(
        jax.random.PRNGKey(1))
    # With look-forward-twice the last layer's boxes depend on layer 0's un-detached
    # refinement: the box head gets more gradient, layer 0 another one; without, layer 0
    # gets one only through the states.
    assert np.abs(np.asarray(with_twice) - np.asarray(without)).max() > 1e-6
    difference = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), layer0_twice, layer0_without)
    assert max(jax.tree_util.tree_leaves(difference)) > 1e-6
    # The switch changes gradients, not predictions.
    np.testing.assert_allclose(boxes_twice, boxes, rtol=1e-6)


def test_five_scales_read_res2():
    config = tiny_config(**{"model.transformer_args": {**TINY["model.transformer_args"], "num_feature_levels": 5}})
    model = build_model(config.model)
    images, mask, _ = batch([[True] * 3] * 2)
    # Shapes are what is checked: traced (jax.eval_shape), not compiled.
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, mask)
    assert variables["params"]["level_embed"].shape == (5, 32)
    assert variables["params"]["input_proj"]["conv0"]["kernel"].shape[-2] == 32  # res2: 8 x 4 channels
    out = jax.eval_shape(functools.partial(model.apply, intermediates=True), variables, images, mask)
    assert [f.shape[1] for f in out["projected"]] == [16, 8, 4, 2, 1]


@pytest.mark.parametrize("args, message", [
    ({"num_feature_levels": 3}, "4 or 5 scales"),
    ({"dn_number": -1}, "dn_number"),
    ({"dn_box_noise_scale": "big"}, "dn_box_noise_scale"),
    ({"with_box_refine": True}, "with_box_refine"),
])
def test_bad_settings_are_refused(args, message):
    with pytest.raises(Exception, match=message):
        build_model(tiny_config(**{"model.transformer_args": args}).model)


def test_config_trains_two_steps_through_the_command_line(tmp_path):
    """`detr-jax train --config configs/synthetic_dino_hybrid_tiny.py` (tiny overrides, its
    own hybrid switch kept) for 2 steps: every branch of the loss (main, enc, dn, one2many)
    finite. One run proves both configs: synthetic_dino_hybrid_tiny is synthetic_dino_tiny
    plus the switch."""
    from detr_jax.cli.main import main

    hybrid = load_config(HYBRID_CONFIG)
    assert hybrid.model.transformer_args["num_queries_one2many"] > 0 and hybrid.loss.one2many_coef > 0
    args = {**hybrid.model.transformer_args, "encoder_n_points": 1, "decoder_n_points": 1, "dn_number": 4}
    argv = ["train", "--config", str(HYBRID_CONFIG), "--workdir", str(tmp_path / "run"), "--no_progress",
            *cli_overrides(**{"data.synthetic_train_examples": 8, "data.synthetic_eval_examples": 4,
                              "train.num_steps": 2, "train.eval_every_epochs": 0, "model.transformer_args": args})]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss_bbox_dn" in line]
    assert train_lines, lines
    for key in ("loss", "loss_ce", "loss_ce_0", "loss_bbox", "loss_ce_enc", "loss_giou_enc", "loss_ce_dn",
                "loss_bbox_dn_0", "loss_ce_one2many", "loss_bbox_one2many", "loss_giou_one2many_0"):
        assert np.isfinite(train_lines[-1][key]), key


def test_the_official_recipe_config_loads():
    config = load_config(REPO / "configs" / "dino_r50_4scale_coco.py")
    assert config.model.arch == "dino" and config.model.num_queries == 900
    assert config.model.transformer_args["dn_number"] == 100
    assert (config.train.lr, config.train.epochs, config.train.lr_drop_epoch, config.train.batch_size) == (
        1e-4, 12, 11, 16)
    assert (config.loss.class_coef, config.loss.bbox_coef, config.loss.giou_coef) == (1.0, 5.0, 2.0)
