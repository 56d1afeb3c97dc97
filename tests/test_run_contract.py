"""A run's config is its contract (detr_jax.config.run_contract): resuming with a config that
changes what the checkpoints hold is refused naming each key and both values; one that
changes what a step means is refused unless train.allow_config_change, and then recorded
in config_history.json while config.json keeps the config the run started with. Also:
rerunning a finished run prints its last numbers.

One tiny training run (2 steps, both checkpointed, a stand-in evaluation) is copied for
each case.
"""

import json
import pathlib
import shutil

import pytest

from conftest import cli_overrides, tiny_config
from detr_jax.cli.main import main
from detr_jax.config import base_config
from detr_jax.config.run_contract import FREE, MEANING, STATE, ResumeRefused, config_changes, kind_of
from detr_jax.train.trainer import train

RUN = {"train.num_steps": 2, "train.checkpoint_every_steps": 1, "train.eval_every_epochs": 1,
       "train.keep_checkpoints": 5}
EVAL_METRICS = {"AP": 0.25, "AP50": 0.5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("trained")
    train(tiny_config(**RUN), workdir, eval_fn=lambda variables, step: dict(EVAL_METRICS), show_progress=False)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(trained, tmp_path / "run"))


def record(workdir: pathlib.Path) -> dict:
    """{file: bytes} of the run's record, which a refused resume leaves as it is."""
    return {name: (workdir / name).read_bytes() for name in ("config.json", "metrics.jsonl")
            if (workdir / name).exists()} | {"config_history.json": (workdir / "config_history.json").exists()}


@pytest.mark.parametrize("key, old, new, kind", [
    ("model.hidden_dim", 32, 64, STATE),
    ("model.num_classes", 4, 5, STATE),
    ("train.param_rules", [], [[".*", 0.5]], STATE),
    ("train.grad_accum_steps", 1, 2, STATE),  # optax.MultiSteps wraps the optimizer state
    ("train.grad_accum_steps", 2, 4, MEANING),
    ("train.clip_max_norm", 0.1, 0.0, STATE),  # no clipping: one part less of the state
    ("train.clip_max_norm", 0.1, 0.2, MEANING),
    ("model.dtype", "float32", "bfloat16", MEANING),
    ("train.batch_size", 4, 8, MEANING),
    ("data.train_scales", [64], [64, 96], MEANING),
    ("seed", 0, 1, MEANING),
    ("loss.eos_coef", 0.1, 0.2, MEANING),
    ("train.epochs", 5, 10, FREE),
    ("train.log_every_steps", 50, 10, FREE),
    ("data.num_workers", 0, 4, FREE),
    ("data.eval_scale", 800, 640, FREE),
    ("eval.batch_size", 8, 2, FREE),
])
def test_kinds_of_change(key, old, new, kind):
    assert kind_of(key, old, new) == kind


def test_keys_a_saved_config_lacks_are_compared_with_their_defaults():
    config = tiny_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["train"]["fsdp_min_mib"], saved["model"]["backbone_args"]  # saved by an older version
    saved["train"]["gone"] = 1  # a key this version does not know
    assert config_changes(saved, config) == {}
    saved["train"].pop("param_sharding")
    config.train.param_sharding = "fsdp"
    assert config_changes(saved, config) == {"train.param_sharding": ("replicated", "fsdp")}
    assert config_changes(json.loads(base_config().to_json_best_effort()), base_config()) == {}


def test_resuming_with_another_model_shape_names_the_key_and_both_values(workdir, capsys):
    before = record(workdir)
    argv = ["train", "--config", "synthetic_tiny", "--workdir", str(workdir), "--no_progress",
            *cli_overrides(**{**RUN, "model.hidden_dim": 64, "train.eval_every_epochs": 0})]
    assert main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"detr-jax: config error: {workdir}: cannot resume with this config: "
                              "model.hidden_dim (32 in the run, 64 now) would change the shape of what its "
                              "checkpoints hold"), message
    assert "\n" not in message and "Traceback" not in message
    assert record(workdir) == before


def test_another_batch_size_is_refused_then_accepted_with_the_switch_and_recorded(workdir):
    before = record(workdir)
    with pytest.raises(ResumeRefused) as refused:
        train(tiny_config(**{**RUN, "train.batch_size": 8}), workdir, show_progress=False)
    message = str(refused.value)
    assert "train.batch_size (4 in the run, 8 now) would change what its training steps mean" in message
    assert "--config.train.allow_config_change=True" in message and "model." not in message
    assert record(workdir) == before

    # Nothing is left to train (2 of 2 steps): the change is recorded without a compilation.
    allowed = tiny_config(**{**RUN, "train.batch_size": 8, "train.allow_config_change": True})
    for _ in range(2):  # the second resume starts from the same step: its entry replaces the first's
        train(allowed, workdir, show_progress=False)
        assert json.loads((workdir / "config.json").read_text())["train"]["batch_size"] == 4  # how the run began
        assert json.loads((workdir / "config_history.json").read_text()) == [
            {"step": 2, "changed": {"train.batch_size": [4, 8]}}]


def test_rerunning_a_finished_run_prints_its_last_numbers(workdir, capsys):
    argv = ["train", "--config", "synthetic_tiny", "--workdir", str(workdir), "--no_progress",
            *cli_overrides(**{**RUN, "train.eval_every_epochs": 0})]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("done: loss=") and ", eval_AP=0.25, eval_AP50=0.5; " in line, line
