"""The persistent compilation cache of the `detr-jax` commands: on by default, where the
flag or the environment says, off on request; a second start reads what the first compiled."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import tiny_config
from test_inference import random_variables

from detr_jax.checkpoints.checkpointer import save_variables
from detr_jax.runtime.compilation_cache import ENV_VAR
from detr_jax.models import build_model

COUNTS = re.compile(r"compilation cache (\S+): (\d+) program\(s\) read, (\d+) compiled")


@pytest.fixture(scope="module")
def checkpoint_and_image(tmp_path_factory):
    from PIL import Image
    import numpy as np

    config = tiny_config()
    root = tmp_path_factory.mktemp("cache")
    save_variables(random_variables(build_model(config.model)), root / "ckpt",
                   {"contents": "detr", "model": config.model.to_dict()})
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(root / "a.png")
    return root / "ckpt", root / "a.png"


def predict(checkpoint_and_image, tmp_path, *flags, env=None):
    """Runs `detr-jax [flags] predict` in a fresh process; returns (directory, read, compiled) or None."""
    checkpoint, image = checkpoint_and_image
    result = subprocess.run(
        [sys.executable, "-m", "detr_jax.cli", *flags, "predict", "--checkpoint", str(checkpoint), str(image),
         "--out", str(tmp_path / "out"), "--no_draw", "--config.data.eval_scale=64", "--config.data.eval_max_size=64",
         "--config.data.bucket_shapes=((64, 64),)"],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = COUNTS.search(result.stderr)
    return (found.group(1), int(found.group(2)), int(found.group(3))) if found else None


def test_a_second_start_reads_what_the_first_compiled(checkpoint_and_image, tmp_path):
    cache = tmp_path / "xla"
    directory, read, compiled = predict(checkpoint_and_image, tmp_path, "--compilation_cache", str(cache))
    assert directory == str(cache) and compiled >= 1 and read == 0
    assert any(name.endswith("-cache") for name in os.listdir(cache))
    directory, read, compiled = predict(checkpoint_and_image, tmp_path, "--compilation_cache", str(cache))
    assert read >= 1 and compiled == 0


def test_where_the_cache_is_and_how_to_turn_it_off(checkpoint_and_image, tmp_path):
    env_cache = tmp_path / "from_env"
    assert predict(checkpoint_and_image, tmp_path, env={ENV_VAR: str(env_cache)})[0] == str(env_cache)
    home = tmp_path / "xdg"
    assert predict(checkpoint_and_image, tmp_path, env={ENV_VAR: "", "XDG_CACHE_HOME": str(home)})[0] == \
        str(home / "detr_jax" / "xla")
    assert predict(checkpoint_and_image, tmp_path, "--compilation_cache", "off") is None
