"""The ViT backbone (detr_jax.models.vit): shapes, padding invariance, position-embedding
resampling against torch, windows, stochastic depth, bfloat16, config errors, layer-wise
lr decay, and a training step on two devices."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_config
from detr_jax.config import ConfigError, base_config
from detr_jax.models import BACKBONES, build_model, init_variables
from detr_jax.models.vit import (VITS, bicubic_resize_matrix, default_global_blocks, layer_decay_rules, resample_grid,
                                 sincos_grid_init)
from detr_jax.train.optim import lr_multipliers

# A ViT small enough for CPU tests: 2 blocks of width 32 on a 4x4 pretraining grid.
SMALL = {"width": 32, "depth": 2, "num_heads": 2, "pos_grid": (4, 4)}


def vit_model_config(**args):
    config = base_config()
    config.model.backbone = "vit_ti16"
    config.model.backbone_args = {**SMALL, **args}
    return config.model


def small_vit(**args):
    return BACKBONES["vit_ti16"](vit_model_config(**args), jnp.float32)


def backbone_params(vit, size=(64, 64), seed=0):
    images, mask = jnp.zeros((1, *size, 3)), jnp.ones((1, *size), bool)
    return vit.init(jax.random.key(seed), images, mask)


def test_every_variant_gives_a_stride_p_map_on_a_non_square_input():
    """Shapes only (jax.eval_shape: nothing is computed), at 80 x 112: not a multiple of 32."""
    images, mask = jnp.zeros((2, 80, 112, 3)), jnp.ones((2, 80, 112), bool)
    for name, spec in VITS.items():
        vit = BACKBONES[name](vit_model_config(**dataclasses.asdict(spec)), jnp.float32)
        variables = jax.eval_shape(lambda: vit.init(jax.random.key(0), images, mask))
        out = jax.eval_shape(lambda v: vit.apply(v, images, mask), variables)
        h, w = -(-80 // spec.patch_size), -(-112 // spec.patch_size)
        assert out.features.shape == (2, h, w, spec.width), name
        assert out.mask.shape == (2, h, w) and out.mask.dtype == bool, name
        assert sorted(out.stages) == sorted(f"block{i}" for i in range(spec.depth)), name
        assert variables["params"]["pos_embed"].shape == (4, 4, spec.width), name
    assert {"vit_ti16", "vit_s16", "vit_b16"} <= set(VITS)


def test_detr_with_a_vit_backbone_runs_end_to_end():
    config = tiny_config(**{"model.backbone": "vit_ti16", "model.backbone_args": SMALL})
    model = build_model(config.model)
    variables = init_variables(model, jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (2, 48, 80, 3))
    out = model.apply(variables, images, jnp.ones((2, 48, 80), bool), intermediates=True)
    assert out["pred_boxes"].shape == (2, 2, 6, 4)  # [L, B, Q, 4]
    assert out["memory"].shape == (2, 3, 5, 32)
    assert sorted(out["backbone_stages"]) == ["block0", "block1"]
    assert variables["frozen_bn"] == {} and "pos_embed" in variables["params"]["backbone"]


@pytest.mark.parametrize("args", [{}, {"window_size": 2, "global_blocks": (1,)}, {"num_prefix_tokens": 1}],
                         ids=["global", "windowed", "class_token"])
def test_outputs_do_not_depend_on_padding(args):
    """One 40 x 56 image alone, and padded to 96 x 128 beside a larger image: the same
    features at its patches. Tolerance 1e-5: XLA sums attention over a different number of
    (zero-weight) keys, which reorders float32 sums; a leak of padding would be ~1e-1."""
    vit = small_vit(**args)
    variables = backbone_params(vit)
    image = jax.random.normal(jax.random.key(1), (40, 56, 3))
    alone = vit.apply(variables, image[None], jnp.ones((1, 40, 56), bool))

    canvas = jnp.zeros((2, 96, 128, 3)).at[0, :40, :56].set(image)
    canvas = canvas.at[1].set(jax.random.normal(jax.random.key(2), (96, 128, 3)))
    mask = jnp.zeros((2, 96, 128), bool).at[0, :40, :56].set(True).at[1].set(True)
    batched = vit.apply(variables, canvas, mask)

    assert alone.features.shape == (1, 3, 4, 32)  # ceil(40 / 16), ceil(56 / 16)
    np.testing.assert_array_equal(batched.mask[0], jnp.zeros((6, 8), bool).at[:3, :4].set(True))
    np.testing.assert_allclose(batched.features[0, :3, :4], alone.features[0], atol=1e-5, rtol=1e-5)
    # and the padding is really there to leak: the other image's content changes padded outputs
    assert float(jnp.abs(batched.features[0, 3:]).max()) > 0.1


def test_position_embeddings_are_the_identity_at_the_native_grid():
    grid = jax.random.normal(jax.random.key(0), (4, 6, 8))
    out = resample_grid(grid, jnp.array([4, 2]), jnp.array([6, 3]), 5, 7)
    np.testing.assert_array_equal(out[0, :4, :6], grid)  # exact: the weights are 0 and 1
    assert out.shape == (2, 5, 7, 8)


@pytest.mark.parametrize("in_size,out_size", [(4, 7), (7, 3), (14, 50), (5, 5)])
def test_bicubic_matches_torch(in_size, out_size):
    """Our resampling matrix against torch's F.interpolate(mode="bicubic", align_corners=False):
    1e-6, float32 rounding of the same formula."""
    torch = pytest.importorskip("torch")
    signal = np.random.default_rng(0).normal(size=(in_size,)).astype(np.float32)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(np.tile(signal, (2, 1)))[None, None], size=(2, out_size), mode="bicubic",
        align_corners=False)[0, 0, 0].numpy()
    matrix = bicubic_resize_matrix(jnp.array([out_size]), in_size, out_size + 2)[0]
    np.testing.assert_allclose(np.asarray(matrix[:out_size] @ signal), reference, atol=1e-6)


def test_sincos_position_table():
    table = sincos_grid_init(None, (3, 5, 8))
    np.testing.assert_allclose(table[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)  # sin 0, cos 0 of y, then x
    np.testing.assert_allclose(table[2, 4, [0, 4]], [np.sin(2.0), np.sin(4.0)], rtol=1e-6)  # frequency 1
    variables = backbone_params(small_vit(pos_embed_init="sincos"))
    np.testing.assert_array_equal(variables["params"]["pos_embed"], sincos_grid_init(None, (4, 4, 32)))


def test_windows_and_default_global_blocks():
    assert default_global_blocks(12) == (2, 5, 8, 11) and default_global_blocks(2) == (0, 1)
    vit = small_vit(window_size=2, global_blocks=())
    variables = backbone_params(vit)
    images = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    windowed = vit.apply(variables, images, jnp.ones((1, 64, 64), bool)).features
    # Windowed attention only: the top-left 2x2 patches never see the rest of the image.
    changed = images.at[:, 32:, 32:].set(0.0)
    other = vit.apply(variables, changed, jnp.ones((1, 64, 64), bool)).features
    np.testing.assert_allclose(windowed[0, :2, :2], other[0, :2, :2], atol=1e-6)
    assert float(jnp.abs(windowed[0, 2:, 2:] - other[0, 2:, 2:]).max()) > 1e-2


def test_stochastic_depth_and_bfloat16():
    vit = small_vit(drop_path_rate=0.5)
    variables = backbone_params(vit)
    images, mask = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)), jnp.ones((4, 32, 32), bool)
    test_a = vit.apply(variables, images, mask).features
    test_b = vit.apply(variables, images, mask).features
    train_a = vit.apply(variables, images, mask, train=True, rngs={"dropout": jax.random.key(0)}).features
    train_b = vit.apply(variables, images, mask, train=True, rngs={"dropout": jax.random.key(1)}).features
    np.testing.assert_array_equal(test_a, test_b)
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3
    half = BACKBONES["vit_ti16"](vit_model_config(), jnp.bfloat16)
    out = half.apply(backbone_params(half), images, mask).features
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


@pytest.mark.parametrize("args,message", [
    ({"depht": 2}, "unknown ViT field(s) ['depht']"),
    ({"window_size": 2, "num_prefix_tokens": 1}, "windowed attention needs num_prefix_tokens=0"),
    ({"width": 30, "num_heads": 4}, "not divisible by num_heads"),
    ({"global_blocks": (7,)}, "global_blocks=(7,) must be block indices in [0, 2)"),
    ({"pos_embed_init": "zeros"}, "pos_embed_init='zeros' must be 'normal' or 'sincos'"),
])
def test_bad_backbone_args_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=r"model\.backbone_args for 'vit_ti16'") as error:
        tiny_config(**{"model.backbone": "vit_ti16", "model.backbone_args": {**SMALL, **args}})
    assert message in str(error.value)


def test_a_resnet_takes_no_backbone_args():
    with pytest.raises(ConfigError, match="a ResNet takes no backbone_args"):
        tiny_config(**{"model.backbone_args": {"window_size": 2}})


def test_layer_decay_rules_scale_each_block():
    config = tiny_config(**{"model.backbone": "vit_ti16", "model.backbone_args": SMALL})
    params = init_variables(build_model(config.model), jax.random.key(0))["params"]
    rules = layer_decay_rules(depth=2, decay=0.5, scale=0.1)
    multipliers = lr_multipliers(params, rules)
    backbone = multipliers["backbone"]
    assert backbone["patch_embed"]["kernel"] == backbone["pos_embed"] == pytest.approx(0.1 * 0.5**3)
    assert backbone["blocks_0"]["attn"]["q_proj"]["kernel"] == pytest.approx(0.1 * 0.5**2)
    assert backbone["blocks_1"]["mlp"]["fc2"]["bias"] == pytest.approx(0.1 * 0.5)
    assert backbone["norm"]["scale"] == pytest.approx(0.1)
    assert multipliers["class_embed"]["kernel"] == 1.0  # not the backbone: the main lr
    tiny_config(**{"train.param_rules": rules})  # valid as a config value


TWO_DEVICE_STEP = """
import json, sys
import jax, numpy as np
from jax.sharding import Mesh
sys.path.insert(0, "tests")
from conftest import tiny_config
from test_train import fixed_batch
from test_vit import SMALL
from detr_jax.runtime.sharding import global_batch
from detr_jax.train.trainer import assemble
assert jax.device_count() == 2, jax.devices()
config = tiny_config(**{"model.backbone": "vit_ti16", "train.param_rules": (),
                        "model.backbone_args": {**SMALL, "window_size": 2, "drop_path_rate": 0.2}})
batch = fixed_batch(batch_size=4)
result = {}
for n in (1, 2):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    run = assemble(config, mesh, 100)
    state = run.initial_state(config)
    losses = []
    for _ in range(2):
        state, metrics = run.step(state, global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    result[n] = {"losses": losses, "params": jax.tree.map(np.asarray, state.params)}
diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(result[1]["params"]),
                                                     jax.tree.leaves(result[2]["params"])))
print("RESULT", json.dumps({"losses": [result[1]["losses"], result[2]["losses"]], "diff": diff}))
"""


def test_two_device_training_step_equals_one_device():
    """Two steps of a windowed ViT DETR with stochastic depth, on 1 and on 2 forced CPU
    devices, from the same state and batch: the same parameters. Tolerance 2e-6, as the
    ResNet version in test_train: the sharded program reorders float32 sums; a step that
    went wrong (dropped paths differing by device, a missing all-reduce) moves parameters
    by ~1e-4, a whole Adam step."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_STEP], capture_output=True, text=True,
                            timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    assert all(np.isfinite(out["losses"][0])) and out["losses"][0][1] != out["losses"][0][0]
    assert out["diff"] < 2e-6, out


def test_synthetic_vit_tiny_command_smoke(tmp_path):
    """The benchmarked ViT learning run (docs/BENCHMARKS.md), `detr-jax train --config
    synthetic_vit_tiny`, for 2 steps on a few images: it trains, evaluates and checkpoints."""
    workdir = tmp_path / "run"
    args = ["-m", "detr_jax.cli", "train", "--config", "synthetic_vit_tiny", "--workdir", str(workdir),
            "--no_progress", "--config.train.num_steps=2", "--config.train.log_every_steps=1",
            "--config.data.synthetic_train_examples=64", "--config.data.synthetic_eval_examples=4",
            "--config.eval.batch_size=2", "--config.eval.num_visualized=1"]
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["time"] > 0 for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval_AP50" in r] == [2]
    saved = json.loads((workdir / "config.json").read_text())["model"]
    assert saved["backbone"] == "vit_ti16" and saved["backbone_args"]["pos_embed_init"] == "sincos"
    assert (workdir / "checkpoints" / "2").is_dir()
