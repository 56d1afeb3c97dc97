"""Training: optimizer groups, schedule, overfitting, sharded and multi-process steps, resume."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, cli_overrides, tiny_config
from detr_jax.checkpoints.checkpointer import latest_step_dir, read_state_as_numpy
from detr_jax.models import build_model, variable_shapes
from detr_jax.train.optim import OFFICIAL_PARAM_RULES, lr_schedule, param_groups
from detr_jax.runtime.sharding import global_batch, make_mesh
from detr_jax.train.trainer import assemble, make_train_step


# Optimizer groups of the official rules: the backbone (and a learned position embedding)
# at 0.1 x lr, everything else at lr.
BACKBONE, MAIN = "lr_x0p1", "lr_x1"
# Official DETR with lr_backbone <= 0 (no backbone training) and a backbone trained from
# scratch (no frozen stem), as rules.
BACKBONE_FROZEN_RULES = ((r"backbone/.*", None), (r"position_embedding/.*", None))
FROM_SCRATCH_RULES = ((r"backbone/.*", 0.1), (r"position_embedding/.*", 0.1))


def fixed_batch(batch_size=4, seed=0, empty=()):
    """A batch of synthetic images from the real pipeline (eval transform, no randomness);
    the images `empty` (indices) without their objects: every target slot padding."""
    from detr_jax.data.pipeline import make_eval_iterator

    config = tiny_config()
    batch = next(make_eval_iterator(config.data, batch_size, 0, 1))
    batch["valid"][list(empty)] = False
    return batch


def _model_and_shapes(config):
    model = build_model(config.model)
    return model, variable_shapes(model)


def test_param_labels_freeze_stem_and_first_stage():
    config = tiny_config()
    _, shapes = _model_and_shapes(config)
    labels = param_groups(shapes["params"], OFFICIAL_PARAM_RULES)
    body = labels["backbone"]["body"]
    assert body["conv1"]["kernel"] == "frozen"
    assert all(v == "frozen" for v in jax.tree.leaves(body["layer1_0"]))
    for stage in ("layer2_0", "layer3_0", "layer4_0"):
        assert all(v == BACKBONE for v in jax.tree.leaves(body[stage]))
    assert labels["class_embed"]["kernel"] == MAIN
    assert labels["query_embed"] == MAIN
    assert all(v == MAIN for v in jax.tree.leaves(labels["transformer"]))
    frozen_all = param_groups(shapes["params"], BACKBONE_FROZEN_RULES)
    assert all(v == "frozen" for v in jax.tree.leaves(frozen_all["backbone"]))
    from_scratch = param_groups(shapes["params"], FROM_SCRATCH_RULES)
    assert all(v == BACKBONE for v in jax.tree.leaves(from_scratch["backbone"]))


def test_param_labels_freeze_the_trainable_stem_norm():
    """With backbone_norm="group_norm" the stem's norm (body/bn1) has parameters; freezing
    the stem freezes them too, and layer2's norms train with the backbone."""
    config = tiny_config(**{"model.backbone_norm": "group_norm"})
    _, shapes = _model_and_shapes(config)
    body = param_groups(shapes["params"], OFFICIAL_PARAM_RULES)["backbone"]["body"]
    assert body["bn1"] == {"scale": "frozen", "bias": "frozen"}
    assert body["layer1_0"]["bn1"] == {"scale": "frozen", "bias": "frozen"}
    assert body["layer2_0"]["bn1"] == {"scale": BACKBONE, "bias": BACKBONE}


def test_learned_position_embedding_lr_group():
    config = tiny_config(**{"model.position_embedding": "learned"})
    _, shapes = _model_and_shapes(config)
    assert param_groups(shapes["params"], OFFICIAL_PARAM_RULES)["position_embedding"]["row_embed"] == BACKBONE
    without_pos_rule = OFFICIAL_PARAM_RULES[:2]  # official DETR's learned_pos_with_backbone=False
    assert param_groups(shapes["params"], without_pos_rule)["position_embedding"]["row_embed"] == MAIN


def test_rules_set_weight_decay_per_parameter():
    """{"lr": a, "weight_decay": b} scales both (RT-DETR's recipe: no decay on norms); with zero
    gradients AdamW's update is the decay alone, -lr * weight_decay * p (tolerance: float32)."""
    from detr_jax.config.errors import ConfigError
    from detr_jax.train.optim import make_optimizer

    params = {"backbone": {"conv": {"kernel": np.full((2,), 2.0, np.float32)}},
              "encoder": {"norm": {"scale": np.full((2,), 2.0, np.float32)}, "proj": {"kernel": np.full((2,), 2.0, np.float32)}}}
    rules = ((r"backbone/.*", {"lr": 0.1}), (r".*/norm/.*", {"weight_decay": 0}))
    groups = param_groups(params, rules)
    assert groups == {"backbone": {"conv": {"kernel": "lr_x0p1"}},  # the plain name: old checkpoints keep theirs
                      "encoder": {"norm": {"scale": "lr_x1_wd_x0"}, "proj": {"kernel": "lr_x1"}}}
    config = tiny_config(**{"train.param_rules": rules, "train.lr": 1e-2, "train.weight_decay": 0.5,
                            "train.clip_max_norm": 0.0})
    optimizer, _ = make_optimizer(config.train, params, 100)
    updates, _ = optimizer.update(jax.tree.map(np.zeros_like, params), optimizer.init(params), params)
    np.testing.assert_allclose(updates["backbone"]["conv"]["kernel"], -1e-3 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["encoder"]["proj"]["kernel"], -1e-2 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["encoder"]["norm"]["scale"], 0.0)
    with pytest.raises(ConfigError, match="not decay"):
        tiny_config(**{"train.param_rules": ((r".*", {"lr": 0.1, "decay": 0}),)})


def test_lr_schedule_step_decay_and_warmup():
    schedule = lr_schedule(1e-4, steps_per_epoch=10, lr_drop_epoch=3)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(29)) == pytest.approx(1e-4)
    assert float(schedule(30)) == pytest.approx(1e-5)
    warm = lr_schedule(1e-4, steps_per_epoch=10, lr_drop_epoch=3, warmup_steps=5)
    assert float(warm(0)) == 0.0
    assert float(warm(2)) == pytest.approx(0.4e-4)
    assert float(warm(5)) == pytest.approx(1e-4)
    # The drop stays at epoch 3 (step 30) whatever the warmup.
    assert float(warm(29)) == pytest.approx(1e-4)
    assert float(warm(30)) == pytest.approx(1e-5)


@pytest.fixture(scope="module")
def one_step():
    """Initial state, the state after one step on a fixed batch, and the step's metrics."""
    config = tiny_config()
    mesh = make_mesh()
    run = assemble(config, mesh, 100)
    state0 = jax.tree.map(np.asarray, run.initial_state(config))
    # Without the frozen mask, as this fixture always was: gradients reach the frozen stem,
    # whose backward turns a NaN image into a NaN gradient (test_non_finite_step_keeps_the_state;
    # the step compiled with the CPU options maps NaN activations to finite ones in the forward).
    step = make_train_step(run.model, run.criterion, run.optimizer, run.lr, mesh)
    batch = fixed_batch()

    state1, metrics = step(jax.device_put(state0), global_batch(batch, mesh))
    return dict(config=config, model=run.model, criterion=run.criterion, optimizer=run.optimizer, lr=run.lr,
                mesh=mesh, step=step, batch=batch, state0=state0, state1=jax.tree.map(np.asarray, state1),
                metrics=jax.device_get(metrics))


def test_one_step_updates_by_group(one_step):
    before, after = one_step["state0"].params, one_step["state1"].params
    body0, body1 = before["backbone"]["body"], after["backbone"]["body"]
    np.testing.assert_array_equal(body1["conv1"]["kernel"], body0["conv1"]["kernel"])  # frozen stem
    np.testing.assert_array_equal(body1["layer1_0"]["conv2"]["kernel"], body0["layer1_0"]["conv2"]["kernel"])
    # Adam's first update is lr * g / (|g| + eps): at most lr per entry (+ weight decay).
    backbone_delta = np.abs(body1["layer3_0"]["conv2"]["kernel"] - body0["layer3_0"]["conv2"]["kernel"]).max()
    main_delta = np.abs(after["class_embed"]["kernel"] - before["class_embed"]["kernel"]).max()
    assert 0.5e-5 < backbone_delta <= 1.01e-5
    assert 0.5e-4 < main_delta <= 1.01e-4
    jax.tree.map(np.testing.assert_array_equal, one_step["state1"].frozen_bn, one_step["state0"].frozen_bn)
    assert int(one_step["state1"].step) == 1
    m = one_step["metrics"]
    assert bool(m["finite"]) and float(m["lr"]) == pytest.approx(1e-4)
    assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0


def test_non_finite_step_keeps_the_state(one_step):
    batch = dict(one_step["batch"])
    # uint8 pixels cannot be NaN: a float image is taken as already normalized.
    batch["image"] = np.full(batch["image"].shape, np.nan, np.float32)

    state, metrics = one_step["step"](jax.device_put(one_step["state0"]), global_batch(batch, one_step["mesh"]))
    assert not bool(metrics["finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), one_step["state0"])


def test_train_step_is_compiled_with_the_cpu_options(one_step, monkeypatch):
    """The CPU options reach XLA: an invalid value makes compiling the step fail."""
    import detr_jax.train.trainer as train_module

    assert train_module.train_compiler_options(one_step["mesh"]) == train_module.CPU_TRAIN_COMPILER_OPTIONS
    monkeypatch.setattr(train_module, "CPU_TRAIN_COMPILER_OPTIONS",
                        {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    step = make_train_step(one_step["model"], one_step["criterion"], one_step["optimizer"], one_step["lr"],
                           one_step["mesh"])
    with pytest.raises(Exception, match="NOT_A_FUSION_TYPE"):
        step(jax.device_put(one_step["state0"]), global_batch(one_step["batch"], one_step["mesh"]))


def test_cpu_options_do_not_change_the_step(one_step, monkeypatch):
    """The step compiled with XLA's default options gives the same loss and update.

    Tolerance: loss and gradient norm to 1e-5 relative (float32 sums in another order);
    parameters to 2 * lr, because Adam's first update is ~lr * sign(g), which flips where a
    gradient entry is ~0.
    """
    import detr_jax.train.trainer as train_module

    monkeypatch.setattr(train_module, "train_compiler_options", lambda mesh: None)
    step = make_train_step(one_step["model"], one_step["criterion"], one_step["optimizer"], one_step["lr"],
                           one_step["mesh"])
    state1, metrics = step(jax.device_put(one_step["state0"]),
                           global_batch(one_step["batch"], one_step["mesh"]))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(metrics[key]), float(one_step["metrics"][key]), rtol=1e-5)
    diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state1.params, one_step["state1"].params)
    assert max(jax.tree.leaves(diff)) <= 2e-4


def test_overfits_one_batch(one_step):
    """The whole training path learns: 100 steps on one batch cut the loss at least 4x.

    (Measured: 12.5 -> 1.85 with dropout 0 and lr 1e-3 for all trained parameters.)
    """
    config = tiny_config(**{"model.dropout": 0.0, "train.lr": 1e-3,
                            "train.param_rules": OFFICIAL_PARAM_RULES[:1]})  # lr_backbone = lr
    run = assemble(config, one_step["mesh"], 1000)
    state, step = run.initial_state(config), run.step

    batch = global_batch(one_step["batch"], one_step["mesh"])
    losses = []
    for _ in range(100):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])


def _run(args, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


# 8 forced CPU devices vs 1, two steps on the global batch BATCH (of 8) of the config
# CONFIG (Python expressions, substituted); it prints both losses and MAXDIFF, the largest
# difference of the parameters, BatchNorm statistics and moving averages; `run`, `state` and
# `mesh` are then the 8 devices'.
SHARDED_STEP = """
import jax, numpy as np, jax.numpy as jnp
from jax.sharding import Mesh
import sys; sys.path.insert(0, "tests")
from conftest import REFINE_TWO_STAGE, tiny_config, tiny_deformable_config, tiny_dino_config
from test_train import fixed_batch
from detr_jax.runtime.sharding import global_batch
from detr_jax.train.trainer import assemble
assert jax.device_count() == 8, jax.devices()
config = CONFIG
batch = BATCH
params = {}
for n in (1, 8):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    run = assemble(config, mesh, 100)
    state = run.initial_state(config)
    for _ in range(2):
        state, metrics = run.step(state, global_batch(batch, mesh))
    params[n] = jax.tree.map(np.asarray, (state.params, state.batch_stats, state.ema))
    print("loss", n, float(metrics["loss"]))
diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[8])))
print("MAXDIFF", diff)
"""


def run_sharded_step(config: str, batch: str = "fixed_batch(batch_size=8)", then: str = "",
                     timeout: int = 400) -> subprocess.CompletedProcess:
    """SHARDED_STEP for the config and batch expressions, followed by the code `then`, in a
    process with 8 forced CPU devices."""
    script = SHARDED_STEP.replace("CONFIG", config).replace("BATCH", batch) + then
    return _run(["-c", script], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, timeout=timeout)


# DETR with trainable BatchNorm in its backbone and a moving average (the statistics are
# the global batch's, as SyncBatchNorm's: per-device statistics of one image each would
# differ by O(1)), and Deformable DETR with box refinement and two-stage proposals (the
# `enc` branch's class-agnostic matching and loss sharded too). Deformable DETR at width 64: at the tiny
# width 32 its neck's GroupNorm(32) has one channel per group, which cancels the input
# projections' biases exactly; their gradient is then rounding noise, which Adam's first
# step (g / (|g| + eps)) turns into steps of up to lr that differ between any two
# summation orders. Two channels per group give those biases a true gradient.
@pytest.mark.parametrize("config", ["tiny_config(**{'model.backbone_norm': 'batch_norm', 'train.ema_decay': 0.9})",
                                    "tiny_deformable_config(REFINE_TWO_STAGE, **{'model.hidden_dim': 64})"],
                         ids=["detr", "deformable_detr"])
def test_sharded_step_equals_single_device(config):
    """8 forced CPU devices vs 1: two steps on the same global batch of 8."""
    result = run_sharded_step(config)
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("MAXDIFF")[1])
    # Tolerance 2e-6 on parameters (Adam steps of lr=1e-4 per entry), BatchNorm statistics
    # and their averages (means and variances of O(1) activations): the sharded program
    # sums the loss over devices in another order; a step that went wrong would differ by
    # ~1e-4 (a whole Adam step) somewhere.
    assert diff < 2e-6, result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_params(workdir: pathlib.Path) -> tuple[int, dict]:
    """(step, {"params", "batch_stats", "ema"}) of the newest checkpoint."""
    step_dir = latest_step_dir(workdir)
    state = read_state_as_numpy(step_dir / "state")
    return int(step_dir.name), {key: state[key] for key in ("params", "batch_stats", "ema")}


def _max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_two_processes_equal_single_process(tmp_path):
    """Two processes x 2 CPU devices (gloo) train like one process with 4 devices."""
    common = ["-m", "detr_jax.cli", "train", "--config", "synthetic_tiny", "--no_progress",
              *cli_overrides(**{"train.num_steps": 3, "train.checkpoint_every_steps": 3,
                                "train.eval_every_epochs": 0})]
    port = _free_port()
    env2 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, *common, "--workdir", str(tmp_path / "multi"),
                               "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                               "--process_id", str(i)], cwd=REPO, env=dict(os.environ, **env2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = _run([*common, "--workdir", str(tmp_path / "single")],
                  {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=500)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-process training did not finish in 500 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert single.returncode == 0, single.stderr[-3000:]
    step_m, multi = _final_params(tmp_path / "multi")
    step_s, ref = _final_params(tmp_path / "single")
    assert step_m == step_s == 3
    # Tolerance 2e-6: the two runs see the same global batches, in a different order along
    # the batch axis (host-interleaved), so sums are reordered; a wrong batch or a missing
    # all-reduce changes parameters by ~1e-4 (an Adam step).
    assert _max_diff(multi, ref) < 2e-6


RESUMABLE_STEPS = 24


def _uninterrupted(config: str, workdir: pathlib.Path, **overrides):
    """The command of a 24-step run of `config` checkpointed every 4 steps, and its
    uninterrupted result: (args, env, (final step, params))."""
    args = ["-m", "detr_jax.cli", "train", "--config", config, "--no_progress",
            *cli_overrides(**{"train.num_steps": RESUMABLE_STEPS, "train.checkpoint_every_steps": 4,
                              "train.eval_every_epochs": 0, "train.keep_checkpoints": 10, **overrides})]
    env = {"JAX_PLATFORMS": "cpu"}
    reference = _run([*args, "--workdir", str(workdir)], env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return args, env, _final_params(workdir)


@pytest.fixture(scope="module")
def resumable_run(tmp_path_factory):
    # synthetic_tiny's own backbone, with trainable BatchNorm: its running statistics and
    # the moving average of parameters and statistics resume bitwise too.
    return _uninterrupted("synthetic_tiny", tmp_path_factory.mktemp("uninterrupted"),
                          **{"model.backbone_norm": "batch_norm", "train.ema_decay": 0.99,
                             "train.ema_warmup_steps": 10})


def _assert_resumed_equals_uninterrupted(workdir, resumable_run):
    args, env, (step_ref, params_ref) = resumable_run
    step_r, params_r = _final_params(workdir)
    assert step_r == step_ref == RESUMABLE_STEPS
    # Bitwise: the same compiled program on the same inputs on CPU is deterministic, and the
    # resumed run restores the exact state, RNG and input position.
    jax.tree.map(np.testing.assert_array_equal, params_r, params_ref)
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, RESUMABLE_STEPS + 1))  # no duplicated steps
    assert (workdir / "loss_curve.png").stat().st_size > 0


def test_killed_run_resumes_to_identical_parameters(tmp_path, resumable_run):
    """SIGKILL after a checkpoint, re-run the same command: same parameters, BatchNorm
    statistics and moving averages as uninterrupted."""
    _, _, (_, reference) = resumable_run
    stats = jax.tree.leaves(reference["batch_stats"])
    assert stats and len(jax.tree.leaves(reference["ema"])) == len(jax.tree.leaves(reference["params"])) + len(stats)
    _kill_after_a_checkpoint_and_resume(tmp_path / "killed", resumable_run)


def test_killed_deformable_run_resumes_to_identical_parameters(tmp_path):
    """The same for Deformable DETR with box refinement and two-stage proposals: its
    per-layer heads, encoder proposals and `enc` branch resume bitwise too."""
    run = _uninterrupted("configs/synthetic_deformable_tiny.py", tmp_path / "uninterrupted",
                         **{"model.transformer_args": {"with_box_refine": True, "two_stage": True}})
    # Every branch of its loss is logged, and finite.
    lines = [json.loads(line) for line in (tmp_path / "uninterrupted" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss_bbox_enc" in line]
    assert train_lines, lines
    for key in ("loss", "loss_ce", "loss_ce_0", "loss_bbox", "loss_giou_0", "loss_ce_enc", "loss_giou_enc"):
        assert np.isfinite(train_lines[-1][key]), key
    _kill_after_a_checkpoint_and_resume(tmp_path / "killed", run)


def _kill_after_a_checkpoint_and_resume(workdir: pathlib.Path, resumable_run):
    args, env, _ = resumable_run
    proc = subprocess.Popen([sys.executable, *args, "--workdir", str(workdir)], cwd=REPO,
                            env=dict(os.environ, **env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    first = workdir / "checkpoints" / "4"
    while not first.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_dir(), "no checkpoint appeared before the kill"
    killed_at, _ = _final_params(workdir)
    assert killed_at < RESUMABLE_STEPS, "the run finished before it was killed; nothing was tested"

    resumed = _run([*args, "--workdir", str(workdir)], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {killed_at}" in resumed.stderr
    _assert_resumed_equals_uninterrupted(workdir, resumable_run)


def _logged_steps(workdir: pathlib.Path) -> int:
    path = workdir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _interrupt(args, env, workdir, signum, after_steps: int):
    """Runs the command and sends `signum` once it has logged more than `after_steps` steps;
    returns (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, *args, "--workdir", str(workdir)], cwd=REPO, text=True,
                            env=dict(os.environ, **env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _logged_steps(workdir) <= after_steps and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def test_sigint_and_sigterm_stop_after_a_checkpoint_and_resume_to_identical_parameters(tmp_path, resumable_run):
    """Ctrl-C, then (on the resumed run) a scheduler's SIGTERM: each finishes its step, writes
    a checkpoint and exits with one line; the run resumed twice ends as the uninterrupted one."""
    args, env, _ = resumable_run
    workdir = tmp_path / "interrupted"
    stopped_at = 0
    for signum, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
        code, stderr = _interrupt(args, env, workdir, signum, after_steps=stopped_at)
        assert code == 128 + signum, stderr[-3000:]
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
        step, _ = _final_params(workdir)
        assert stopped_at < step < RESUMABLE_STEPS, "the run finished before the signal; nothing was tested"
        assert f"detr-jax train: stopped by {name} after step {step}; checkpoint written to" in stderr
        assert _logged_steps(workdir) == step  # every step trained was logged and checkpointed
        stopped_at = step
    resumed = _run([*args, "--workdir", str(workdir)], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stderr
    _assert_resumed_equals_uninterrupted(workdir, resumable_run)


def test_a_second_signal_exits_at_once():
    """The second Ctrl-C does not wait for the step: the process exits with status 130."""
    script = ("import os, signal, time\n"
              "from detr_jax.runtime.stop_request import StopRequest\n"
              "with StopRequest() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(0.2)\n"
              "    assert stop.requested == 'SIGINT', stop.requested\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(30)\n"
              "print('still running')\n")
    start = time.time()
    result = _run(["-c", script], timeout=60)
    assert result.returncode == 130, result.stderr
    assert time.time() - start < 20 and "still running" not in result.stdout
    assert "SIGINT again: exiting now" in result.stderr


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    """A diverging run (absurd lr) stops with a clear error; its finished checkpoint stays readable."""
    from detr_jax.train.trainer import TrainingError, train

    config = tiny_config(**{"train.num_steps": 6, "train.checkpoint_every_steps": 1, "train.lr": 1e30,
                            "train.eval_every_epochs": 0, "train.log_every_steps": 10})
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 2") as error:
        train(config, tmp_path, show_progress=False)
    assert str(tmp_path) in str(error.value)
    step, params = _final_params(tmp_path)
    assert step == 1  # step 2 was never checkpointed
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_training_loop_waits_for_each_step_on_cpu(tmp_path, monkeypatch):
    """On CPU the loop finishes each step before queueing the next one (faster there: the
    host's cores are the device's); on accelerators it dispatches ahead."""
    import types

    import detr_jax.train.trainer as train_module

    assert not train_module.dispatch_ahead(make_mesh())
    gpu_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
    assert train_module.dispatch_ahead(gpu_mesh)

    waited_for_steps = []
    block_until_ready = jax.block_until_ready

    def recording_block_until_ready(x):
        if isinstance(x, dict) and {"loss", "finite"} <= set(x):
            waited_for_steps.append(x)
        return block_until_ready(x)

    monkeypatch.setattr(train_module.jax, "block_until_ready", recording_block_until_ready)
    config = tiny_config(**{"train.num_steps": 3, "train.eval_every_epochs": 0, "train.log_every_steps": 10})
    train_module.train(config, tmp_path, show_progress=False)
    assert len(waited_for_steps) == 3


def test_init_from_overlays_a_backbone_checkpoint(tmp_path, one_step):
    """train.init_from lays a (converted, backbone-only) checkpoint over fresh variables."""
    from detr_jax.checkpoints.checkpointer import save_variables
    from detr_jax.train.trainer import initial_variables

    state0 = one_step["state0"]
    pretrained = {"params": {"backbone": jax.tree.map(lambda x: x + 1.0, state0.params["backbone"])},
                  "frozen_bn": {"backbone": state0.frozen_bn["backbone"]}}
    save_variables(pretrained, tmp_path / "resnet", {"contents": "backbone"})
    config = tiny_config(**{"train.init_from": str(tmp_path / "resnet")})
    fresh = initial_variables(tiny_config(), one_step["model"], jax.random.PRNGKey(0))
    merged = initial_variables(config, one_step["model"], jax.random.PRNGKey(0))
    jax.tree.map(np.testing.assert_array_equal, merged["params"]["backbone"], pretrained["params"]["backbone"])
    jax.tree.map(np.testing.assert_array_equal, merged["params"]["transformer"], fresh["params"]["transformer"])


def test_gradient_accumulation_updates_every_k_steps(one_step):
    from detr_jax.train.trainer import train_state_from_variables

    """And the moving average (train.ema_decay) moves once per optimizer update, by RT-DETR's
    warmed-up decay (tolerance: float32 rounding of d * a + (1 - d) * b, 1e-6 relative)."""
    config = tiny_config(**{"train.grad_accum_steps": 2, "train.ema_decay": 0.9, "train.ema_warmup_steps": 3})
    state0 = one_step["state0"]
    run = assemble(config, one_step["mesh"], 100)
    state = train_state_from_variables(state0.variables, run.optimizer, one_step["mesh"], state0.rng, ema=True)
    step = run.step
    batch = global_batch(one_step["batch"], one_step["mesh"])
    state1, _ = step(state, batch)
    head0 = state0.params["class_embed"]["kernel"]
    np.testing.assert_array_equal(np.asarray(state1.params["class_embed"]["kernel"]), head0)  # accumulated only
    np.testing.assert_array_equal(np.asarray(state1.ema["params"]["class_embed"]["kernel"]), head0)
    state2, _ = step(state1, batch)
    head2 = np.asarray(state2.params["class_embed"]["kernel"])
    delta = np.abs(head2 - head0).max()
    assert 0.5e-4 < delta <= 1.01e-4  # one Adam step of lr 1e-4 after 2 micro-steps
    d = 0.9 * (1 - np.exp(-1 / 3))  # after the first update
    np.testing.assert_allclose(np.asarray(state2.ema["params"]["class_embed"]["kernel"]), d * head0 + (1 - d) * head2,
                               rtol=1e-6, atol=1e-7)
    assert state2.eval_variables["params"] is state2.ema["params"]


def test_default_train_command_smoke(tmp_path):
    """The README's main job, `detr-jax train` on the default config, for a few steps: the
    benchmarked learning run (docs/BENCHMARKS.md) is this command with more steps."""
    workdir = tmp_path / "run"
    result = _run(["-m", "detr_jax.cli", "train", "--workdir", str(workdir), "--no_progress",
                   "--config.train.num_steps=3", "--config.train.log_every_steps=1"], {"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    # The run ends with an evaluation on the held-out split and a checkpoint.
    final_eval = [r for r in rows if "eval_AP50" in r]
    assert final_eval and final_eval[-1]["step"] == 3 and 0.0 <= final_eval[-1]["eval_AP50"] <= 1.0
    assert (workdir / "checkpoints" / "3").is_dir()
    assert (workdir / "loss_curve.png").stat().st_size > 0
    assert any((workdir / "eval_samples").iterdir())
