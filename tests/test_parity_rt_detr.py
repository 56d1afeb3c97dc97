"""RT-DETR's parts against Hugging Face transformers' RT-DETR: the ResNet-vd backbone and the
hybrid encoder (issue 31, items 1-2), and RepVGG fusion.

The references are built offline with random weights: a tiny `RTDetrModel` (ResNet-18-vd
shaped backbone, 16..128 channels, one basic block per stage; encoder width 32, 4 heads,
one AIFI layer, CSP hidden width 16 so that each CSP layer has its conv3) whose backbone and
encoder are run alone, and a stand-alone `RTDetrResNetBackbone` with ResNet-50-vd's depths
(3, 4, 6, 3) of bottlenecks, 32..256 channels, with HF's frozen BatchNorm put in its
BatchNorms' place as `RTDetrModel` does. Their state dicts are converted by name
(`map_state_dict`, layout huggingface_rt_detr) and must fill exactly the variables our
modules initialize. Random weights as test_parity_hf: unit-gain linears, He-normal convs,
LayerNorm and BatchNorm affine terms around 1 and 0, every BatchNorm's statistics taken
from the input it sees and perturbed, so that every layer matters and activations stay O(1).

Images are 72x88, an odd-sized stage (9x11) exercises the vd shortcut's ceil-mode average
pool; the encoder's levels are 16x12, 8x6, 4x3 (AIFI on a non-square map, which pins the
sin-cos encoding's layout: a swapped sin/cos or official RT-DETR's transposed non-square
assignment fails).

Tolerance: max |difference| <= 1e-4 in float32 (TOLERANCE of test_parity_hf) for outputs of
order 1: the two implementations sum convolutions and matrix products in different orders
(measured differences ~1e-6..1e-5 through 50 layers), while a real mistake (a wrong stride,
pool or padding, a swapped branch) gives 1e-2 or more. RepVGG fusion (a float64 fold): fused ==
unfused within 1e-5 in float64 (measured ~1e-14), and within 1e-4 in float32, where the
rounding of six CSP layers alone reaches 1e-5.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import traverse_util  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_parity_hf import TOLERANCE, hf_state_dict_numpy, randomize_  # noqa: E402
from transformers import RTDetrConfig, RTDetrModel, RTDetrResNetBackbone, RTDetrResNetConfig  # noqa: E402
from transformers.models.rt_detr.modeling_rt_detr import replace_batch_norm  # noqa: E402

from detr_jax.config import model_config  # noqa: E402
from detr_jax.convert import map_state_dict  # noqa: E402
from detr_jax.convert.resnet import infer_backbone  # noqa: E402
from detr_jax.convert.huggingface_rt_detr import LAYOUT  # noqa: E402
from detr_jax.models import BACKBONES, hybrid_encoder  # noqa: E402
from detr_jax.models.hybrid_encoder import build_hybrid_encoder, fuse_repvgg  # noqa: E402
from detr_jax.models.resnet import RESNETS, ResNet, ResNetSpec  # noqa: E402

FUSION_TOLERANCE = 1e-5
IMAGE = (72, 88)
LEVELS = ((16, 12), (8, 6), (4, 3))
TINY_BACKBONE = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic")
TINY_RT_DETR = dict(
    encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, encoder_ffn_dim=64, encoder_attention_heads=4,
    hidden_expansion=0.5, d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64, decoder_layers=1,
    decoder_attention_heads=4, num_queries=10, num_labels=5,
)
R50VD_DEPTHS = dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[3, 4, 6, 3], layer_type="bottleneck",
                    out_features=["stage1", "stage2", "stage3", "stage4"])
STAGES = ("res2", "res3", "res4", "res5")


def randomize_rt_detr_(model: torch.nn.Module, run, seed: int = 0) -> None:
    """test_parity_hf's `randomize_` for a HF RT-DETR part: every BatchNorm (nn.BatchNorm2d
    and HF's frozen one) calibrated on the input it sees in `run()`; the residual branches
    end in the last BN of each basic or bottleneck layer."""
    residual_ends = {id(m.layer[-1].normalization) for m in model.modules()
                     if type(m).__name__ in ("RTDetrResNetBasicLayer", "RTDetrResNetBottleNeckLayer")}
    norms = [m for m in model.modules() if type(m).__name__.endswith("BatchNorm2d")]
    randomize_(model, run, norms, residual_ends, seed)


def converted(state_dict: dict[str, np.ndarray], prefix: tuple[str, ...]) -> tuple[dict, list[str]]:
    """(Our variables of the part under `prefix`, the keys no rule covers)."""
    mapped = map_state_dict(state_dict, LAYOUT)
    tree = {(path[0],) + path[1 + len(prefix):]: value for path, value in mapped.leaves.items()
            if path[1:1 + len(prefix)] == prefix}
    return traverse_util.unflatten_dict(tree), mapped.unmapped


def assert_same_variables(ours: dict, init: dict) -> None:
    """Converted variables fill exactly the variables (paths and shapes) the module initializes."""
    shapes = {k: np.shape(v) for k, v in traverse_util.flatten_dict(ours).items()}
    expected = {k: np.shape(v) for k, v in traverse_util.flatten_dict(init).items()}
    assert shapes == expected, (set(shapes) ^ set(expected), {k for k in shapes if shapes[k] != expected.get(k)})


def max_diff(name: str, ours, reference) -> float:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, (name, ours.shape, reference.shape)
    diff = float(np.abs(ours - reference).max())
    print(f"{name}: max |diff| {diff:.2e} (values std {reference.std():.2f})")
    return diff


def images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, *IMAGE, 3)).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def tiny_rt_detr() -> RTDetrModel:
    """The tiny HF RT-DETR (module docstring), randomized, eval mode."""
    config = RTDetrConfig(backbone_config=RTDetrResNetConfig(out_indices=[2, 3, 4], **TINY_BACKBONE),
                          **TINY_RT_DETR)
    model = RTDetrModel(config).eval()
    pixel_values = nchw(images())
    features = encoder_features()

    def run():
        model.backbone.model(pixel_values)
        model.encoder(inputs_embeds=[proj(torch.from_numpy(f)) for proj, f in zip(model.encoder_input_proj,
                                                                                    features)])
    randomize_rt_detr_(model, run)
    return model


def encoder_features(seed: int = 1) -> list[np.ndarray]:
    """The encoder's input levels, NCHW: the tiny backbone's res3..res5 channels at LEVELS."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, c, h, w)).astype(np.float32)
            for c, (h, w) in zip(TINY_RT_DETR["encoder_in_channels"], LEVELS)]


def hf_stages(backbone, pixel_values) -> list[np.ndarray]:
    with torch.no_grad():
        hidden = backbone(pixel_values, output_hidden_states=True).hidden_states
    return [nhwc(h) for h in hidden[1:]]  # stage1..stage4 (hidden[0] is the stem)


def check_backbone(name: str, spec: ResNetSpec, backbone, state_dict: dict[str, np.ndarray]) -> None:
    variables, unmapped = converted(state_dict, ("backbone", "body"))
    assert not [k for k in unmapped if k.startswith(("model.backbone.", "backbone."))], unmapped
    ours = ResNet(spec)
    x = images()
    assert_same_variables(variables, ours.init(jax.random.PRNGKey(0), x[:1]))
    out = jax.jit(ours.apply)(variables, x)
    reference = hf_stages(backbone, nchw(x))
    for stage, ref in zip(STAGES, reference):
        assert max_diff(f"{name} {stage}", out[stage], ref) <= TOLERANCE, stage
    assert 0.1 < reference[-1].std() < 10


def test_resnet18_vd_shaped_backbone_matches_hf():
    model = tiny_rt_detr()
    spec = ResNetSpec(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16, expansion=1, block="basic",
                      deep_stem=True, avg_down=True)
    check_backbone("resnet18-vd-like", spec, model.backbone.model, hf_state_dict_numpy(model))


def test_resnet50_vd_depths_backbone_matches_hf():
    backbone = RTDetrResNetBackbone(RTDetrResNetConfig(**R50VD_DEPTHS)).eval()
    replace_batch_norm(backbone)  # RT-DETR's frozen BatchNorm, as RTDetrModel does
    pixel_values = nchw(images())
    randomize_rt_detr_(backbone, lambda: backbone(pixel_values))
    state_dict = {f"model.backbone.model.{k}": v for k, v in hf_state_dict_numpy(backbone).items()}
    spec = ResNetSpec(depths=(3, 4, 6, 3), widths=(8, 16, 32, 64), stem_width=16, deep_stem=True, avg_down=True)
    check_backbone("resnet50-vd depths", spec, backbone, state_dict)


def test_vd_backbones_are_registered_and_inferred():
    # The registered ResNet-vd names, initialized; conversion infers them from the tensors.
    for name in ("resnet18_vd", "resnet50_vd"):
        spec = RESNETS[name]
        variables = jax.eval_shape(ResNet(spec).init, jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
        leaves = {("params", "backbone", "body") + k: np.zeros(v.shape)
                  for k, v in traverse_util.flatten_dict(variables["params"]).items()}
        assert infer_backbone(leaves)[0] == name, infer_backbone(leaves)
    plain = jax.eval_shape(ResNet(RESNETS["resnet_tiny"]).init, jax.random.PRNGKey(0),
                           np.zeros((1, 64, 64, 3), np.float32))
    leaves = {("params", "backbone", "body") + k: np.zeros(v.shape)
              for k, v in traverse_util.flatten_dict(plain["params"]).items()}
    assert infer_backbone(leaves)[0] == "resnet_tiny"
    # A BACKBONES entry, built from the model config like any ResNet.
    backbone = BACKBONES["resnet_vd_tiny"](model_config(), jnp.float32)
    x, mask = np.zeros((1, 64, 96, 3), np.float32), np.ones((1, 64, 96), bool)
    out = backbone.apply(backbone.init(jax.random.PRNGKey(0), x, mask), x, mask)
    assert out.features.shape == (1, 2, 3, 64) and out.mask.shape == (1, 2, 3)
    assert [out.stages[s].shape[-1] for s in STAGES] == [8, 16, 32, 64]


@functools.lru_cache(maxsize=None)
def encoder_comparison():
    """(our encoder, our variables, our inputs NHWC, HF's outputs NHWC)."""
    model = tiny_rt_detr()
    features = encoder_features()
    with torch.no_grad():
        projected = [proj(torch.from_numpy(f)) for proj, f in zip(model.encoder_input_proj, features)]
        reference = [nhwc(level) for level in model.encoder(inputs_embeds=projected).last_hidden_state]
    config = model.config
    encoder = build_hybrid_encoder(
        config.encoder_hidden_dim, config.encoder_attention_heads, config.encoder_ffn_dim, config.encoder_layers,
        encode_levels=config.encode_proj_layers, temperature=config.positional_encoding_temperature,
        expansion=config.hidden_expansion, activation=config.activation_function,
        encoder_activation=config.encoder_activation_function)
    variables, unmapped = converted(hf_state_dict_numpy(model), ("encoder",))
    assert not [k for k in unmapped if k.startswith(("encoder.", "encoder_input_proj."))], unmapped
    inputs = [np.ascontiguousarray(f.transpose(0, 2, 3, 1)) for f in features]
    assert_same_variables(variables, encoder.init(jax.random.PRNGKey(0), inputs))
    return encoder, variables, inputs, reference


def run_encoder(encoder, variables, inputs):
    return [np.asarray(level) for level in jax.jit(encoder.apply)(variables, inputs)]


def test_hybrid_encoder_matches_hf_on_every_level():
    encoder, variables, inputs, reference = encoder_comparison()
    ours = run_encoder(encoder, variables, inputs)
    assert [r.shape[1:3] for r in reference] == list(LEVELS)
    for level, (o, r) in enumerate(zip(ours, reference)):
        assert max_diff(f"hybrid encoder level {level}", o, r) <= TOLERANCE, level
        assert 0.1 < r.std() < 10


def encode(first: np.ndarray, second: np.ndarray, dim: int, temperature: float, swap: bool = False) -> np.ndarray:
    """[sin | cos of `first` | sin | cos of `second`] (cos before sin with `swap`), [N, dim]."""
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4))
    parts = []
    for coordinate in (first, second):
        angles = np.outer(coordinate, omega)
        parts += [np.cos(angles), np.sin(angles)] if swap else [np.sin(angles), np.cos(angles)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def test_sincos_2d_is_hf_build_2d_sinusoidal_position_embedding():
    from transformers.models.rt_detr.modeling_rt_detr import build_2d_sinusoidal_position_embedding
    ours = hybrid_encoder.sincos_2d(4, 3, 32, 10000.0)
    np.testing.assert_array_equal(ours, build_2d_sinusoidal_position_embedding(4, 3, 32, 10000.0).numpy())
    k = np.arange(12.0)
    np.testing.assert_allclose(ours, encode(k // 3, k % 3, 32, 10000.0), atol=1e-6)


@pytest.mark.parametrize("mistake", ["sin_cos_swapped", "official_non_square_order"])
def test_a_wrong_position_encoding_fails_the_encoder_parity(monkeypatch, mistake):
    encoder, variables, inputs, reference = encoder_comparison()

    def wrong(height, width, dim, temperature=10000.0):
        k = np.arange(height * width, dtype=np.float64)
        if mistake == "sin_cos_swapped":
            return encode(k // width, k % width, dim, temperature, swap=True)
        # lyuwenyu/RT-DETR's meshgrid(arange(w), arange(h), "ij"): position k -> (k // h, k % h)
        return encode(k // height, k % height, dim, temperature)

    monkeypatch.setattr(hybrid_encoder, "sincos_2d", wrong)
    ours = run_encoder(encoder.clone(), variables, inputs)
    assert max_diff(f"encoder with {mistake}", ours[-1], reference[-1]) > 100 * TOLERANCE


def test_repvgg_fusion_equals_the_unfused_encoder():
    encoder, variables, inputs, _ = encoder_comparison()
    fused_variables = fuse_repvgg(variables)
    fused = encoder.clone(fused_repvgg=True)
    assert_same_variables(fused_variables, fused.init(jax.random.PRNGKey(0), inputs))
    blocks = fused_variables["params"]["fpn_block0"]
    assert set(blocks["bottleneck0"]) == {"conv"} and "bottleneck0" not in fused_variables["batch_stats"]["fpn_block0"]
    # float32: the same as the unfused encoder up to float32 summation order, as HF's.
    unfused_out = run_encoder(encoder, variables, inputs)
    for level, (f, u) in enumerate(zip(run_encoder(fused, fused_variables, inputs), unfused_out)):
        assert max_diff(f"fused RepVGG float32 level {level}", f, u) <= TOLERANCE, level
    # float64: the fold itself is exact (float32 rounding through six CSP layers alone
    # reaches 1e-5 on these O(1) maps).
    with jax.enable_x64(True):
        as64 = functools.partial(jax.tree_util.tree_map, lambda x: np.asarray(x, np.float64))
        norm = functools.partial(hybrid_encoder.batch_norm, dtype=jnp.float64)
        encoder64 = encoder.clone(dtype=jnp.float64, norm=norm)
        unfused_out = run_encoder(encoder64, as64(variables), as64(inputs))
        fused_out = run_encoder(encoder64.clone(fused_repvgg=True), fuse_repvgg(as64(variables)), as64(inputs))
        for level, (f, u) in enumerate(zip(fused_out, unfused_out)):
            assert f.dtype == np.float64
            assert max_diff(f"fused RepVGG float64 level {level}", f, u) <= FUSION_TOLERANCE, level
