"""Configs: every file loads, unknown keys and bad values are errors, overrides are typed."""

import pathlib

import pytest

from detr_jax.cli.main import split_overrides
from detr_jax.config import ConfigError, config_from_args, load_config, parse_value, resolve_config_path
from detr_jax.criterion.matcher import HungarianMatcher
from detr_jax.models import build_model

CONFIGS = sorted(pathlib.Path(__file__).resolve().parents[1].glob("configs/*.py"))


def test_there_are_the_documented_configs():
    names = {p.stem for p in CONFIGS}
    assert {"detr_r50_coco", "detr_r50_dc5_coco", "detr_r101_coco", "detr_r101_dc5_coco",
            "synthetic_tiny", "finetune_coco_folder"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds_model(path):
    config = load_config(path)
    if config.model.num_classes == "auto":  # resolved from the training data when training starts
        with pytest.raises(ValueError, match="taken from the training data"):
            build_model(config.model)
        config.model.num_classes = 5
    model = build_model(config.model)
    assert model.num_queries == config.model.num_queries


def test_paper_settings():
    config = load_config(resolve_config_path("detr_r50_coco"))
    m, loss, train = config.model, config.loss, config.train
    assert (m.hidden_dim, m.num_heads, m.num_encoder_layers, m.num_decoder_layers) == (256, 8, 6, 6)
    assert (m.dim_feedforward, m.dropout, m.num_queries, m.num_classes) == (2048, 0.1, 100, 91)
    assert not m.pre_norm and m.position_embedding == "sine"
    matcher = HungarianMatcher.from_config(loss)  # the costs are the matcher's settings (loss.matcher_args)
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (1, 5, 2)
    assert (loss.bbox_coef, loss.giou_coef, loss.eos_coef) == (5, 2, 0.1)
    lr_backbone = train.lr * dict(train.param_rules)["backbone/.*"]  # the lr_backbone of official DETR
    assert (train.lr, lr_backbone, train.weight_decay, train.clip_max_norm) == (1e-4, pytest.approx(1e-5), 1e-4, 0.1)
    assert load_config(resolve_config_path("detr_r101_dc5_coco")).model.dilation


def test_unknown_override_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown config key 'model.hiden_dim'"):
        config_from_args("synthetic_tiny", {"model.hiden_dim": "3"})
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        config_from_args("synthetic_tiny", {"modle.hidden_dim": "3"})


def test_unknown_key_in_config_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from detr_jax.config import base_config\n"
                   "def get_config():\n    c = base_config()\n    c.model.hiden_dim = 3\n    return c\n")
    with pytest.raises(ConfigError, match="bad.py.*hiden_dim"):
        load_config(bad)
    missing = tmp_path / "nothing.py"
    missing.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(missing)
    with pytest.raises(ConfigError, match="no such config file"):
        resolve_config_path(str(tmp_path / "absent.py"))


@pytest.mark.parametrize("key,value,message", [
    ("model.backbone", "resnet18", "model.backbone"),
    ("model.hidden_dim", "30", "not divisible"),
    ("model.dtype", "float16", "model.dtype"),
    ("model.backbone_norm", "sync_batch_norm", "model.backbone_norm"),
    ("loss.eos_coef", "0", "eos_coef"),
    ("model.num_queries", "0", "num_queries"),
    ("model.num_classes", "0", "model.num_classes"),
    ("model.num_classes", "many", "model.num_classes"),
    ("train.lr", "-0.001", "train.lr=-0.001 must be > 0"),
    ("train.lr", "0", "train.lr=0.0 must be > 0"),
    ("train.warmup_steps", "-10", "train.warmup_steps=-10 must be >= 0"),
    ("train.weight_decay", "-1", "train.weight_decay=-1.0 must be >= 0"),
    ("train.num_steps", "-5", "train.num_steps=-5 must be >= 0"),
    ("train.batch_size", "0", "train.batch_size"),
    ("train.grad_accum_steps", "0", "train.grad_accum_steps"),
    ("train.checkpoint_every_steps", "0", "train.checkpoint_every_steps"),
    ("train.clip_max_norm", "-0.1", "train.clip_max_norm"),
    ("train.init_exclude", "('class_embed/(',)", "train.init_exclude"),
    ("eval.batch_size", "0", "eval.batch_size"),
    ("model.arch", "yolo", "model.arch"),
    ("model.class_convention", "softmaxx", "model.class_convention"),
    ("model.neck", "fpn", "model.neck"),
    ("model.neck_args", "{'width': 3}", "model.neck_args for 'input_proj'"),
    ("loss.focal_alpha", "1.5", "loss.focal_alpha"),
    ("loss.matcher_args", "{'cost_mask': 1.0}", "loss.matcher_args for 'hungarian': .*cost_mask"),
    ("loss.matcher_args", "{'cost_giou': -1.0}", "loss.matcher_args for 'hungarian': cost_giou=-1.0 must be"),
    ("loss.matcher_args", "3", "loss.matcher_args=3 must be a dict"),
    ("model.transformer_args", "{'two_stage': True}", "model.arch='detr': model.transformer_args: two_stage not"),
    ("model.transformer_args", "[1]", "model.transformer_args=.* must be a dict"),
])
def test_bad_values_are_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_args("synthetic_tiny", {key: value})


def test_overrides_are_parsed_to_the_key_type():
    config = config_from_args("synthetic_tiny", {
        "model.num_queries": "12", "model.pre_norm": "true", "loss.eos_coef": "1",
        "model.position_embedding": "learned", "data.train_scales": "[96, 128]"})
    assert config.model.num_queries == 12 and config.model.pre_norm is True
    assert config.loss.eos_coef == 1.0 and isinstance(config.loss.eos_coef, float)
    assert config.model.position_embedding == "learned"
    assert tuple(config.data.train_scales) == (96, 128)
    with pytest.raises(ConfigError, match="expected a boolean"):
        parse_value("maybe", False)


def test_num_classes_is_a_number_or_auto():
    assert config_from_args("synthetic_tiny", {"model.num_classes": "auto"}).model.num_classes == "auto"
    assert config_from_args("synthetic_tiny", {"model.num_classes": "7"}).model.num_classes == 7


@pytest.mark.parametrize("argv,option", [
    (["predict", "x.jpg", "--checkpoint", "c", "--out", "o", "--top_k", "-1"], "--top_k"),
    (["predict", "x.jpg", "--checkpoint", "c", "--out", "o", "--batch_size", "0"], "--batch_size"),
    (["predict", "x.jpg", "--checkpoint", "c", "--out", "o", "--score_threshold", "1.5"], "--score_threshold"),
    (["eval", "--checkpoint", "c", "--max_batches", "0"], "--max_batches"),
])
def test_command_line_numbers_that_make_no_sense_are_rejected(argv, option, capsys):
    from detr_jax.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_split_overrides():
    rest, overrides = split_overrides(["train", "--config.model.num_queries=5", "--workdir", "w",
                                       "--config.seed", "3"])
    assert rest == ["train", "--workdir", "w"]
    assert overrides == {"model.num_queries": "5", "seed": "3"}


def test_a_detector_s_own_constraints_are_config_errors():
    """Building the detector at load time surfaces what only the member knows."""
    with pytest.raises(ConfigError, match="model.arch='conditional_detr': .*post-norm only"):
        config_from_args("synthetic_conditional_tiny", {"model.pre_norm": "true"})
    with pytest.raises(ConfigError, match="model.masks=True needs the softmax class convention"):
        config_from_args("synthetic_tiny", {"model.masks": "true", "model.class_convention": "sigmoid_focal"})


def test_matching_costs_of_an_earlier_version_are_read_as_matcher_args():
    """Saved configs from before loss.matcher_args held loss.cost_*: a run keeps its costs,
    and its defaults stay implicit, so resuming it compares equal (run_contract)."""
    from detr_jax.config import config_from_dict
    from detr_jax.config.run_contract import config_changes

    saved = {"loss": {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "class_coef": 2.0}}
    config = config_from_dict(saved)
    assert config.loss.matcher_args == {"cost_class": 2.0} and config.loss.class_coef == 2.0
    matcher = HungarianMatcher.from_config(config.loss)
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert config_changes(saved, config) == {}
    assert config_changes({"loss": {"cost_class": 1.0}}, config_from_dict({})) == {}
