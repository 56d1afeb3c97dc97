"""RT-DETR against Hugging Face transformers' RT-DETR and RT-DETRv2: the ResNet-vd backbone
and the hybrid encoder (issue 31, items 1-2), RepVGG fusion, and the detector with its
conversion and loss (items 3, 5).

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

The detector: tiny random-weight `RTDetrForObjectDetection` (4 decoder levels: the extra
stride-2 one exercised; 2 sampling points) and `RTDetrV2ForObjectDetection` (3 levels, 3
points, offset scale 1.0), both with a resnet_vd_tiny-shaped backbone, width 32, 4 heads, 1
AIFI and 2 decoder layers, 10 queries, 5 classes, num_denoising 6, converted with
`convert.convert_state_dict` (layout and model inferred, checked against our config) and
run on two unpadded 64x96 images (HF's RT-DETR reads no pixel mask; sides divisible by 32,
which its CCFM needs). Compared: logits and boxes of every decoder layer, the `enc` branch
(the selected proposals) and the top-k positions; in training mode (BatchNorms on their
running statistics on both sides) with HF's denoising fed our draws, the `dn` branch and
every term of transformers' `RTDetrLoss` (main, aux layers, enc, dn layers) against our
SetCriterion with the varifocal convention. RT-DETRv2's discrete sampling and per-level
points are compared at the attention level (tests/test_deformable_attention.py).

Tolerance: max |difference| <= 1e-4 in float32 (TOLERANCE of test_parity_hf) for outputs of
order 1: the two implementations sum convolutions and matrix products in different orders
(measured differences ~1e-6..1e-5 through 50 layers), while a real mistake (a wrong stride,
pool or padding, a swapped branch) gives 1e-2 or more. RepVGG fusion (a float64 fold): fused ==
unfused within 1e-5 in float64 (measured ~1e-14), and within 1e-4 in float32, where the
rounding of six CSP layers alone reaches 1e-5. The detector as the parts (1e-4, the same
float32 reordering through ~60 layers), its loss terms 1e-5 relative (the same sums of the
same matched pairs).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import traverse_util  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_denoising import feed_draws  # noqa: E402
from test_parity_hf import TOLERANCE, hf_state_dict_numpy, randomize_  # noqa: E402
from transformers import (RTDetrConfig, RTDetrForObjectDetection, RTDetrModel, RTDetrResNetBackbone,  # noqa: E402
                          RTDetrResNetConfig, RTDetrV2Config, RTDetrV2ForObjectDetection)
from transformers.models.rt_detr.modeling_rt_detr import replace_batch_norm  # noqa: E402

from detr_jax import convert  # noqa: E402
from detr_jax.config import model_config  # noqa: E402
from detr_jax.config.loading import config_from_dict  # noqa: E402
from detr_jax.convert import map_state_dict  # noqa: E402
from detr_jax.convert.resnet import infer_backbone  # noqa: E402
from detr_jax.convert.huggingface_rt_detr import LAYOUT  # noqa: E402
from detr_jax.criterion.losses import SetCriterion  # noqa: E402
from detr_jax.models import BACKBONES, build_class_convention, build_model, hybrid_encoder, queries  # noqa: E402
from detr_jax.models.denoising import DenoisingNoise  # noqa: E402
from detr_jax.models.batch_norm import batch_norm  # noqa: E402
from detr_jax.models.hybrid_encoder import build_hybrid_encoder, fuse_repvgg  # noqa: E402
from detr_jax.models.resnet import RESNETS, ResNet, ResNetSpec  # noqa: E402

FUSION_TOLERANCE = 1e-5
LOSS_RTOL = 1e-5
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
        norm = functools.partial(batch_norm, dtype=jnp.float64)
        encoder64 = encoder.clone(dtype=jnp.float64, norm=norm)
        unfused_out = run_encoder(encoder64, as64(variables), as64(inputs))
        fused_out = run_encoder(encoder64.clone(fused_repvgg=True), fuse_repvgg(as64(variables)), as64(inputs))
        for level, (f, u) in enumerate(zip(fused_out, unfused_out)):
            assert f.dtype == np.float64
            assert max_diff(f"fused RepVGG float64 level {level}", f, u) <= FUSION_TOLERANCE, level


# ---------------------------------------------------------------------------------------
# The detector (issue 31, item 3): RTDetrForObjectDetection and RTDetrV2ForObjectDetection.

DETECTOR_IMAGE = (64, 96)  # levels 8x12, 4x6, 2x3 (+ 1x2): HF's CCFM needs sides divisible by 32
# resnet_vd_tiny's shape in HF's names (stem 4, 4, 8 channels; stages 8..64, one basic block each).
TINY_VD_BACKBONE = dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")
TINY_DETECTOR = dict(
    encoder_in_channels=[16, 32, 64], encoder_hidden_dim=32, encoder_ffn_dim=64, encoder_attention_heads=4,
    hidden_expansion=0.5, d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=64, decoder_layers=2,
    decoder_attention_heads=4, num_queries=10, num_labels=5, num_denoising=6,
)
MAX_BOXES = 3  # = the batch's largest target count: HF's denoising groups are ours (models.denoising)
# variant -> (HF config class, HF model class, HF settings, our transformer_args besides the tiny ones)
DETECTOR_VARIANTS = {
    "v1": (RTDetrConfig, RTDetrForObjectDetection, dict(num_feature_levels=4, decoder_n_points=2),
           dict(num_feature_levels=4, decoder_n_points=2)),
    "v2": (RTDetrV2Config, RTDetrV2ForObjectDetection, dict(decoder_n_points=3, decoder_offset_scale=1.0),
           dict(decoder_n_points=3, decoder_offset_scale=1.0)),
}


def detector_images(seed: int = 3) -> np.ndarray:
    """Two unpadded images in [0, 1] (HF's RT-DETR has no pixel mask: it reads none)."""
    return np.random.default_rng(seed).uniform(size=(2, *DETECTOR_IMAGE, 3)).astype(np.float32)


def detector_targets() -> dict[str, np.ndarray]:
    """3 and 2 objects in MAX_BOXES = 3 slots."""
    boxes = np.array([[[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.4, 0.5], [0.5, 0.7, 0.1, 0.1]],
                      [[0.4, 0.3, 0.5, 0.4], [0.7, 0.7, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]]], np.float32)
    return {"labels": np.array([[1, 4, 2], [0, 3, 0]], np.int32), "boxes": boxes,
            "valid": np.array([[True, True, True], [True, True, False]])}


def hf_labels(targets) -> list[dict]:
    return [{"class_labels": torch.from_numpy(targets["labels"][b][targets["valid"][b]]).long(),
             "boxes": torch.from_numpy(targets["boxes"][b][targets["valid"][b]])} for b in range(2)]


@functools.lru_cache(maxsize=None)
def hf_detector(variant: str):
    """The tiny HF detector of `variant`, randomized (randomize_rt_detr_ on one forward pass),
    eval mode."""
    config_class, model_class, settings, _ = DETECTOR_VARIANTS[variant]
    config = config_class(backbone_config=RTDetrResNetConfig(out_indices=[2, 3, 4], **TINY_VD_BACKBONE),
                          **TINY_DETECTOR, **settings)
    model = model_class(config).eval()
    pixel_values = nchw(detector_images())
    randomize_rt_detr_(model, lambda: model(pixel_values))
    return model


def our_detector_config(variant: str):
    """Our config of the tiny detector: the HF settings in our fields."""
    args = dict(expansion=0.5, num_denoising=TINY_DETECTOR["num_denoising"], **DETECTOR_VARIANTS[variant][3])
    model = dict(arch="rt_detr", backbone="resnet_vd_tiny", hidden_dim=32, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=2, dim_feedforward=64, dropout=0.0, num_queries=10, num_classes=5,
                 transformer_args=args)
    return config_from_dict({"model": model, "data": {"max_boxes": MAX_BOXES}})


@torch.no_grad()
def hf_detector_outputs(model, targets=None, noise=None) -> dict[str, np.ndarray]:
    """HF's per-layer predictions [L, B, Qdn + Q, ...] (logits, boxes: its refined references),
    the selected proposals (enc_logits, enc_boxes [B, Q, ...]) and their positions
    (indices [B, Q], its top-k of the proposals' largest logit). With targets: training
    mode (its BatchNorms normalize with the batch's statistics, as ours in training), its
    denoising fed our `noise` draws, and its loss terms (loss, weighted as its loss_dict)."""
    labels = None
    with pytest.MonkeyPatch.context() as monkeypatch:
        if targets is not None:
            model = copy.deepcopy(model).train()  # its BatchNorms' statistics move: not the cached model's
            asked = feed_draws(monkeypatch, noise, model.config.num_labels)
            labels = hf_labels(targets)
        try:
            out = model(nchw(detector_images()), labels=labels)
        finally:
            model.eval()
    if targets is not None:
        assert asked == ["label_uniform", "new_labels", "box_sign", "box_part"], asked
    num_queries = model.config.num_queries
    result = {"logits": out.intermediate_logits.transpose(0, 1).numpy(),
              "boxes": out.intermediate_reference_points.transpose(0, 1).numpy(),
              "enc_logits": out.enc_topk_logits.numpy(), "enc_boxes": out.enc_topk_bboxes.numpy(),
              "enc_scores": out.enc_outputs_class.max(-1).values.numpy(),
              "indices": torch.topk(out.enc_outputs_class.max(-1).values, num_queries, dim=1)[1].numpy()}
    if out.loss_dict is not None:
        result["loss"] = {k: float(v) for k, v in out.loss_dict.items()}
    return result


@functools.lru_cache(maxsize=None)
def jitted_detector(model_json: str, train: bool):
    model = build_model(ml_collections.ConfigDict(json.loads(model_json)))
    # Training mode: the BatchNorms' updated statistics come back too (not compared here:
    # tests/test_batch_norm.py compares them with PyTorch's).
    return jax.jit(functools.partial(model.apply, intermediates=True, train=train,
                                     mutable=["batch_stats"] if train else False))


def run_detector(config, variables, targets=None, noise=None) -> dict:
    apply = jitted_detector(config.model.to_json(sort_keys=True), targets is not None)
    images = jnp.asarray(detector_images())
    mask = jnp.ones(images.shape[:3], bool)
    if targets is None:
        return apply(variables, images, mask)
    outputs, _ = apply(variables, images, mask, targets={k: jnp.asarray(v) for k, v in targets.items()},
                       denoising_noise=noise, rngs={"dropout": jax.random.PRNGKey(0)})
    return outputs


@functools.lru_cache(maxsize=None)
def detector_comparison(variant: str):
    """(HF model, our config, our converted variables, conversion metadata, our outputs, HF's),
    eval mode."""
    model = hf_detector(variant)
    config = our_detector_config(variant)
    variables, metadata = convert.convert_state_dict(hf_state_dict_numpy(model), config.model)
    return model, config, variables, metadata, run_detector(config, variables), hf_detector_outputs(model)


def assert_per_layer(name: str, ours, reference) -> None:
    ours = np.asarray(ours)
    assert ours.shape == reference.shape, (name, ours.shape, reference.shape)
    diffs = [float(np.abs(o - r).max()) for o, r in zip(ours, reference)]
    print(f"{name} max |diff| per layer: " + ", ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) <= TOLERANCE, (name, diffs)


def assert_same_top_k(name: str, ours, reference, scores) -> None:
    """The same positions, best first; where they differ the scores must tie."""
    same = ours == reference
    tied = np.take_along_axis(scores, ours, 1) == np.take_along_axis(scores, reference, 1)
    print(f"{name} top-k: {int(same.sum())} of {same.size} positions equal, the rest tied")
    assert (same | tied).all(), (ours, reference)


@pytest.mark.parametrize("variant", list(DETECTOR_VARIANTS))
def test_every_decoder_layer_the_top_k_and_the_enc_branch_match_hf(variant):
    model, _, _, metadata, out, reference = detector_comparison(variant)
    assert metadata["layout"] == f"huggingface_rt_detr{'_v2' if variant == 'v2' else ''}"
    assert reference["logits"].shape == (2, 2, 10, 5)
    assert_per_layer(f"{variant} logits", out["pred_logits"], reference["logits"])
    assert_per_layer(f"{variant} boxes", out["pred_boxes"], reference["boxes"])
    assert_per_layer(f"{variant} enc logits", out["enc"]["pred_logits"], reference["enc_logits"][None])
    assert_per_layer(f"{variant} enc boxes", out["enc"]["pred_boxes"], reference["enc_boxes"][None])
    assert_same_top_k(variant, np.asarray(out["proposal_indices"]), reference["indices"], reference["enc_scores"])
    # Not vacuous: the layers differ, the logits are O(1), the boxes spread and are refined.
    logits, boxes = reference["logits"], reference["boxes"]
    assert np.abs(logits[0] - logits[1]).max() > 0.1 and 0.3 < logits.std() < 10
    assert boxes.std() > 0.05 and np.abs(boxes[0] - boxes[1]).max() > 0.01
    assert "dn" not in out


@functools.lru_cache(maxsize=None)
def training_comparison(variant: str = "v1"):
    """(our config, our outputs, HF's) in training mode with denoising: both given the
    targets and the same denoising draws (G = num_denoising // MAX_BOXES = 2 groups)."""
    model, config, variables, _, _, _ = detector_comparison(variant)
    targets = detector_targets()
    groups = TINY_DETECTOR["num_denoising"] // MAX_BOXES
    noise = DenoisingNoise.draw(jax.random.key(5), 2, 2 * MAX_BOXES * groups, 5)
    return config, run_detector(config, variables, targets, noise), hf_detector_outputs(model, targets, noise)


def test_denoising_queries_and_the_matching_ones_match_hf_in_training():
    variant = "v1"
    _, out, reference = training_comparison(variant)
    groups = TINY_DETECTOR["num_denoising"] // MAX_BOXES
    num_dn = out["dn"]["pred_logits"].shape[2]
    assert num_dn == 2 * MAX_BOXES * groups and reference["logits"].shape[2] == num_dn + 10
    assert_per_layer(f"{variant} dn logits", out["dn"]["pred_logits"], reference["logits"][:, :, :num_dn])
    assert_per_layer(f"{variant} dn boxes", out["dn"]["pred_boxes"], reference["boxes"][:, :, :num_dn])
    assert_per_layer(f"{variant} logits with dn", out["pred_logits"], reference["logits"][:, :, num_dn:])
    assert_per_layer(f"{variant} boxes with dn", out["pred_boxes"], reference["boxes"][:, :, num_dn:])
    assert_per_layer(f"{variant} enc logits with dn", out["enc"]["pred_logits"], reference["enc_logits"][None])


def hf_loss_name(name: str, num_layers: int) -> str:
    """Our metric name -> transformers' RTDetrLoss key: loss_ce is its loss_vfl; layer l of the
    main branch its `_aux_{l}`, the enc branch its `_aux_{L - 1}` (appended to the aux
    outputs); the dn branch's layers `_dn_{l}`, the last one included."""
    name = name.replace("loss_ce", "loss_vfl")
    if name.endswith("_enc"):
        return name.removesuffix("_enc") + f"_aux_{num_layers - 1}"
    if name.endswith("_dn"):
        return name + f"_{num_layers - 1}"
    term, _, layer = name.rpartition("_")
    return f"{term}_aux_{layer}" if layer.isdigit() and not term.endswith("_dn") else name


def test_the_loss_with_denoising_matches_transformers_every_term_and_layer():
    """RT-DETR's recipe: the varifocal class convention (VFL alpha 0.75, gamma 2; focal
    matching cost alpha 0.25, gamma 2), matching costs class 2 / L1 5 / GIoU 2, loss weights
    VFL 1 / L1 5 / GIoU 2, on the main, enc and dn branches. Relative tolerance 1e-5: the
    same float32 sums of the same matched pairs (the predictions agree within 1e-4)."""
    config, out, reference = training_comparison()
    config = copy.deepcopy(config)
    with config.unlocked():
        config.loss.update(class_coef=1.0, bbox_coef=5.0, giou_coef=2.0, focal_alpha=0.25, focal_gamma=2.0,
                           varifocal_alpha=0.75, varifocal_gamma=2.0)
        config.loss.matcher_args = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}
    criterion = SetCriterion.from_config(config.loss, 5, classes=build_class_convention(config))
    targets = {k: jnp.asarray(v) for k, v in detector_targets().items()}
    total, metrics = criterion(out, targets)
    layers = out["pred_logits"].shape[0]
    ours = {}  # weighted, as transformers' loss_dict
    for key, value in metrics.items():
        term = next((t for t in criterion.weight_dict if key.startswith(t)), None)
        if term is not None:
            ours[hf_loss_name(key, layers)] = float(value) * criterion.weight_dict[term]
    assert set(ours) == set(reference["loss"]), (sorted(ours), sorted(reference["loss"]))
    for key, value in sorted(reference["loss"].items()):
        print(f"{key}: ours {ours[key]:.6f} transformers {value:.6f}")
        np.testing.assert_allclose(ours[key], value, rtol=LOSS_RTOL, err_msg=key)
    np.testing.assert_allclose(float(total), sum(reference["loss"].values()), rtol=LOSS_RTOL)
    assert float(metrics["nonfinite_cost"]) == 0 and min(reference["loss"].values()) > 1e-3


def test_a_deliberate_mistake_fails_the_detector_parity(monkeypatch):
    """The anchors' x and y swapped (they differ on these non-square levels)."""
    _, config, variables, _, _, reference = detector_comparison("v1")
    right = queries.encoder_proposals

    def swapped(memory_mask, spatial_shapes):
        proposals, valid = right(memory_mask, spatial_shapes)
        return proposals[..., [1, 0, 3, 2]], valid

    monkeypatch.setattr(queries, "encoder_proposals", swapped)
    jitted_detector.cache_clear()
    try:
        wrong = run_detector(config, variables)
    finally:
        jitted_detector.cache_clear()
    assert np.abs(np.asarray(wrong["pred_boxes"]) - reference["boxes"]).max() > 100 * TOLERANCE


def test_conversion_infers_the_detector_and_lists_unmapped_keys():
    model, config, variables, metadata, _, _ = detector_comparison("v1")
    inferred = metadata["inferred_model"]
    assert inferred["arch"] == "rt_detr" and inferred["backbone"] == "resnet_vd_tiny"
    assert (inferred["hidden_dim"], inferred["num_classes"], inferred["num_decoder_layers"]) == (32, 5, 2)
    assert inferred["transformer_args"] == {"num_feature_levels": 4, "num_blocks": 3, "expansion": 0.5}
    assert variables["batch_stats"]["decoder_input_proj3"]["norm"]["var"].shape == (32,)
    state = {**hf_state_dict_numpy(model), "model.decoder.extra_head.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(convert.ConversionError, match="model.decoder.extra_head.weight: no huggingface_rt_detr rule"):
        convert.convert_state_dict(state, config.model)


def test_a_v2_model_saved_by_transformers_converts(tmp_path):
    """save_pretrained keeps the decoder's heads once (not the top-level copies) and the
    attentions' n_points_scale buffers: inferred as v2, the same variables."""
    model, config, variables, _, _, _ = detector_comparison("v2")
    model.save_pretrained(tmp_path)
    overrides = {"model.num_heads": 4, "model.num_queries": 10, "model.dropout": 0.0,
                 "model.transformer_args": config.model.transformer_args}
    saved, metadata = convert.convert_file(tmp_path, overrides=overrides)
    assert metadata["layout"] == "huggingface_rt_detr_v2" and metadata["model"]["arch"] == "rt_detr"
    assert any(k.endswith("encoder_attn.n_points_scale") for k in metadata["ignored_keys"])
    flat, expected = traverse_util.flatten_dict(saved), traverse_util.flatten_dict(variables)
    assert set(flat) == set(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(flat[path], value, err_msg="/".join(path))


@pytest.mark.parametrize("args, message", [
    ({"decoder_n_points": [1, 2]}, "decoder_n_points=[1, 2]: expected a positive integer or 3 of them"),
    ({"decoder_sampling": "nearest"}, "decoder_sampling='nearest': expected one of"),
    ({"encode_levels": [3]}, "encode_levels=[3]: expected a list of level indices < 3"),
    ({"num_feature_levels": 2}, "num_feature_levels=2: expected an integer >= 3"),
    ({"dn_number": 100}, "dn_number not among this detector's settings"),
])
def test_bad_rt_detr_settings_are_config_errors(args, message):
    from detr_jax.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"model": {"arch": "rt_detr", "backbone": "resnet_vd_tiny", "transformer_args": args}})
