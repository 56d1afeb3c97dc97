"""PyTorch -> Flax conversion: every layout through files, round trips, and clear refusals.

Checkpoints are made offline from a small random Hugging Face DETR (see test_parity_hf):
saved by HF itself, renamed to the official DETR layout (fused in_proj), and its backbone
renamed to the torchvision ResNet layout. A converted-and-saved checkpoint, loaded back,
must reproduce the HF model's predictions of every decoder layer (tolerance and why: see
test_parity_hf).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from test_parity_hf import (  # noqa: E402  (tests/ is on sys.path under pytest)
    TINY_DETR,
    TINY_RESNET,
    assert_same_predictions,
    build_hf_detr,
    hf_per_layer_predictions,
    our_model_config,
    padded_batch,
    randomize_hf_detr_,
    run_ours,
    to_hf_inputs,
)

from detr_jax import convert  # noqa: E402
from detr_jax.checkpoints.checkpointer import CheckpointError, load_metadata, load_variables, merge_variables, save_variables  # noqa: E402
from detr_jax.cli.convert import convert_main  # noqa: E402
from detr_jax.cli.main import main  # noqa: E402
from detr_jax.config import load_config, resolve_config_path  # noqa: E402
from detr_jax.data import SyntheticShapesSource, make_source, write_coco_folder  # noqa: E402
from detr_jax.models import build_model, init_variables  # noqa: E402
from detr_jax.train.trainer import initial_variables, resolve_num_classes  # noqa: E402

TINY_MODEL = dict(backbone="resnet_tiny", hidden_dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=3,
                  dim_feedforward=64, num_queries=7, num_classes=5)


@functools.lru_cache(maxsize=None)
def tiny_reference(position_embedding: str = "sine") -> types.SimpleNamespace:
    """A randomized tiny HF DETR, its state dict (torch) and its per-layer predictions."""
    model = build_hf_detr(TINY_RESNET, position_embedding_type=position_embedding, **TINY_DETR)
    images, noisy, mask = padded_batch()
    pixel_values, pixel_mask = to_hf_inputs(images, mask)
    randomize_hf_detr_(model, pixel_values, pixel_mask)
    return types.SimpleNamespace(
        model=model,
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        predictions=hf_per_layer_predictions(model, pixel_values, pixel_mask),
        images=noisy,  # ours gets noise in the padding
        mask=mask,
    )


def write_config(directory, position_embedding: str = "sine", **model_overrides) -> str:
    """A config file (get_config()) for the tiny model; returns its path."""
    fields = {**TINY_MODEL, "position_embedding": position_embedding, **model_overrides}
    path = directory / f"tiny_{position_embedding}.py"
    path.write_text(
        "from detr_jax.config import base_config\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        f"    config.model.update({fields!r})\n"
        "    return config\n"
    )
    return str(path)


def predictions_of(checkpoint_dir, config) -> tuple[np.ndarray, np.ndarray]:
    """Loads a converted checkpoint and runs our model on the reference batch."""
    ref = tiny_reference(config.model.position_embedding)
    return run_ours(config.model, load_variables(checkpoint_dir), ref.images, ref.mask)


# ---------------------------------------------------------------------------------------
# Other layouts, made by renaming HF's (transformers 5 in-memory) keys.


def torchvision_body_key(hf_name: str) -> str:
    """HF native ResNet name (after `...backbone.model.`) -> torchvision name."""
    rules = [
        (r"embedder\.embedder\.convolution\.(\w+)", lambda p: f"conv1.{p}"),
        (r"embedder\.embedder\.normalization\.(\w+)", lambda p: f"bn1.{p}"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.convolution\.(\w+)",
         lambda s, b, j, p: f"layer{int(s) + 1}.{b}.conv{int(j) + 1}.{p}"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.normalization\.(\w+)",
         lambda s, b, j, p: f"layer{int(s) + 1}.{b}.bn{int(j) + 1}.{p}"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(\w+)",
         lambda s, b, p: f"layer{int(s) + 1}.{b}.downsample.0.{p}"),
        (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(\w+)",
         lambda s, b, p: f"layer{int(s) + 1}.{b}.downsample.1.{p}"),
    ]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, hf_name)
        if match:
            return rename(*match.groups())
    raise AssertionError(f"no torchvision name for {hf_name}")


def official_layer_key(stack: str, rest: str) -> str:
    final_norm = "norm2" if stack == "encoder" else "norm3"
    for old, new in [("self_attn.o_proj", "self_attn.out_proj"), ("encoder_attn.o_proj", "multihead_attn.out_proj"),
                     ("encoder_attn.", "multihead_attn."), ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"),
                     ("self_attn_layer_norm", "norm1"), ("encoder_attn_layer_norm", "norm2"),
                     ("final_layer_norm", final_norm)]:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def official_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF DETR state dict in official DETR's names, q/k/v fused into in_proj."""
    heads = {"model.query_position_embeddings.weight": "query_embed.weight",
             "model.decoder.layernorm.weight": "transformer.decoder.norm.weight",
             "model.decoder.layernorm.bias": "transformer.decoder.norm.bias",
             "model.position_embedding.row_embeddings.weight": "backbone.1.row_embed.weight",
             "model.position_embedding.column_embeddings.weight": "backbone.1.col_embed.weight"}
    official, qkv = {}, {}
    for key, value in hf.items():
        if key in heads:
            official[heads[key]] = value
        elif key.startswith("model.backbone.model."):
            official["backbone.0.body." + torchvision_body_key(key[len("model.backbone.model."):])] = value
        elif key.startswith("model.input_projection."):
            official["input_proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("class_labels_classifier.", "bbox_predictor.")):
            official[key.replace("class_labels_classifier", "class_embed").replace("bbox_predictor", "bbox_embed")] = value
        else:
            stack, index, rest = re.fullmatch(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", key).groups()
            name = f"transformer.{stack}.layers.{index}.{official_layer_key(stack, rest)}"
            fused = re.fullmatch(r"(.+)\.([qkv])_proj\.(weight|bias)", name)
            if fused:
                qkv.setdefault((fused[1], fused[3]), {})[fused[2]] = value
            else:
                official[name] = value
    for (attention, param), parts in qkv.items():
        official[f"{attention}.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return official


def torchvision_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF backbone in torchvision ResNet names, with `fc` and `num_batches_tracked`."""
    prefix = "model.backbone.model."
    resnet = {torchvision_body_key(k[len(prefix):]): v for k, v in hf.items() if k.startswith(prefix)}
    for key in [k for k in resnet if k.endswith(".running_var")]:
        resnet[key.replace("running_var", "num_batches_tracked")] = torch.tensor(100)
    resnet["fc.weight"] = torch.randn(1000, resnet["layer4.0.conv3.weight"].shape[0])
    resnet["fc.bias"] = torch.randn(1000)
    return resnet


def hub_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hub's DETR layout (facebook/detr-resnet-50): timm backbone names, out_proj, fc1."""
    hub = {}
    for key, value in hf.items():
        if key.startswith("model.backbone.model."):
            key = "model.backbone.conv_encoder.model." + torchvision_body_key(key[len("model.backbone.model."):])
        hub[key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")] = value
    return hub


# ---------------------------------------------------------------------------------------
# Round trips: file -> convert_main -> checkpoint -> load_variables -> same predictions.


def save_as(kind: str, ref, directory):
    """Writes the reference model as a checkpoint of `kind`; returns the path to convert."""
    if kind == "hf_save_pretrained":  # a directory: model.safetensors + config.json
        ref.model.save_pretrained(directory / "hf_model")
        return directory / "hf_model"
    if kind == "hf_state_dict_pth":  # transformers 5 in-memory names (o_proj, mlp.fc1, backbone.model)
        torch.save(ref.state_dict, directory / "detr_hf.pth")
        return directory / "detr_hf.pth"
    if kind == "hf_hub_safetensors":
        save_file({k: v.contiguous() for k, v in hub_state_dict(ref.state_dict).items()}, directory / "hub.safetensors")
        return directory / "hub.safetensors"
    if kind == "official":  # as a training checkpoint of facebookresearch/detr, with its args
        checkpoint = {"model": official_state_dict(ref.state_dict), "epoch": 299,
                      "args": argparse.Namespace(lr=1e-4, backbone="resnet50")}
        torch.save(checkpoint, directory / "detr-official.pth")
        return directory / "detr-official.pth"
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, position_embedding",
    [("hf_save_pretrained", "sine"), ("hf_state_dict_pth", "learned"), ("hf_hub_safetensors", "sine"),
     ("official", "sine"), ("official", "learned")],
)
def test_converted_checkpoint_reproduces_hf_model(kind, position_embedding, tmp_path):
    ref = tiny_reference(position_embedding)
    config_file = write_config(tmp_path, position_embedding)
    src = save_as(kind, ref, tmp_path)
    # A config file, or (as `detr-jax convert --config` passes it) a loaded config.
    config_arg = load_config(config_file) if kind == "official" else config_file
    metadata = convert_main(src, tmp_path / "converted", config=config_arg)

    expected_layout = "official" if kind == "official" else "huggingface"
    assert metadata["layout"] == expected_layout and metadata["contents"] == "detr"
    assert metadata["inferred_model"]["position_embedding"] == position_embedding
    assert load_metadata(tmp_path / "converted")["source_sha256"] == metadata["source_sha256"]
    config = load_config(config_file)
    assert_same_predictions(f"{kind}/{position_embedding}", predictions_of(tmp_path / "converted", config),
                            ref.predictions)


def test_convert_without_config_infers_the_model(tmp_path):
    ref = tiny_reference("learned")
    src = save_as("official", ref, tmp_path).rename(tmp_path / "detr-tiny-dc5.pth")
    # num_heads cannot be read from the weights: given as an override.
    metadata = convert_main(src, tmp_path / "out", overrides={"model.num_heads": 4})
    for field, value in {**TINY_MODEL, "position_embedding": "learned", "pre_norm": False}.items():
        assert metadata["model"][field] == value, field
    # Nor can dilation: a DC5 file name without model.dilation=True gets a note.
    assert any("model.dilation=True" in note for note in metadata["notes"])
    config = load_config(write_config(tmp_path, "learned"))
    assert_same_predictions("inferred", predictions_of(tmp_path / "out", config), ref.predictions)


def test_torchvision_resnet_becomes_the_backbone_subtree(tmp_path):
    ref = tiny_reference()
    torch.save(torchvision_state_dict(ref.state_dict), tmp_path / "resnet.pth")
    metadata = convert_main(tmp_path / "resnet.pth", tmp_path / "backbone",
                            config=write_config(tmp_path))
    assert metadata["layout"] == "torchvision" and metadata["contents"] == "backbone"
    assert {"fc.weight", "fc.bias", "bn1.num_batches_tracked"} <= set(metadata["ignored_keys"])
    backbone = load_variables(tmp_path / "backbone")
    assert {c: list(t) for c, t in backbone.items()} == {"params": ["backbone"], "frozen_bn": ["backbone"]}

    # The same tensors as the backbone of the full HF conversion, merged into a fresh model.
    full, _ = convert.convert_state_dict({k: v.numpy() for k, v in ref.state_dict.items()},
                                         load_config(write_config(tmp_path)).model)
    fresh = jax.tree.map(np.zeros_like, full)  # stands in for an initialized model
    merged = merge_variables(fresh, backbone, source="resnet.pth")
    for collection in ("params", "frozen_bn"):
        jax.tree.map(np.testing.assert_array_equal, merged[collection]["backbone"], full[collection]["backbone"])
    jax.tree.map(np.testing.assert_array_equal, merged["params"]["transformer"], fresh["params"]["transformer"])


def test_pre_norm_checkpoint_maps_the_encoder_norm():
    ref = tiny_reference()
    official = {k: v.numpy() for k, v in official_state_dict(ref.state_dict).items()}
    official["transformer.encoder.norm.weight"] = np.full(32, 2.0, np.float32)
    official["transformer.encoder.norm.bias"] = np.full(32, 0.5, np.float32)
    config = our_model_config(ref.model, "resnet_tiny")
    config.pre_norm = True
    variables, metadata = convert.convert_state_dict(official, config)
    assert metadata["inferred_model"]["pre_norm"] is True
    np.testing.assert_array_equal(variables["params"]["transformer"]["encoder_norm"]["scale"], 2.0)
    np.testing.assert_array_equal(variables["params"]["transformer"]["encoder_norm"]["bias"], 0.5)

    config.pre_norm = False
    with pytest.raises(convert.ConversionError, match=r"model\.pre_norm: checkpoint has True, config has False"):
        convert.convert_state_dict(official, config)


# ---------------------------------------------------------------------------------------
# Fine-tuning: a different number of classes.


def test_num_classes_mismatch_needs_the_reinit_flag(tmp_path):
    ref = tiny_reference()
    src = save_as("official", ref, tmp_path)
    config_file = write_config(tmp_path, num_classes=3)
    with pytest.raises(convert.ConversionError) as error:
        convert_main(src, tmp_path / "refused", config=config_file)
    message = str(error.value)
    assert str(src) in message
    assert "model.num_classes: checkpoint has 5, config has 3" in message and "--reinit_class_head" in message
    assert not (tmp_path / "refused").exists()

    metadata = convert_main(src, tmp_path / "finetune", config=config_file, reinit_class_head=True)
    assert metadata["reinitialized"] == ["params/class_embed"] and metadata["notes"]
    tuned = load_variables(tmp_path / "finetune")
    assert tuned["params"]["class_embed"]["kernel"].shape == (32, 4)
    # PyTorch nn.Linear init, U(+-1/sqrt(32)): a fresh head, not zeros or the old one.
    assert 0.05 < np.abs(tuned["params"]["class_embed"]["kernel"]).max() <= 32**-0.5
    full, _ = convert.convert_state_dict(convert.load_state_dict(src), load_config(write_config(tmp_path)).model)
    del tuned["params"]["class_embed"], full["params"]["class_embed"]
    jax.tree.map(np.testing.assert_array_equal, tuned, full)


def test_two_step_finetune_from_converted_hf_weights_reinitializes_the_class_head(tmp_path):
    """The README's fine-tuning path: convert, then `detr-jax train --config finetune_coco_folder`
    on a COCO-format folder, num_classes="auto", the class head re-initialized."""
    ref = tiny_reference()
    converted = tmp_path / "converted"
    convert_main(save_as("hf_save_pretrained", ref, tmp_path), converted, config=write_config(tmp_path))
    shapes = SyntheticShapesSource(8, seed=0, image_size=(64, 64), num_objects=(1, 3))  # ids 1..3
    for split in ("train2017", "val2017"):  # the official COCO layout the config expects
        write_coco_folder(shapes, tmp_path / "coco", split=split)
    overrides = {**{f"model.{k}": v for k, v in TINY_MODEL.items() if k != "num_classes"},
                 "data.coco_dir": str(tmp_path / "coco"), "data.train_scales": (64,), "data.train_max_size": 64,
                 "data.crop_scales": (64,), "data.crop_size": (48, 64), "data.eval_scale": 64,
                 "data.eval_max_size": 64, "data.bucket_shapes": ((64, 64),), "data.max_boxes": 4,
                 "train.init_from": str(converted), "train.batch_size": 2, "train.num_steps": 2,
                 "train.eval_every_epochs": 0}

    config = load_config(resolve_config_path("finetune_coco_folder"), overrides)
    resolve_num_classes(config, make_source(config.data, "train"))
    assert config.model.num_classes == 4
    model = build_model(config.model)
    start = initial_variables(config, model, jax.random.PRNGKey(0))
    fresh = init_variables(model, jax.random.PRNGKey(0))
    pretrained = load_variables(converted)
    np.testing.assert_array_equal(start["params"]["class_embed"]["kernel"], fresh["params"]["class_embed"]["kernel"])
    assert start["params"]["class_embed"]["kernel"].shape == (32, 5)  # 4 classes + "no object"
    del start["params"]["class_embed"], pretrained["params"]["class_embed"]
    # Fresh variables always carry a "batch_stats" collection, empty for DETR (no trainable
    # BatchNorm), which the converted checkpoint does not write.
    assert start.pop("batch_stats") == {}
    jax.tree.map(np.testing.assert_array_equal, start, pretrained)  # everything else is the converted model

    workdir = tmp_path / "run"
    argv = ["train", "--config", "finetune_coco_folder", "--workdir", str(workdir), "--no_progress",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]
    assert main(argv) == 0
    meta = json.loads((workdir / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["config"]["model"]["num_classes"] == 4


def test_num_queries_mismatch_is_refused(tmp_path):
    ref = tiny_reference()
    src = save_as("official", ref, tmp_path)
    with pytest.raises(convert.ConversionError, match=r"model\.num_queries: checkpoint has 7, config has 10"):
        convert_main(src, tmp_path / "out", config=write_config(tmp_path, num_queries=10),
                     reinit_class_head=True)


def test_group_norm_model_is_refused_with_the_reason(tmp_path):
    ref = tiny_reference()
    src = save_as("official", ref, tmp_path)
    with pytest.raises(convert.ConversionError, match=r"backbone_norm='frozen_bn'.*'group_norm'"):
        convert_main(src, tmp_path / "out", config=write_config(tmp_path, backbone_norm="group_norm"))


# ---------------------------------------------------------------------------------------
# Refusals name the file and every problem.


def test_unrelated_state_dict_is_refused(tmp_path):
    path = tmp_path / "classifier.pth"
    torch.save({"features.0.weight": torch.randn(8, 3, 3, 3), "classifier.bias": torch.randn(10)}, path)
    with pytest.raises(convert.ConversionError) as error:
        convert_main(path, tmp_path / "out", config=write_config(tmp_path))
    message = str(error.value)
    assert str(path) in message and "not a DETR, ResNet or ViT checkpoint" in message and "features.0.weight" in message


def test_every_missing_extra_and_misshaped_tensor_is_listed(tmp_path):
    official = official_state_dict(tiny_reference().state_dict)
    del official["transformer.decoder.layers.1.linear2.bias"]
    del official["backbone.0.body.layer2.0.bn3.running_var"]
    official["transformer.encoder.layers.0.linear1.weight"] = torch.randn(64, 31)
    official["input_proj.weight"] = torch.randn(32, 128, 1, 1)
    official["transformer.decoder.layers.0.gate.weight"] = torch.randn(4, 4)
    path = tmp_path / "broken.pth"
    torch.save({"model": official}, path)
    with pytest.raises(convert.ConversionError) as error:
        convert_main(path, tmp_path / "out", config=write_config(tmp_path))
    message = str(error.value)
    for expected in [
        str(path),
        "params/transformer/decoder_layer1/ffn/linear2/bias",
        "frozen_bn/backbone/body/layer2_0/bn3/var",
        "params/transformer/encoder_layer0/ffn/linear1/kernel (from transformer.encoder.layers.0.linear1.weight): "
        "checkpoint (31, 64), model (32, 64)",
        "params/input_proj/kernel (from input_proj.weight): checkpoint (1, 1, 128, 32), model (1, 1, 256, 32)",
        "transformer.decoder.layers.0.gate.weight: no official rule",
    ]:
        assert expected in message, f"{expected!r} not in:\n{message}"


def test_architecture_mismatch_lists_config_fields_and_extra_layers(tmp_path):
    src = save_as("official", tiny_reference(), tmp_path)
    with pytest.raises(convert.ConversionError) as error:
        convert_main(src, tmp_path / "out",
                     config=write_config(tmp_path, num_decoder_layers=2, backbone="resnet50"))
    message = str(error.value)
    assert "model.num_decoder_layers: checkpoint has 3, config has 2" in message
    assert "model.backbone: checkpoint has 'resnet_tiny', config has 'resnet50'" in message
    assert "params/transformer/decoder_layer2/ffn/linear1/kernel" in message


def test_unreadable_and_absent_files_are_named(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(1000))
    for path in (text, noise):
        with pytest.raises(convert.ConversionError, match=re.escape(str(path)) + ": not a PyTorch checkpoint") as error:
            convert_main(path, tmp_path / "out")
        assert "weights_only" not in str(error.value)  # torch's hint would unpickle arbitrary code
    with pytest.raises(convert.ConversionError, match="no such file"):
        convert_main(tmp_path / "absent.pth", tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(convert.ConversionError, match="neither model.safetensors nor pytorch_model.bin"):
        convert_main(tmp_path / "empty_dir", tmp_path / "out")


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": {"query_embed.weight": torch.zeros(2, 2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(convert.ConversionError) as error:
        convert_main(path, tmp_path / "out")
    message = str(error.value)
    assert not marker.exists()
    assert str(path) in message and "not a safe PyTorch checkpoint" in message
    assert re.search(r"needs \w+\.mkdir", message) and "weights_only" not in message


def test_checkpoint_directories_are_checked(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        save_variables({"params": {"w": np.zeros(2)}}, tmp_path / "taken", {})
    with pytest.raises(CheckpointError, match="not a detr-jax params checkpoint"):
        load_variables(tmp_path / "taken")
    with pytest.raises(CheckpointError) as error:
        merge_variables({"params": {"w": np.zeros(2)}},
                        {"params": {"w": np.zeros(3), "v": np.zeros(1)}}, source="x.ckpt")
    assert "params/v" in str(error.value) and "params/w: (3,) in x.ckpt, (2,) in the model" in str(error.value)
