"""The shared tiny config of the tests: `tiny_config(**overrides)`.

A very small model (width 32, 1+2 layers, 6 queries) on 64x64 synthetic images in one
bucket, so a process compiles its train step once; the official model and optimizer
(frozen BN, official parameter rules) rather than synthetic_tiny's from-scratch recipe.
Subprocess workers import it as `from conftest import tiny_config` (tests/ on sys.path);
`run_worker` starts one and `record_host_matching` lets it count the matching callbacks.
Files whose measured tolerances depend on other shapes (test_evaluate, test_inference,
the data tests) pass their own overrides.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from detr_jax.runtime.compilation_cache import ENV_VAR
from detr_jax.config import load_config
from detr_jax.train.optim import OFFICIAL_PARAM_RULES

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "model.hidden_dim": 32, "model.num_heads": 2, "model.num_encoder_layers": 1,
    "model.num_decoder_layers": 2, "model.dim_feedforward": 64, "model.num_queries": 6,
    "data.synthetic_train_examples": 64, "data.synthetic_eval_examples": 8,
    "data.synthetic_image_size": (64, 64), "data.train_scales": (64,), "data.train_max_size": 64,
    "data.crop_scales": (64,), "data.crop_size": (48, 64), "data.eval_scale": 64,
    "data.eval_max_size": 64, "data.bucket_shapes": ((64, 64),), "data.max_boxes": 4,
    "train.batch_size": 4, "train.log_every_steps": 1,
    # The official model and optimizer (synthetic_tiny itself trains its whole backbone from
    # scratch, with GroupNorm, a higher lr and warmup).
    "model.backbone_norm": "frozen_bn", "train.lr": 1e-4, "train.param_rules": OFFICIAL_PARAM_RULES,
    "train.warmup_steps": 0, "model.dropout": 0.1,
}


def tiny_config(**overrides):
    """configs/synthetic_tiny.py with TINY_OVERRIDES, then `overrides` ({"train.num_steps": 3})."""
    return load_config(REPO / "configs" / "synthetic_tiny.py", {**TINY_OVERRIDES, **overrides})


# Box refinement with two-stage proposals: every part of Deformable DETR (per-layer heads,
# the encoder proposals and their `enc` branch) in one model.
REFINE_TWO_STAGE = {"with_box_refine": True, "two_stage": True}


def tiny_deformable_config(transformer_args: dict | None = None, **overrides):
    """configs/synthetic_deformable_tiny.py with TINY_OVERRIDES (width 32, 2 heads, 1+2
    layers, 6 queries, 64x64 images; its 4 levels are then 8x8, 4x4, 2x2, 1x1 cells), its
    model.transformer_args updated with `transformer_args`, then `overrides`."""
    args = {"num_feature_levels": 4, **(transformer_args or {})}
    # The official rules, and the member's own: offsets and reference points at 0.1 x lr.
    rules = OFFICIAL_PARAM_RULES + ((r".*/sampling_offsets/.*", 0.1), (r"reference_points/.*", 0.1))
    return load_config(REPO / "configs" / "synthetic_deformable_tiny.py",
                       {**TINY_OVERRIDES, "model.transformer_args": args, "train.param_rules": rules, **overrides})


def tiny_dino_config(transformer_args: dict | None = None, **overrides):
    """configs/synthetic_dino_tiny.py with TINY_OVERRIDES (the sizes of
    tiny_deformable_config: 4 levels of 8x8 .. 1x1 cells), 2 sampling points per head and
    level, dn_number 8 (2 denoising groups of data.max_boxes = 4), model.transformer_args
    updated with `transformer_args`, then `overrides`."""
    args = {"num_feature_levels": 4, "encoder_n_points": 2, "decoder_n_points": 2, "dn_number": 8,
            **(transformer_args or {})}
    return load_config(REPO / "configs" / "synthetic_dino_tiny.py",
                       {**TINY_OVERRIDES, "model.transformer_args": args, **overrides})


def cli_overrides(**overrides) -> list[str]:
    """The same as `--config.KEY=VALUE` arguments of `detr-jax`."""
    return [f"--config.{k}={v!r}" if not isinstance(v, str) else f"--config.{k}={v}"
            for k, v in {**TINY_OVERRIDES, **overrides}.items()]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_of_the_session():
    """The `detr-jax` commands the tests run (in subprocesses and in-process) share one
    persistent compilation cache for the session, not the user's ~/.cache."""
    if os.environ.get(ENV_VAR):
        yield os.environ[ENV_VAR]
        return
    directory = tempfile.mkdtemp(prefix="detr_jax_xla_")
    os.environ[ENV_VAR] = directory
    yield directory
    del os.environ[ENV_VAR]
    shutil.rmtree(directory, ignore_errors=True)


def run_worker(script: pathlib.Path, timeout_s: int, what: str) -> dict:
    """Runs a tests/*_worker.py on CPU in a subprocess of its own (it sets XLA_FLAGS before
    importing jax) and returns the JSON of its one line starting with "RESULT "; a timeout
    fails the test instead of hanging the suite."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout_s,
                              env=env, cwd=script.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {timeout_s} s (a deadlock?)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def record_host_matching() -> list[list[int]]:
    """From now on every host Hungarian callback (`matcher.assign_on_host`) appends the
    shape of its cost array to the returned list: one entry per device per step when the
    matching runs per device."""
    from detr_jax.criterion import matcher  # pylint: disable=import-outside-toplevel

    shapes, original = [], matcher.assign_on_host

    def recording(cost, valid):
        shapes.append(list(np.asarray(cost).shape))
        return original(cost, valid)

    matcher.assign_on_host = recording
    return shapes
