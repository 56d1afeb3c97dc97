"""The official repositories' checkpoints of Conditional DETR (Atten4Vis/ConditionalDETR),
DAB-DETR (IDEA-Research/DAB-DETR) and Deformable DETR (fundamentalvision/Deformable-DETR:
plain, box refinement, two-stage): `official_detr_family` against the members' Hugging
Face layouts, whose conversions the parity tests check against transformers. Deformable
DETR's inverse table and tests are at the end (DEFORMABLE_TO_OFFICIAL), on the tiny models
of test_parity_deformable.

No official checkpoint or code is needed: the tiny random-weight HF models of the parity
tests (test_parity_conditional, test_parity_dab) are renamed to the official names by the
INVERSE of transformers' own conversion scripts' rename tables, which map every official
name to Hugging Face's:

  Conditional DETR: `rename_keys`, `rename_backbone_keys` and `read_in_q_k_v` of
    src/transformers/models/conditional_detr/convert_conditional_detr_original_pytorch_checkpoint_to_pytorch.py
    (huggingface/transformers 09cb93d8890401636f6abd80b763671e755aa025). That script
    writes the saved names of transformers 4 (`sa_qcontent_proj`, `self_attn.out_proj`,
    `fc1`, `backbone.conv_encoder.model`), which transformers 5 renames when loading
    (conversion_mapping.py, "ConditionalDetrModel": `self_attn.q_content_proj`, `o_proj`,
    `mlp.fc1`, `backbone.model`); CONDITIONAL_TO_OFFICIAL below inverts both, from the
    in-memory names of transformers 5 to the official ones.
  DAB-DETR: `ORIGINAL_TO_CONVERTED_KEY_MAPPING` and the in_proj split of `write_model` of
    src/transformers/models/dab_detr/convert_dab_detr_original_pytorch_checkpoint_to_pytorch.py
    (huggingface/transformers e7b4076c1962253d8330159bf3131787e7e3f5c6; an earlier draft,
    0122e62, named HF's decoder `layers.{i}.layer.{0,1,2}`, which the model never had).
    transformers 5 renames nothing of DAB-DETR: DAB_TO_OFFICIAL inverts the table alone.

Both scripts map `backbone.0.body.*` to a timm ResNet, whose names are torchvision's; the
tiny HF models have transformers' native ResNet (no timm ResNet is this small), renamed
here to torchvision's names (torchvision_body, the inverse of resnet.py's rules for the
native names). The encoder's q/k/v projections are fused into nn.MultiheadAttention's
in_proj [3E, E] in q, k, v order (the scripts take rows [:256], [256:512], [-256:]).
What the official models hold and HF's do not: nothing (the official FrozenBatchNorm2d
has no num_batches_tracked, as HF's frozen BatchNorm). DAB-DETR's `transformer.decoder.
bbox_embed` is the official tied copy of `bbox_embed`, as HF's `model.decoder.bbox_embed`.

Checked: converting the official-named and the HF-named state dict gives bitwise equal
variables and the same inferred model (arch included); rules gone wrong (two projections
swapped, a fused in_proj read in k, q, v order) fail that equality; a saved official
training checkpoint ({"model": ..., "args": Namespace, "epoch": ...}) converts through
`detr-jax convert`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import test_parity_conditional as conditional  # noqa: E402
import test_parity_dab as dab  # noqa: E402
from flax import traverse_util  # noqa: E402
from test_parity_hf import hf_state_dict_numpy, padded_batch, randomize_hf_detr_, to_hf_inputs  # noqa: E402

from detr_jax import convert  # noqa: E402
from detr_jax.convert import layouts  # noqa: E402


def torchvision_body(m: re.Match) -> str:
    """transformers' native ResNet names -> torchvision's (stages 0-based there, 1-based here)."""
    name = m[1]
    rules = [
        (r"embedder\.embedder\.convolution", lambda: "conv1"),
        (r"embedder\.embedder\.normalization", lambda: "bn1"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.(convolution|normalization)",
         lambda s, b, j, what: f"layer{int(s) + 1}.{b}.{'conv' if what == 'convolution' else 'bn'}{int(j) + 1}"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)",
         lambda s, b, what: f"layer{int(s) + 1}.{b}.downsample.{0 if what == 'convolution' else 1}"),
    ]
    for pattern, build in rules:
        if match := re.fullmatch(pattern, name):
            return "backbone.0.body." + build(*match.groups())
    raise AssertionError(f"no torchvision name for the native ResNet module {name}")


# transformers 5's names of Conditional DETR's conditional projections -> the official ones
# (conversion_mapping.py's "ConditionalDetrModel" renamings, inverted).
_CONDITIONAL_PROJECTIONS = {"q_content": "qcontent", "q_pos": "qpos", "k_content": "kcontent", "k_pos": "kpos",
                            "v": "v", "q_pos_sine": "qpos_sine"}
_CONDITIONAL_ATTENTION = {"self_attn": "sa", "encoder_attn": "ca"}

# (HF module name pattern, official module name: a template or a function of the match).
# The encoder's self_attn.{q,k,v}_proj are fused separately (FUSED).
CONDITIONAL_TO_OFFICIAL = [
    (r"model\.backbone\.model\.(.+)", torchvision_body),  # script: backbone.0.body -> backbone.conv_encoder.model
    (r"model\.input_projection", "input_proj"),
    (r"model\.query_position_embeddings", "query_embed"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn\.o_proj", r"transformer.encoder.layers.\1.self_attn.out_proj"),
    (r"model\.encoder\.layers\.(\d+)\.mlp\.fc([12])", r"transformer.encoder.layers.\1.linear\2"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm", r"transformer.encoder.layers.\1.norm1"),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm", r"transformer.encoder.layers.\1.norm2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.o_proj", r"transformer.decoder.layers.\1.self_attn.out_proj"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.o_proj", r"transformer.decoder.layers.\1.cross_attn.out_proj"),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc([12])", r"transformer.decoder.layers.\1.linear\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm", r"transformer.decoder.layers.\1.norm1"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm", r"transformer.decoder.layers.\1.norm2"),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm", r"transformer.decoder.layers.\1.norm3"),
    (r"model\.decoder\.layers\.(\d+)\.(self_attn|encoder_attn)\.(q_content|q_pos|k_content|k_pos|v|q_pos_sine)_proj",
     lambda m: (f"transformer.decoder.layers.{m[1]}."
                f"{_CONDITIONAL_ATTENTION[m[2]]}_{_CONDITIONAL_PROJECTIONS[m[3]]}_proj")),
    (r"model\.decoder\.layernorm", "transformer.decoder.norm"),
    (r"model\.decoder\.(ref_point_head|query_scale)\.layers\.(\d+)", r"transformer.decoder.\1.layers.\2"),
    (r"class_labels_classifier", "class_embed"),
    (r"bbox_predictor\.layers\.(\d+)", r"bbox_embed.layers.\1"),
]

_DAB_PROJECTIONS = {"query_content": "qcontent", "query_pos": "qpos", "key_content": "kcontent", "key_pos": "kpos",
                    "value": "v", "query_pos_sine": "qpos_sine"}
_DAB_ATTENTION = {"self_attn": "sa", "cross_attn": "ca"}

DAB_TO_OFFICIAL = [
    (r"model\.backbone\.conv_encoder\.model\.(.+)", torchvision_body),  # script: -> conv_encoder.model._backbone
    (r"model\.input_projection", "input_proj"),
    (r"model\.query_refpoint_embeddings", "refpoint_embed"),
    (r"class_embed", "class_embed"),
    (r"bbox_predictor\.layers\.(\d+)", r"bbox_embed.layers.\1"),
    (r"model\.encoder\.query_scale\.layers\.(\d+)", r"transformer.encoder.query_scale.layers.\1"),
    (r"model\.decoder\.bbox_embed\.layers\.(\d+)", r"transformer.decoder.bbox_embed.layers.\1"),
    (r"model\.decoder\.layernorm", "transformer.decoder.norm"),
    (r"model\.decoder\.(ref_point_head|ref_anchor_head|query_scale)\.layers\.(\d+)",
     r"transformer.decoder.\1.layers.\2"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn\.out_proj", r"transformer.encoder.layers.\1.self_attn.out_proj"),
    (r"model\.encoder\.layers\.(\d+)\.fc([12])", r"transformer.encoder.layers.\1.linear\2"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm", r"transformer.encoder.layers.\1.norm1"),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm", r"transformer.encoder.layers.\1.norm2"),
    (r"model\.encoder\.layers\.(\d+)\.activation_fn", r"transformer.encoder.layers.\1.activation"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.self_attn\.output_proj",
     r"transformer.decoder.layers.\1.self_attn.out_proj"),
    (r"model\.decoder\.layers\.(\d+)\.cross_attn\.cross_attn\.output_proj",
     r"transformer.decoder.layers.\1.cross_attn.out_proj"),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.fc([12])", r"transformer.decoder.layers.\1.linear\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.self_attn_layer_norm", r"transformer.decoder.layers.\1.norm1"),
    (r"model\.decoder\.layers\.(\d+)\.cross_attn\.cross_attn_layer_norm", r"transformer.decoder.layers.\1.norm2"),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.final_layer_norm", r"transformer.decoder.layers.\1.norm3"),
    (r"model\.decoder\.layers\.(\d+)\.mlp\.activation_fn", r"transformer.decoder.layers.\1.activation"),
    # ca_qpos_proj: layer 0 only (the script maps transformer.decoder.layers.0.ca_qpos_proj alone)
    (r"model\.decoder\.layers\.(\d+)\.(self_attn|cross_attn)\.\2_(query_content|query_pos|key_content|key_pos|value|"
     r"query_pos_sine)_proj",
     lambda m: f"transformer.decoder.layers.{m[1]}.{_DAB_ATTENTION[m[2]]}_{_DAB_PROJECTIONS[m[3]]}_proj"),
]

# The encoder's q/k/v projections (both members) -> one fused in_proj per layer.
FUSED = r"model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj"


def official_state_dict(hf: dict[str, np.ndarray], table, fused_order: str = "qkv", fused_pattern: str = FUSED,
                        fused_name: str = "transformer.encoder.layers.{}.self_attn") -> dict[str, np.ndarray]:
    """The official-named state dict of an HF state dict by the inverse `table`; the q/k/v
    of `fused_pattern` (the encoder's; Deformable DETR: the decoder's) fused into
    `fused_name`'s in_proj_{weight,bias} rows in `fused_order` (official: qkv). Every HF key
    must be renamed."""
    official, fused = {}, {}
    for key, value in hf.items():
        module, _, param = key.rpartition(".")
        if match := re.fullmatch(fused_pattern, module):
            fused.setdefault((match[1], param), {})[match[2]] = value
            continue
        for pattern, target in table:
            if match := re.fullmatch(pattern, module):
                name = target(match) if callable(target) else match.expand(target)
                break
        else:
            raise AssertionError(f"no official name for {key}")
        assert f"{name}.{param}" not in official, key
        official[f"{name}.{param}"] = value
    for (layer, param), parts in fused.items():
        official[f"{fused_name.format(layer)}.in_proj_{param}"] = np.concatenate(
            [parts[p] for p in fused_order])
    return official


MEMBERS = {
    # member: (build the HF model, randomize more, our config file, inverse table, layouts, arch)
    "conditional": (conditional.build_hf_conditional, lambda model: None, conditional.CONFIG, CONDITIONAL_TO_OFFICIAL,
                    ("huggingface_conditional_detr", "official_conditional_detr"), "conditional_detr"),
    "dab": (dab.build_hf_dab, dab.randomize_prelu_, dab.CONFIG, DAB_TO_OFFICIAL,
            ("huggingface_dab_detr", "official_dab_detr"), "dab_detr"),
}


@functools.lru_cache(maxsize=None)
def member(name: str):
    """(our config, HF-named state dict, official-named state dict) of the tiny random HF model."""
    build, randomize_more, config_file, table, _, _ = MEMBERS[name]
    model = build()
    images, _, mask = padded_batch(sizes=conditional.SIZES)
    randomize_hf_detr_(model, *to_hf_inputs(images, mask))
    randomize_more(model)
    hf = hf_state_dict_numpy(model)
    return conditional.member_config(config_file, model.config), hf, official_state_dict(hf, table)


@functools.lru_cache(maxsize=None)
def hf_conversion(name: str):
    config, hf, _ = member(name)
    return convert.convert_state_dict(hf, config.model)


def flat(variables) -> dict:
    return traverse_util.flatten_dict(variables)


def assert_bitwise_equal(a, b) -> None:
    a, b = flat(a), flat(b)
    assert sorted(a) == sorted(b)
    for path in a:
        assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), "/".join(path)


def max_difference(a, b) -> float:
    a, b = flat(a), flat(b)
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[p] - b[p]).max()) for p in a)


@pytest.mark.parametrize("name", MEMBERS)
def test_official_names_convert_to_the_same_variables_as_hugging_face(name):
    config, _, official = member(name)
    hf_layout, official_layout, arch = MEMBERS[name][4][0], MEMBERS[name][4][1], MEMBERS[name][5]
    # A few official names as the models' code writes them. The whole key sets (backbone
    # aside) were compared once, outside the tests (CI has no copy of the official code),
    # with the state dicts of the official Transformer, heads and queries built from
    # Atten4Vis/ConditionalDETR 8ea7c3f and IDEA-Research/DAB-DETR 723ddb8: identical.
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in official
    assert official["transformer.encoder.layers.0.self_attn.in_proj_weight"].shape == (3 * 32, 32)
    assert "transformer.decoder.layers.0.ca_qpos_proj.weight" in official
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in official
    assert "transformer.decoder.layers.1.ca_qpos_sine_proj.weight" in official
    assert "backbone.0.body.layer4.0.downsample.1.running_var" in official
    assert convert.detect_layout(list(official)) == official_layout
    with_official = convert.convert_state_dict(official, config.model)
    with_hf = hf_conversion(name)
    assert with_hf[1]["layout"] == hf_layout and with_official[1]["layout"] == official_layout
    assert_bitwise_equal(with_official[0], with_hf[0])
    assert with_official[1]["inferred_model"] == with_hf[1]["inferred_model"]
    assert with_official[1]["inferred_model"]["arch"] == arch
    if name == "dab":  # the tied copy of the box head, ignored in both layouts
        assert sorted(with_official[1]["ignored_keys"]) == sorted(
            k for k in official if k.startswith("transformer.decoder.bbox_embed."))
        assert "transformer.encoder.layers.0.activation.weight" in official
    else:
        assert with_official[1]["ignored_keys"] == []
    # Official DETR's keys are `transformer.*` too: still official DETR's layout.
    detr_keys = [k for k in official if not re.search(r"\.(?:sa|ca)_\w+_proj\.", k)]
    assert convert.detect_layout(detr_keys) == "official"


def _swap_positions(resolve):
    """A wrong rule: the decoder self-attention's sa_qpos_proj and sa_kpos_proj exchanged."""
    swapped = {"sa_qpos_proj": "sa_kpos_proj", "sa_kpos_proj": "sa_qpos_proj"}

    def wrong(name):
        head, _, last = name.rpartition(".")
        return resolve(f"{head}.{swapped[last]}" if last in swapped else name)
    return wrong


@pytest.mark.parametrize("mistake", ["swapped projections", "in_proj read as k, q, v"])
def test_a_wrong_rule_fails_the_equality(mistake, monkeypatch):
    """Both mistakes keep every shape (no conversion error): only the values show them."""
    config, hf, official = member("conditional")
    if mistake == "swapped projections":
        right = layouts.MODULE_RESOLVERS["official_conditional_detr"]
        monkeypatch.setitem(layouts.MODULE_RESOLVERS, "official_conditional_detr", _swap_positions(right))
    else:  # what reading q, k, v in the wrong order amounts to: q and k exchanged
        official = official_state_dict(hf, CONDITIONAL_TO_OFFICIAL, fused_order="kqv")
    wrong, _ = convert.convert_state_dict(official, config.model)
    assert max_difference(wrong, hf_conversion("conditional")[0]) > 0.1


@pytest.mark.parametrize("name", MEMBERS)
def test_detr_jax_convert_reads_an_official_training_checkpoint(name, tmp_path):
    """`detr-jax convert` of {"model": state dict, "args": Namespace, ...} (how both
    repositories' main.py saves): the model inferred (num_heads is in no tensor)."""
    from detr_jax.checkpoints.checkpointer import load_metadata, load_variables
    from detr_jax.cli.convert import convert_main

    _, _, official = member(name)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in official.items()}, "epoch": 49,
                "args": argparse.Namespace(hidden_dim=32, nheads=2)}, path)
    metadata = convert_main(path, tmp_path / "converted", overrides={"model.num_heads": 2})
    assert metadata["layout"] == MEMBERS[name][4][1]
    assert load_metadata(tmp_path / "converted")["model"]["arch"] == MEMBERS[name][5]
    assert metadata["inferred_model"] == hf_conversion(name)[1]["inferred_model"]
    assert_bitwise_equal(load_variables(tmp_path / "converted"), hf_conversion(name)[0])


def test_what_is_not_converted_says_why():
    """A segmentation model (the detector under `detr.`, its mask head) and DAB-DETR's
    pattern embeddings (the "-pat3" models) are refused by name, with the reason."""
    config, _, official = member("dab")
    segmentation = {f"detr.{k}": v for k, v in official.items()}
    segmentation["mask_head.lay1.weight"] = np.zeros((40, 34, 3, 3), np.float32)
    segmentation["transformer.patterns.weight"] = np.zeros((3, 32), np.float32)
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_state_dict(segmentation, config.model)
    lines = str(error.value).splitlines()
    assert "official_dab_detr" in lines[0]
    assert any("mask_head.lay1.weight: a segmentation head" in line for line in lines)
    assert any("transformer.patterns.weight: DAB-DETR's pattern embeddings" in line for line in lines)
    assert "  checkpoint keys that cannot be mapped (2):" in lines  # the detector under detr. is read


# Deformable DETR (fundamentalvision/Deformable-DETR): the inverse of `rename_key` and
# `read_in_q_k_v` of src/transformers/models/deformable_detr/convert_deformable_detr_to_pytorch.py
# (huggingface/transformers 9a6732442fc381e1ea815c511aa804f118c869be). The script writes
# transformers 4's saved names (`fc1`, `self_attn.out_proj`, `backbone.conv_encoder.model`);
# the tiny models here have transformers 5's in-memory ones (`mlp.fc1`, `o_proj`,
# `backbone.model`, native ResNet), inverted to the official names likewise. The decoder's
# self-attention is nn.MultiheadAttention (fused in_proj), the encoder's and the decoder's
# cross-attention MSDeformAttn (the same four names in both). The official decoder layer's
# norm1 follows its cross-attention and norm2 its self-attention: the script maps them to
# encoder_attn_layer_norm and self_attn_layer_norm.
_MS_DEFORM_ATTN = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
DEFORMABLE_TO_OFFICIAL = [
    (r"model\.backbone\.model\.(.+)", torchvision_body),
    (r"model\.input_proj\.(\d+)\.([01])", r"input_proj.\1.\2"),
    (r"model\.query_position_embeddings", "query_embed"),
    (r"model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)", r"transformer.\1"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn\." + _MS_DEFORM_ATTN, r"transformer.encoder.layers.\1.self_attn.\2"),
    (r"model\.encoder\.layers\.(\d+)\.self_attn_layer_norm", r"transformer.encoder.layers.\1.norm1"),
    (r"model\.encoder\.layers\.(\d+)\.final_layer_norm", r"transformer.encoder.layers.\1.norm2"),
    (r"model\.(encoder|decoder)\.layers\.(\d+)\.mlp\.fc([12])", r"transformer.\1.layers.\2.linear\3"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\." + _MS_DEFORM_ATTN,
     r"transformer.decoder.layers.\1.cross_attn.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.o_proj", r"transformer.decoder.layers.\1.self_attn.out_proj"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm", r"transformer.decoder.layers.\1.norm1"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm", r"transformer.decoder.layers.\1.norm2"),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm", r"transformer.decoder.layers.\1.norm3"),
    (r"model\.decoder\.((?:class_embed|bbox_embed)\.\d+(?:\.layers\.\d+)?)", r"transformer.decoder.\1"),
    (r"(class_embed\.\d+|bbox_embed\.\d+\.layers\.\d+)", r"\1"),
]
DEFORMABLE_FUSED = dict(fused_pattern=r"model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj",
                        fused_name="transformer.decoder.layers.{}.self_attn")
DEFORMABLE_LAYOUTS = {  # variant: (HF layout, official layout)
    "plain": ("huggingface_deformable_detr", "official_deformable_detr"),
    "box_refine": ("huggingface_deformable_detr_box_refine", "official_deformable_detr_box_refine"),
    "two_stage": ("huggingface_deformable_detr_box_refine", "official_deformable_detr_box_refine"),
}


def deformable_official_state_dict(hf: dict[str, np.ndarray], **fused) -> dict[str, np.ndarray]:
    """`official_state_dict` by DEFORMABLE_TO_OFFICIAL, plus the bare level embedding."""
    hf = dict(hf)
    level_embed = hf.pop("model.level_embed")
    return {**official_state_dict(hf, DEFORMABLE_TO_OFFICIAL, **{**DEFORMABLE_FUSED, **fused}),
            "transformer.level_embed": level_embed}


@functools.lru_cache(maxsize=None)
def deformable(variant: str):
    """(our config, HF-named state dict, official-named state dict, the HF conversion) of the
    tiny random HF Deformable DETR of test_parity_deformable (untied box-refine class heads,
    as the official model's)."""
    import test_parity_deformable as parity

    model = parity.build_hf_deformable(**parity.VARIANTS[variant])
    images, _, mask = padded_batch(sizes=conditional.SIZES)
    randomize_hf_detr_(model, *to_hf_inputs(images, mask))
    parity.randomize_rest_(model)
    hf = hf_state_dict_numpy(model)
    config = conditional.member_config(parity.CONFIG, model.config, transformer_args=parity.VARIANTS[variant])
    return config, hf, deformable_official_state_dict(hf), convert.convert_state_dict(hf, config.model)


@pytest.mark.parametrize("variant", list(DEFORMABLE_LAYOUTS))
def test_official_deformable_names_convert_to_the_same_variables_as_hugging_face(variant):
    config, hf, official, (hf_variables, hf_metadata) = deformable(variant)
    hf_layout, official_layout = DEFORMABLE_LAYOUTS[variant]
    refine, two_stage = variant != "plain", variant == "two_stage"
    # Official names as the model's code writes them (deformable_transformer.py, deformable_detr.py).
    assert official["transformer.decoder.layers.0.self_attn.in_proj_weight"].shape == (3 * 32, 32)
    assert "transformer.encoder.layers.0.self_attn.sampling_offsets.weight" in official
    assert "transformer.decoder.layers.1.cross_attn.attention_weights.bias" in official
    assert "input_proj.3.1.weight" in official and "backbone.0.body.layer4.0.downsample.1.running_var" in official
    assert ("transformer.reference_points.weight" in official) == ("query_embed.weight" in official) == (not two_stage)
    assert ("transformer.decoder.bbox_embed.0.layers.0.weight" in official) == refine
    assert ("transformer.decoder.class_embed.2.weight" in official) == ("transformer.pos_trans.weight" in official) \
        == two_stage
    assert convert.detect_layout(list(official)) == official_layout
    with_official = convert.convert_state_dict(official, config.model)
    assert hf_metadata["layout"] == hf_layout and with_official[1]["layout"] == official_layout
    assert_bitwise_equal(with_official[0], hf_variables)
    assert with_official[1]["inferred_model"] == hf_metadata["inferred_model"]
    inferred = with_official[1]["inferred_model"]
    assert inferred["arch"] == "deformable_detr" and inferred["neck"] == "channel_mapper"
    assert inferred["transformer_args"] == {"with_box_refine": refine, "two_stage": two_stage, "num_feature_levels": 4}
    # Dropped: the tied copies of the heads only (the plain model's one head repeated per
    # layer; transformer.decoder.{bbox,class}_embed or the heads they copy, whichever comes
    # second in the state dict).
    def head(key):
        return key.removeprefix("transformer.decoder.")
    assert sorted(map(head, with_official[1]["ignored_keys"])) == sorted(
        head(k) for k in official
        if k.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed."))
        or (not refine and re.match(r"(class|bbox)_embed\.[1-9]", k)))


def test_official_deformable_detection_is_not_confused():
    """Official DETR, Conditional DETR and DAB-DETR stay theirs; two-stage without box
    refinement is refused with the reason; a wrong rule (the decoder's norm1 and norm2
    taken in the order of their names, as official DETR's) fails the equality."""
    assert convert.detect_layout(list(member("conditional")[2])) == "official_conditional_detr"
    assert convert.detect_layout(list(member("dab")[2])) == "official_dab_detr"
    config, _, official, (hf_variables, _) = deformable("two_stage")
    without_refine = {k: v for k, v in official.items() if not k.startswith("transformer.decoder.bbox_embed.")}
    assert convert.detect_layout(list(without_refine)) == "official_deformable_detr"
    with pytest.raises(convert.ConversionError, match="two_stage needs with_box_refine"):
        convert.convert_state_dict(without_refine, config.model)


def test_a_wrong_deformable_rule_fails_the_equality(monkeypatch):
    config, _, official, (hf_variables, _) = deformable("box_refine")
    right = layouts.MODULE_RESOLVERS["official_deformable_detr_box_refine"]
    swapped = {"norm1": "norm2", "norm2": "norm1"}

    def wrong(name):
        head, _, last = name.rpartition(".")
        return right(f"{head}.{swapped[last]}" if head.startswith("transformer.decoder.") and last in swapped else name)
    monkeypatch.setitem(layouts.MODULE_RESOLVERS, "official_deformable_detr_box_refine", wrong)
    converted, _ = convert.convert_state_dict(official, config.model)
    assert max_difference(converted, hf_variables) > 0.1


def test_detr_jax_convert_reads_an_official_deformable_training_checkpoint(tmp_path):
    """`detr-jax convert` of the official Deformable-DETR main.py's checkpoint (two-stage:
    every head and the proposals' projection), the model inferred from its names and shapes
    given the heads (num_heads is in no tensor: H * L * P is): bitwise the variables of
    Hugging Face's conversion."""
    from detr_jax.checkpoints.checkpointer import load_metadata, load_variables
    from detr_jax.cli.convert import convert_main

    _, _, official, (hf_variables, hf_metadata) = deformable("two_stage")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in official.items()}, "epoch": 49,
                "args": argparse.Namespace(hidden_dim=32, nheads=2, with_box_refine=True, two_stage=True)}, path)
    metadata = convert_main(path, tmp_path / "converted", overrides={"model.num_heads": 2})
    assert metadata["layout"] == DEFORMABLE_LAYOUTS["two_stage"][1]
    saved = load_metadata(tmp_path / "converted")["model"]
    assert saved["arch"] == "deformable_detr" and saved["transformer_args"]["two_stage"]
    assert metadata["inferred_model"] == hf_metadata["inferred_model"]
    assert_bitwise_equal(load_variables(tmp_path / "converted"), hf_variables)


# ---------------------------------------------------------------------------------------
# Fine-tuning an official Deformable DETR or DINO on other classes (--reinit_class_head).


def reclassed(name: str):
    """(config of the checkpoint's 5 classes, its official state dict, the modules that
    depend on the classes) of the tiny two-stage Deformable DETR above or the DINO of
    test_parity_dino's fixture."""
    if name == "dino":
        import test_parity_dino as dino

        return dino.converted()[0], dino.official_state_dict(), [
            "params/class_embed", "params/enc_out_class_embed", "params/label_enc"]
    config, _, official, _ = deformable("two_stage")
    # A class head per decoder layer, and the proposals' (class_embed_{L}).
    return config, official, [f"params/class_embed_{i}" for i in range(config.model.num_decoder_layers + 1)]


@pytest.mark.parametrize("name", ["deformable_two_stage", "dino"])
def test_reinit_class_head_converts_for_other_classes(name):
    """An official checkpoint of 5 classes for a model of 3: refused without the flag (the
    flag named); with it, every variable whose shape depends on the classes is the model's
    own initialization (the focal prior: class biases logit(0.01); DINO's label embedding
    [K + 1, E]) and named in metadata["reinitialized"], everything else is what the
    conversion for 5 classes gives, and the model trains on 3 classes (finite outputs)."""
    import jax
    import jax.numpy as jnp

    from detr_jax.models import build_model

    config, official, modules = reclassed(name)
    other = copy.deepcopy(config)
    other.model.num_classes = 3
    with pytest.raises(convert.ConversionError,
                       match=r"model\.num_classes: checkpoint has 5, config has 3 .*--reinit_class_head"):
        convert.convert_state_dict(official, other.model)
    variables, metadata = convert.convert_state_dict(official, other.model, reinit_class_head=True)
    assert metadata["reinitialized"] == modules
    assert any(", ".join(modules) in note for note in metadata["notes"])
    ours, as_converted = flat(variables), flat(convert.convert_state_dict(official, config.model)[0])
    assert sorted(ours) == sorted(as_converted)
    prior = -np.log((1 - 0.01) / 0.01)
    hidden = config.model.hidden_dim
    for path, value in ours.items():
        if "/".join(path[:2]) not in modules:
            assert np.array_equal(value, as_converted[path]), "/".join(path)
        elif path[1] == "label_enc":
            assert value.shape == (3 + 1, hidden) and 0.5 < value.std() < 1.5  # N(0, 1), as nn.Embedding
        elif path[-1] == "bias":
            np.testing.assert_allclose(value, np.full(3, prior), rtol=1e-6)
        else:
            assert value.shape == (hidden, 3) and 0 < np.abs(value).max() <= hidden**-0.5  # PyTorch Linear's init

    model = build_model(other.model)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 255, (1, 64, 64, 3)), jnp.uint8)
    targets = {"labels": jnp.asarray([[0, 2]], jnp.int32), "valid": jnp.ones((1, 2), bool),
               "boxes": jnp.asarray([[[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.2]]], jnp.float32)}
    key = jax.random.PRNGKey(0)
    out = jax.jit(lambda v: model.apply(v, images, jnp.ones((1, 64, 64), bool), train=True, targets=targets,
                                        rngs={"dropout": key, "queries": key}))(variables)
    assert out["pred_logits"].shape[-1] == 3
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(out))
