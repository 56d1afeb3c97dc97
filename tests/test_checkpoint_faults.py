"""Damaged and missing checkpoints: training, evaluation and prediction use the newest
readable step with a one-line warning; a damaged step folder given on its own, or a run
with no readable step, is a CheckpointError naming each step and its reason; the noise of
orbax's abandoned reads ("Event loop is closed") never reaches stderr.

One tiny training run (2 steps, both checkpointed) is copied for each case.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config

from detr_jax.checkpoints.checkpointer import (
    Checkpointer,
    CheckpointError,
    load_variables,
    read_state_as_numpy,
    unreadable_reason,
)
from detr_jax.cli import eval as eval_command
from detr_jax.cli.main import build_parser, split_overrides
from detr_jax.serving.predictor import Predictor
from detr_jax.checkpoints.restore import load_checkpoint
from detr_jax.train.trainer import train

RUN = {"train.num_steps": 2, "train.checkpoint_every_steps": 1, "train.eval_every_epochs": 0,
       "train.keep_checkpoints": 5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("trained")
    train(tiny_config(**RUN), workdir, show_progress=False)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(trained, tmp_path / "run"))


def truncate_data_file(step_dir: pathlib.Path) -> None:
    """Cuts the largest array data file of the step's state in half."""
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def delete_tree_metadata(step_dir: pathlib.Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


def break_meta_json(step_dir: pathlib.Path) -> None:
    (step_dir / "meta" / "metadata").write_text('{"step": 2, ')


def delete_meta(step_dir: pathlib.Path) -> None:
    (step_dir / "meta" / "metadata").unlink()


# damage -> what the reason says
DAMAGES = {
    "truncated": (truncate_data_file, "OUT_OF_RANGE: Error reading"),
    "no_tree_metadata": (delete_tree_metadata, "state/_METADATA: missing"),
    "invalid_meta": (break_meta_json, "meta/metadata: not valid JSON"),
    "no_meta": (delete_meta, "meta/metadata: missing"),
}
STATE_DAMAGES = ["truncated", "no_tree_metadata"]


def fallback_warning(caplog, step_dir: pathlib.Path, reason: str) -> str:
    """The one warning about `step_dir`, checked to be one short line naming it, the reason
    and the step used instead."""
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "unreadable" in r.getMessage()]
    assert len(warnings) == 1, warnings
    message = warnings[0]
    assert "\n" not in message and len(message) < 600, message
    assert f"checkpoint {step_dir} is unreadable (" in message and reason in message, message
    assert message.endswith("; using step 1"), message
    return message


def params_of(step_dir: pathlib.Path) -> dict:
    return read_state_as_numpy(step_dir / "state")["params"]


def assert_same_tree(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, jax.tree.map(np.asarray, b))


# ----------------------------------------------------------------------------------------
# Training


def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    checkpointer = Checkpointer(tmp_path, keep=5, async_save=False)
    states = {s: {"w": np.full((3,), s, np.float32), "step": np.int32(s)} for s in (1, 2)}
    for s, state in states.items():
        checkpointer.save(s, state, {"next_index": s * 10}, {"step": s})
    checkpointer.wait()
    newest = tmp_path / "checkpoints" / "2" / "state"
    for f in newest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[1])
    with caplog.at_level("WARNING"):
        state, data_state, meta = checkpointer.restore_latest(abstract)
    checkpointer.close()
    assert meta["step"] == 1 and data_state == {"next_index": 10}
    np.testing.assert_array_equal(state["w"], states[1]["w"])
    assert any("checkpoints/2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    fallback_warning(caplog, tmp_path / "checkpoints" / "2", "")


@pytest.mark.parametrize("damage", STATE_DAMAGES + ["invalid_meta"])
def test_train_resumes_from_the_newest_readable_step(workdir, damage, caplog):
    make_damage, reason = DAMAGES[damage]
    make_damage(workdir / "checkpoints" / "2")
    # num_steps=1: resuming from step 1 leaves nothing to train (no compilation).
    with caplog.at_level("INFO", logger="detr_jax"):
        train(tiny_config(**{**RUN, "train.num_steps": 1}), workdir, show_progress=False)
    fallback_warning(caplog, workdir / "checkpoints" / "2", reason)
    assert any(r.getMessage().startswith("resumed from step 1 ") for r in caplog.records)


# ----------------------------------------------------------------------------------------
# Evaluation and prediction


@pytest.mark.parametrize("damage", DAMAGES)
def test_load_checkpoint_of_a_workdir_uses_the_newest_readable_step(workdir, damage, caplog):
    make_damage, reason = DAMAGES[damage]
    make_damage(workdir / "checkpoints" / "2")
    with caplog.at_level("WARNING"):
        variables, config = load_checkpoint(workdir)
    fallback_warning(caplog, workdir / "checkpoints" / "2", reason)
    assert_same_tree(variables["params"], params_of(workdir / "checkpoints" / "1"))
    assert config.model.num_queries == tiny_config().model.num_queries


@pytest.mark.parametrize("damage", STATE_DAMAGES + ["invalid_meta"])
def test_a_damaged_step_folder_is_a_checkpoint_error_naming_it(workdir, damage):
    make_damage, reason = DAMAGES[damage]
    step_dir = workdir / "checkpoints" / "2"
    make_damage(step_dir)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(step_dir)
    message = str(error.value)
    assert message.startswith(f"checkpoint {step_dir} is unreadable: ") and reason in message, message
    assert "\n" not in message and len(message) < 600, message


def test_no_readable_step_lists_each_with_its_reason(workdir):
    truncate_data_file(workdir / "checkpoints" / "2")
    delete_tree_metadata(workdir / "checkpoints" / "1")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(workdir)
    lines = str(error.value).splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == f"no checkpoint in {workdir / 'checkpoints'} is readable:"
    assert lines[1].startswith(f"  {workdir / 'checkpoints' / '2'}: OUT_OF_RANGE: Error reading "), lines
    assert lines[2] == f"  {workdir / 'checkpoints' / '1'}: state/_METADATA: missing"


@pytest.mark.parametrize("damage", STATE_DAMAGES)
def test_predictor_uses_the_newest_readable_step(workdir, damage, caplog):
    make_damage, reason = DAMAGES[damage]
    make_damage(workdir / "checkpoints" / "2")
    with caplog.at_level("WARNING"):
        predictor = Predictor.from_checkpoint(workdir)
    fallback_warning(caplog, workdir / "checkpoints" / "2", reason)
    assert_same_tree(predictor._variables["params"], params_of(workdir / "checkpoints" / "1"))


def test_eval_with_overrides_reads_the_checkpoint_once(workdir, monkeypatch):
    """`detr-jax eval --checkpoint WORKDIR --config.eval.batch_size=2` reads the meta item
    once, along with the state (the command used to read it once more for the config)."""
    reads = []
    read_text = pathlib.Path.read_text

    def counted_read_text(self, *args, **kwargs):
        reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", counted_read_text)

    class Loaded(Exception):
        """Raised by the evaluator: the test stops where evaluation would begin."""

    def evaluator(model, config):
        raise Loaded(config)

    monkeypatch.setattr(eval_command, "Evaluator", evaluator)
    rest, overrides = split_overrides(["eval", "--checkpoint", str(workdir), "--config.eval.batch_size=2"])
    with pytest.raises(Loaded) as loaded:
        eval_command.run(build_parser().parse_args(rest), overrides)
    assert loaded.value.args[0].eval.batch_size == 2
    assert reads.count(workdir / "checkpoints" / "2" / "meta" / "metadata") == 1, reads


# ----------------------------------------------------------------------------------------
# Messages


def test_reason_of_a_tensorstore_error_is_its_status_and_file(tmp_path):
    spec = json.dumps({"driver": "zarr", "kvstore": {"driver": "file", "path": f"{tmp_path}/state/"}})
    cause = ValueError(
        f'OUT_OF_RANGE: Error opening "cast" driver: Error opening "zarr" driver: Error reading "params.w/.zarray" '
        f'in OCDBT database at local file "{tmp_path}/state/": Requested byte range [0, 9) is not valid for value of '
        f"size 4 [tensorstore_spec[1]='{spec}'] [source locations='tensorstore/kvstore/file/store.cc:1']")
    error = Exception("Encountered error while reading array index. See full TensorStore details: "
                      + "\n".join(f"  'line {i}': {spec}," for i in range(1000)))
    error.__cause__ = cause
    assert unreadable_reason(error, tmp_path) == (
        'OUT_OF_RANGE: Error reading "params.w/.zarray" in OCDBT database at local file "state/": '
        "Requested byte range [0, 9) is not valid for value of size 4")
    assert unreadable_reason(KeyError("x")) == "KeyError: 'x'"
    assert len(unreadable_reason(ValueError("x" * 10_000))) == 500


def test_missing_and_wrong_paths_say_what_is_wrong(tmp_path):
    missing = tmp_path / "nowhere"
    for load in (load_checkpoint, load_variables):
        with pytest.raises(CheckpointError, match=f"^{missing}: does not exist$"):
            load(missing)
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "other")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'other'}: not a checkpoint (expected a training workdir")
    assert "checkpoints/<step>/" in message and "`detr-jax convert`" in message


def test_abandoned_reads_print_nothing(workdir):
    """Restoring damaged steps for evaluation (numpy) and for training (jax.Array) prints the
    warnings and nothing else: without the filters, thousands of lines of "Event loop is
    closed" tracebacks and unretrieved TensorStore errors holding whole TensorStore specs."""
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / "2", checkpoints / "3")
    for step in (2, 3):
        for f in (checkpoints / str(step) / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d" and f.stat().st_size > 10_000:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    script = textwrap.dedent(f"""
        import gc, logging, time
        from detr_jax.checkpoints.checkpointer import Checkpointer
        from detr_jax.checkpoints.restore import load_checkpoint
        from detr_jax.runtime.sharding import make_mesh
        from detr_jax.train.trainer import assemble
        logging.basicConfig(level=logging.WARNING)
        _, config = load_checkpoint({str(workdir)!r})
        Checkpointer({str(workdir)!r}).restore_latest(assemble(config, make_mesh(), 1).abstract_state)
        time.sleep(0.5)  # the abandoned reads finish after the restores returned
        gc.collect()  # and their coroutines and futures are collected
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300, check=True)
    assert "Event loop is closed" not in result.stderr
    lines = result.stderr.splitlines()
    warned = [line.split(" is unreadable")[0].rsplit("/", 1)[1] for line in lines
              if line.startswith("WARNING:detr_jax.checkpoints.checkpointer:checkpoint ")]
    assert warned == ["3", "2", "3", "2"] and len(lines) == 4, result.stderr[:5000]
