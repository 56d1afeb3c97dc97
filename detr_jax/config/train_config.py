"""Defaults of the `train` and `eval` config sections (official DETR's training recipe)."""

from __future__ import annotations

import ml_collections

from detr_jax.train.optim import OFFICIAL_PARAM_RULES


def train_config() -> ml_collections.ConfigDict:
    """AdamW, lr 1e-4 (backbone 1e-5, stem and layer1 frozen), weight decay 1e-4, clip 0.1,
    300 epochs, drop at 200."""
    return ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            # (regex on the parameter path, lr multiplier or None = frozen), first full match
            # wins, unmatched parameters train at lr (detr_jax.train.optim). Default: official DETR.
            param_rules=OFFICIAL_PARAM_RULES,
            weight_decay=1e-4,
            clip_max_norm=0.1,
            epochs=300,
            # > 0: train exactly this many steps instead of `epochs` epochs.
            num_steps=0,
            lr_drop_epoch=200,
            warmup_steps=0,
            batch_size=64,  # global, over all devices and hosts
            grad_accum_steps=1,
            # > 0: keep an exponential moving average of the parameters and BatchNorm
            # statistics (RT-DETR's ModelEMA): after the n-th optimizer update,
            # ema = d * ema + (1 - d) * value with d = ema_decay * (1 - exp(-n / ema_warmup_steps));
            # evaluation, `best/` and every use of a training checkpoint read the average.
            ema_decay=0.0,
            ema_warmup_steps=2000,
            log_every_steps=50,
            checkpoint_every_steps=1000,
            keep_checkpoints=3,
            eval_every_epochs=1,
            # A params checkpoint (`detr-jax convert`) or a training run (its workdir, best/
            # or a step folder) laid over the fresh variables, except
            # the parameters whose path fully matches a regex of init_exclude (they keep
            # their fresh initialization: r"class_embed/.*" for a new set of classes).
            init_from="",
            init_exclude=(),
            # Keep freed host memory in the process (glibc malloc, see detr_jax.runtime.host_memory):
            # on CPU each step then reuses its buffers instead of faulting fresh pages in.
            retain_host_memory=True,
            # How parameters and optimizer state lie over the devices (detr_jax.runtime.sharding.
            # PARAM_SHARDINGS): "replicated" (whole on every device) or "fsdp" (each array of
            # at least fsdp_min_mib MiB split along its largest dimension the device count
            # divides, as big_vision's fsdp rule; XLA gathers the parameters where the step
            # uses them): for models whose state does not fit on one device. The batch is
            # split over the devices either way.
            param_sharding="replicated",
            fsdp_min_mib=4.0,  # big_vision's default: smaller arrays stay whole
            # Resuming a run with settings that change what its steps mean (batch size, data,
            # schedule, loss, ...) is refused unless this is True; the change is then recorded
            # in the workdir's config_history.json (detr_jax.config.run_contract).
            allow_config_change=False,
        )
    )


def eval_config() -> ml_collections.ConfigDict:
    """COCO-style evaluation settings."""
    return ml_collections.ConfigDict(
        dict(
            batch_size=8,
            num_visualized=8,
        )
    )
