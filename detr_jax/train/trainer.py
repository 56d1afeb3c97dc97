"""Training: one assembly (model, criterion, optimizer, step, state) and the loop.

`assemble(config, mesh, ...)` is the one place that builds a run's model, criterion,
optimizer, schedule, train step and abstract state; `train()`, the scripts and the tests
call it. One jitted step over a Mesh whose "data" axis spans every device of every
process (detr_jax.runtime.sharding): parameters and optimizer state replicated or sharded
(`train.param_sharding`, laid out by `sharding.state_sharding`), the batch split along its
first axis, the matching run per device on its shard.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import signal
import time
from typing import Any, Callable

import flax
from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detr_jax.runtime import sharding
from detr_jax.checkpoints.checkpointer import Checkpointer, abstract_like, merge_variables
from detr_jax.config.defaults import AUTO
from detr_jax.config.run_contract import check_resume, record_run_config
from detr_jax.data.checks import check_category_ids, check_max_boxes, describe
from detr_jax.data.pipeline import make_source, make_train_iterator
from detr_jax.data.records import DetectionSource
from detr_jax.runtime.host_memory import release_freed_memory, retain_freed_memory
from detr_jax.criterion.losses import SetCriterion
from detr_jax.runtime.metrics_writer import MetricsWriter
from detr_jax.models import build_class_convention, build_model, init_variables, variable_shapes
from detr_jax.train.optim import frozen_mask, make_optimizer
from detr_jax.checkpoints.restore import checkpoint_variables
from detr_jax.runtime.stop_request import StopRequest
from detr_jax.runtime.workdir_lock import held_by_run

log = logging.getLogger(__name__)


# XLA:CPU compiler options for the train step: hand convolutions, single dots, elementwise
# fusions and reductions to YNNPACK, which made the R50 step faster and inference slower
# (docs/BENCHMARKS.md), so only the train step uses them, and only when compiling for CPU.
# They also map NaN activations to finite ones (a ReLU of NaN is 0 there), so a NaN input
# image does not make the loss non-finite: bad numbers are caught from the gradient.
CPU_TRAIN_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": ",".join(
        f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("INDIVIDUAL_CONVOLUTION", "INDIVIDUAL_DOT", "ELTWISE", "REDUCE")),
}


def on_cpu(mesh: Mesh) -> bool:
    """Whether `mesh`'s devices are the host's CPU cores."""
    return mesh.devices.flat[0].platform == "cpu"


def train_compiler_options(mesh: Mesh) -> dict | None:
    """XLA options for the train step on `mesh`'s platform (None: XLA's defaults)."""
    return dict(CPU_TRAIN_COMPILER_OPTIONS) if on_cpu(mesh) else None


def dispatch_ahead(mesh: Mesh) -> bool:
    """Whether the training loop queues the next step before the current one has finished.

    On accelerators it does: the host prepares batch N+1 while the device runs step N. On
    CPU the "device" is the host's own cores, so running ahead gains nothing, and it was
    measured slower (scripts/bench_train_loop.py, docs/BENCHMARKS.md).
    """
    return not on_cpu(mesh)


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad init checkpoint, ...)."""


class TrainingInterrupted(Exception):
    """Training stopped on a SIGINT/SIGTERM after writing the checkpoint of step `step`.

    signal_name: "SIGINT" or "SIGTERM" (None: the signal came to another process).
    exit_code: the shell's convention for a process ended by that signal (128 + its number).
    """

    def __init__(self, signal_name: str | None, step: int, checkpoint: pathlib.Path):
        by = signal_name or "a signal to another process"
        super().__init__(f"stopped by {by} after step {step}; checkpoint written to {checkpoint}; "
                         "run the same command to resume")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = 128 + int(signal.Signals[signal_name or "SIGTERM"])


@flax.struct.dataclass
class TrainState:
    """Everything a step changes or needs, as one pytree (checkpointed whole).

    step: int32 scalar, micro-steps done; params: trainable variables (float32);
    frozen_bn: frozen BatchNorm values (never updated); batch_stats: the running statistics
    of trainable BatchNorms, updated by every step ({} for models without them);
    opt_state: optax state; rng: uint32 [2] PRNG key, folded with the step for each step's
    dropout; ema: the moving average {"params", "batch_stats"} of `train.ema_decay`, or {}.
    """

    step: jax.Array
    params: Any
    frozen_bn: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    ema: Any

    @property
    def variables(self) -> dict:
        """The model's variables as trained: {"params", "frozen_bn", "batch_stats"}."""
        return {"params": self.params, "frozen_bn": self.frozen_bn, "batch_stats": self.batch_stats}

    @property
    def eval_variables(self) -> dict:
        """What evaluation and inference use: the moving average where there is one."""
        return dict(self.variables, **self.ema) if self.ema else self.variables


# ----------------------------------------------------------------------------- state


def initial_variables(config: ml_collections.ConfigDict, model: nn.Module, rng: jax.Array) -> dict:
    """Fresh variables, overlaid with `train.init_from` (a converted checkpoint or a training
    run) if set, except the parameters `train.init_exclude` names (they keep their fresh
    values)."""
    variables = init_variables(model, rng)
    t = config.train
    if t.init_from:
        pretrained = traverse_util.flatten_dict(checkpoint_variables(t.init_from))
        excluded = [re.compile(pattern) for pattern in t.init_exclude]
        kept = {path: value for path, value in pretrained.items()
                if not any(p.fullmatch("/".join(path[1:])) for p in excluded)}  # path[0]: the collection
        variables = merge_variables(variables, traverse_util.unflatten_dict(kept), source=t.init_from)
        skipped = sorted({"/".join(path[1:-1]) for path in pretrained.keys() - kept.keys()})
        log.info("initialized from %s%s", t.init_from,
                 f" except {', '.join(skipped)} (train.init_exclude)" if skipped else "")
    return variables


def create_train_state(config, model, optimizer, mesh: Mesh, shardings=None) -> TrainState:
    """Initial train state (from `config.seed`), laid out by `shardings` (see
    `train_state_from_variables`)."""
    init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    return train_state_from_variables(initial_variables(config, model, init_rng), optimizer, mesh, dropout_rng,
                                      shardings, ema=config.train.ema_decay > 0)


def new_train_state(variables: dict, optimizer, rng: jax.Array, ema: bool) -> TrainState:
    """The step-0 TrainState of `variables` (not placed on devices)."""
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        frozen_bn=variables["frozen_bn"],
        batch_stats=batch_stats,
        opt_state=optimizer.init(variables["params"]),
        rng=rng,
        # A copy: the step donates the state, and one buffer cannot be donated twice.
        ema=jax.tree.map(jnp.copy, {"params": variables["params"], "batch_stats": batch_stats}) if ema else {},
    )


def train_state_from_variables(variables: dict, optimizer, mesh: Mesh, rng: jax.Array,
                               shardings=None, ema: bool = False) -> TrainState:
    """Step-0 train state of `variables` ({"params", "frozen_bn"[, "batch_stats"]}) on `mesh`.

    shardings: a NamedSharding per leaf of the state (`Assembly.state_sharding`, from
    `sharding.state_sharding`); None: replicated over `mesh`. ema: start a moving average
    (equal to the variables, as RT-DETR's ModelEMA starts).
    """
    state = new_train_state(variables, optimizer, rng, ema)
    return jax.device_put(state, sharding.replicated(mesh) if shardings is None else shardings)


# ----------------------------------------------------------------------------- step


def stop_frozen_gradients(params, frozen):
    """`params` with a stop_gradient on every leaf `frozen` (a bool tree like params) marks."""
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)


def ema_decay(updates: jax.Array, decay: float, warmup_steps: int) -> jax.Array:
    """RT-DETR's ModelEMA decay after `updates` optimizer updates: decay * (1 - exp(-updates / warmup))."""
    return decay * (1 - jnp.exp(-updates.astype(jnp.float32) / warmup_steps))


def make_train_step(model: nn.Module, criterion: SetCriterion, optimizer, lr: optax.Schedule, mesh: Mesh,
                    accum_steps: int = 1, frozen=None, state_sharding=None, ema: tuple[float, int] | None = None
                    ) -> Callable:
    """The jitted step: (state, batch) -> (state, metrics).

    `state_sharding`: a NamedSharding per leaf of the state (`Assembly.state_sharding`);
    None: replicated. The step's state comes in and goes out with it; a sharded state's
    parameters are gathered where the step uses them by XLA's SPMD partitioner.

    `frozen` (a bool tree like params, see `frozen_mask`) marks parameters that are never
    trained: no gradient is computed for them, so XLA drops the backward pass through the
    frozen stem and first stage (as PyTorch does for requires_grad=False), which is most
    of the backward's cost at full resolution.

    Trainable BatchNorms (a non-empty `state.batch_stats`) normalize with the statistics
    of the step's global batch and their running statistics are updated; `ema` (decay,
    warm-up steps) updates the state's moving average after every optimizer update.

    The state is donated. A step whose loss or gradient is not finite leaves the state
    unchanged (and reports it in `metrics["finite"]`), so the caller can stop with the
    last good state intact.
    """
    replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    state_sharding = replicated if state_sharding is None else state_sharding

    def step_fn(state: TrainState, batch: dict):
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            if frozen is not None:
                params = stop_frozen_gradients(params, frozen)
            # The detector interface's training inputs: the padded targets, and an rng for
            # queries made from them (denoising); DETR uses neither.
            targets = {key: batch[key] for key in ("labels", "boxes", "valid")}
            rngs = {"dropout": dropout_rng, "queries": jax.random.fold_in(dropout_rng, 1)}
            variables = dict(state.variables, params=params)
            args = (variables, batch["image"], batch["mask"])
            kwargs = dict(train=True, targets=targets, rngs=rngs)
            if not state.batch_stats:
                outputs, batch_stats = model.apply(*args, **kwargs), state.batch_stats
            else:
                outputs, updated = model.apply(*args, **kwargs, mutable=["batch_stats"])
                batch_stats = updated["batch_stats"]
            loss, metrics = criterion(outputs, batch)
            return loss, (metrics, batch_stats)

        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        if ema is not None:
            # One update of the average per optimizer update (every accum_steps micro-steps).
            done_updates = (state.step + 1) // accum_steps
            d = ema_decay(done_updates, *ema)
            averaged = jax.tree.map(lambda e, v: d * e + (1 - d) * v, state.ema,
                                    {"params": params, "batch_stats": batch_stats})
            if accum_steps > 1:  # a micro-step between updates keeps the average
                updated_now = (state.step + 1) % accum_steps == 0
                averaged = jax.tree.map(lambda a, e: jnp.where(updated_now, a, e), averaged, state.ema)
            new_state = new_state.replace(ema=averaged)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite,
                       lr=lr(state.step // accum_steps).astype(jnp.float32))
        return new_state, metrics

    return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0,
                   compiler_options=train_compiler_options(mesh))


def compile_step(step: Callable, state: TrainState, batch: dict) -> jax.stages.Compiled:
    """Compiles `step` for `batch`'s shapes before it first runs, then gives the memory the
    compiler freed back to the system (`host_memory.release_freed_memory`). Returns the
    compiled step (its `memory_analysis()` is XLA's account of the step's buffers).

    glibc keeps that memory in the arenas of the compiling threads, where the step's buffers
    do not fit, so it would add to the process's peak (docs/BENCHMARKS.md, "Where the
    training step's memory goes"). The step's next call reuses the compiled program.
    """
    compiled = step.lower(state, batch).compile()
    release_freed_memory()
    return compiled


# ----------------------------------------------------------------------------- assembly


@dataclasses.dataclass(frozen=True)
class Assembly:
    """Everything one training run is built from (see `assemble`).

    model, criterion, optimizer, lr (the main lr schedule), frozen (bool tree like params:
    never trained), variable_shapes (of the model's variables), abstract_state (the
    TrainState's shapes with their shardings: what a checkpoint restores into),
    state_sharding (a NamedSharding per leaf of the state, `train.param_sharding`), step
    (the jitted train step) and mesh.
    """

    model: nn.Module
    criterion: SetCriterion
    optimizer: optax.GradientTransformation
    lr: optax.Schedule
    frozen: Any
    variable_shapes: Any
    abstract_state: TrainState
    state_sharding: Any
    step: Callable
    mesh: Mesh

    def initial_state(self, config: ml_collections.ConfigDict) -> TrainState:
        """The step-0 state (from `config.seed`, overlaid with train.init_from), laid out by
        `state_sharding`."""
        return create_train_state(config, self.model, self.optimizer, self.mesh, self.state_sharding)


def assemble(config: ml_collections.ConfigDict, mesh: Mesh, updates_per_epoch: int,
             model: nn.Module | None = None) -> Assembly:
    """Builds model, criterion, optimizer, schedule, train step and abstract state.

    Args:
      config: the full config (model, loss and train sections are read).
      mesh: the devices; the criterion's matcher runs per device over its data axis.
      updates_per_epoch: optimizer updates per epoch (for the lr drop epoch).
      model: the model to train instead of `build_model(config.model)` (e.g. with other weights' dtype).
    """
    t = config.train
    model = build_model(config.model) if model is None else model
    criterion = SetCriterion.from_config(config.loss, config.model.num_classes, mesh=mesh,
                                         classes=build_class_convention(config))
    shapes = variable_shapes(model)
    optimizer, lr = make_optimizer(t, shapes["params"], updates_per_epoch)
    frozen = frozen_mask(shapes["params"], t.param_rules)
    abstract_state = abstract_train_state(shapes, optimizer, ema=t.ema_decay > 0)
    state_sharding = sharding.state_sharding(abstract_state, mesh, t.param_sharding, t.fsdp_min_mib)
    step = make_train_step(model, criterion, optimizer, lr, mesh, t.grad_accum_steps, frozen=frozen,
                           state_sharding=state_sharding,
                           ema=(t.ema_decay, t.ema_warmup_steps) if t.ema_decay > 0 else None)
    return Assembly(model=model, criterion=criterion, optimizer=optimizer, lr=lr, frozen=frozen,
                    variable_shapes=shapes, abstract_state=abstract_like(abstract_state, state_sharding),
                    state_sharding=state_sharding, step=step, mesh=mesh)


# ----------------------------------------------------------------------------- loop


@dataclasses.dataclass
class Plan:
    """How long the run is: micro-steps in total and per epoch."""

    steps_per_epoch: int
    total_steps: int

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def should_eval(self, done: int, every_epochs: int) -> bool:
        """After every `every_epochs` epochs and after the last step; never if every_epochs is 0."""
        if every_epochs <= 0:
            return False
        return done == self.total_steps or done % (self.steps_per_epoch * every_epochs) == 0


def make_plan(config: ml_collections.ConfigDict, num_train_examples: int) -> Plan:
    t = config.train
    steps_per_epoch = max(1, num_train_examples // t.batch_size)
    total = t.num_steps if t.num_steps > 0 else t.epochs * steps_per_epoch
    return Plan(steps_per_epoch=steps_per_epoch, total_steps=total)


CLUSTER_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def distributed_init(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, force: bool = False) -> None:
    """Starts jax.distributed when launched as several processes.

    With explicit arguments (a CPU cluster on one machine, say), with `force` (TPU pods:
    `jax.distributed.initialize()` detects its peers), or when the environment names a
    cluster (CLUSTER_ENV_VARS). On CPU the cross-process collectives use gloo.
    """
    if coordinator is None and not force and not any(k in os.environ for k in CLUSTER_ENV_VARS):
        return
    # Only the CPU backend's cross-process collectives are affected (none exist by default).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator is not None:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def _host_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def resolve_num_classes(config: ml_collections.ConfigDict, source: DetectionSource) -> None:
    """Sets `model.num_classes="auto"` to the training source's largest category id + 1."""
    if config.model.num_classes == AUTO:
        config.model.num_classes = source.num_classes
        log.info("model.num_classes=auto: %d (the largest category id + 1 of %s)", source.num_classes,
                 describe(source))


def _agree_to_stop(stop: StopRequest, done: int, log_every: int) -> bool:
    """Whether every process stops after step `done`. Alone, a process stops after the step
    its signal came in; with several, they agree at the next logging step (one tiny
    allgather there, where the loop waits for the device anyway) so that none is left
    waiting in a collective for the others."""
    if jax.process_count() == 1:
        return stop.requested is not None
    if done % log_every:
        return False
    return bool(np.max(multihost_utils.process_allgather(np.int32(stop.requested is not None))))


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          eval_fn: Callable | None = None, show_progress: bool = True,
          source: DetectionSource | None = None) -> dict:
    """Trains `config` into `workdir`, resuming from its newest checkpoint if there is one.

    `source`: the training source if already built from `config.data` (the command line
    builds it to resolve `model.num_classes="auto"` before building `eval_fn`).

    The run holds the workdir (`detr_jax.runtime.workdir_lock`) from its first write to its end. A
    resumed run's config must fit the checkpoint's (`detr_jax.config.run_contract`): the
    workdir's config.json is the config the run started with, config_history.json the
    changes accepted since.

    The first SIGINT or SIGTERM finishes the current step, writes a checkpoint and raises
    TrainingInterrupted; a second one exits at once (`detr_jax.runtime.stop_request`). Every step
    that is evaluated is checkpointed first, so a failing evaluation loses no training.

    Returns the final host metrics (last logged train metrics plus the last evaluation).
    Raises:
      DataError: the data does not fit the config (category ids beyond model.num_classes, ...).
      WorkdirInUse: another run holds the workdir (nothing is written).
      ResumeRefused: the config changes what the run's checkpoints hold or mean (see above).
      TrainingError: a non-finite step (the last good checkpoint is kept).
      TrainingInterrupted: stopped by a signal, after writing a checkpoint.
    """
    workdir = pathlib.Path(workdir)
    t = config.train
    if config.model.masks and "masks" not in config.loss.losses:
        # Without the term nothing reads pred_masks: the mask head would only be weight-decayed.
        raise TrainingError("model.masks=True: add 'masks' to loss.losses (and set data.masks=True) to train "
                            "the mask head; configs/synthetic_panoptic_tiny.py shows the recipe")
    if t.batch_size % jax.device_count():
        raise TrainingError(
            f"train.batch_size={t.batch_size} is not divisible by the {jax.device_count()} devices")
    source = make_source(config.data, "train") if source is None else source
    resolve_num_classes(config, source)
    check_category_ids(source, config.model.num_classes)
    check_max_boxes(source, config.data.max_boxes)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    with held_by_run(workdir):
        return _train_in_held_workdir(config, workdir, eval_fn, show_progress, source)


def _train_in_held_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path, eval_fn: Callable | None,
                           show_progress: bool, source: DetectionSource) -> dict:
    """`train`, in a workdir this run holds, with a checked config and its training source."""
    t = config.train
    is_main = jax.process_index() == 0
    if t.retain_host_memory:
        retain_freed_memory()
    mesh = sharding.make_mesh()
    plan = make_plan(config, len(source))
    run = assemble(config, mesh, max(1, plan.steps_per_epoch // t.grad_accum_steps))

    # A mask head's training leaves the (frozen) detector's AP as it is: keep the best PQ.
    best_metric = "PQ" if "masks" in config.loss.losses else "AP"
    checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints, best_metric=best_metric)
    data_iter = make_train_iterator(config.data, t.batch_size, config.seed, source=source)
    # A config the checkpoints cannot take or that changes their steps' meaning is refused
    # before any state is read (orbax would report only shape errors, for every checkpoint).
    restored = checkpointer.restore_latest(run.abstract_state,
                                           check_meta=lambda meta: check_resume(meta["config"], config, str(workdir)))
    if is_main:
        record_run_config(workdir, config, None if restored is None else restored[2])
    if restored is None:
        state = run.initial_state(config)
        log.info("starting from scratch: %d steps (%d per epoch)", plan.total_steps, plan.steps_per_epoch)
    else:
        state, data_state, meta = restored
        data_iter.set_state(data_state)
        log.info("resumed from step %d of %d", meta["step"], plan.total_steps)
    start_step = int(state.step)
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step)

    def meta(step):
        return {"step": step, "epoch": plan.epoch(step), "config": config.to_dict()}

    last_metrics: dict = {}
    pending = []  # device metrics of the steps since the last flush
    window = {"start": time.perf_counter(), "images": 0}

    def flush(done: int) -> None:
        """Checks the pending steps are finite and logs their mean (process 0 writes)."""
        nonlocal pending, last_metrics
        if not pending:
            return
        host = [_host_metrics(m) for m in pending]
        pending = []
        if not all(m["finite"] for m in host):
            bad = next(i for i, m in enumerate(host) if not m["finite"])
            raise TrainingError(
                f"non-finite loss or gradient at step {done - len(host) + bad + 1} "
                f"(loss={host[bad]['loss']}, grad_norm={host[bad]['grad_norm']}); the state of the last "
                f"finite step is kept and the last good checkpoint in {workdir} is intact")
        elapsed = time.perf_counter() - window["start"]
        last_metrics = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "finite"}
        last_metrics.update(step=done, epoch=plan.epoch(done - 1), images_per_sec=window["images"] / elapsed,
                            step_time=elapsed / len(host),
                            **{f"data_{k}": v for k, v in data_iter.stats.as_dict().items()})
        writer.write(done, last_metrics)
        progress.set_postfix(loss=f"{last_metrics['loss']:.3f}", step_s=f"{last_metrics['step_time']:.3f}")
        window.update(start=time.perf_counter(), images=0)

    ahead = dispatch_ahead(mesh)
    compiled_shapes = set()  # of the batches the step has been compiled for
    stopped_after = None
    progress = tqdm(total=plan.total_steps, initial=start_step, disable=not (show_progress and is_main),
                    desc="train", unit="step", dynamic_ncols=True)
    try:
        with StopRequest() as stop, logging_redirect_tqdm():  # log lines go above the progress bar
            for step in range(start_step, plan.total_steps):
                batch = sharding.global_batch(next(data_iter), mesh)
                shapes = tuple(x.shape for x in batch.values())
                if shapes not in compiled_shapes:
                    compile_step(run.step, state, batch)
                    compiled_shapes.add(shapes)
                state, metrics = run.step(state, batch)
                if not ahead:
                    jax.block_until_ready(metrics)
                pending.append(metrics)
                window["images"] += t.batch_size
                done = step + 1
                progress.update(1)
                stopping = _agree_to_stop(stop, done, t.log_every_steps)
                evaluate_now = not stopping and eval_fn is not None and plan.should_eval(done, t.eval_every_epochs)
                checkpoint_now = (stopping or evaluate_now or done % t.checkpoint_every_steps == 0
                                  or done == plan.total_steps)
                # Never evaluate or checkpoint a state that came after a non-finite step.
                if done % t.log_every_steps == 0 or checkpoint_now:
                    flush(done)
                if checkpoint_now:
                    checkpointer.save(done, state, data_iter.get_state(), meta(done))
                if evaluate_now:
                    eval_metrics = eval_fn(state.eval_variables, step=done)
                    scalars = {f"eval_{k}": float(v) for k, v in eval_metrics.items() if np.isscalar(v)}
                    writer.write(done, scalars)
                    last_metrics.update(scalars)
                    checkpointer.save_best(done, state, data_iter.get_state(), meta(done), eval_metrics)
                    window.update(start=time.perf_counter(), images=0)  # images/s excludes evaluation
                if stopping:
                    stopped_after = (stop.requested, done)
                    break
    finally:
        progress.close()
        checkpointer.close()  # waits for the checkpoints being written
        writer.close()
    if stopped_after is not None:
        name, done = stopped_after
        raise TrainingInterrupted(name, done, workdir / "checkpoints" / str(done))
    return last_metrics


def abstract_train_state(variable_shapes: dict, optimizer, ema: bool = False) -> TrainState:
    """The TrainState's structure, shapes and dtypes (for restoring a checkpoint)."""
    return jax.eval_shape(lambda v: new_train_state(v, optimizer, jax.random.PRNGKey(0), ema), variable_shapes)
