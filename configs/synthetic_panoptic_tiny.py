"""Panoptic segmentation on the built-in synthetic data: stage 2, the mask head.

The paper's recipe: the detector of stage 1 (`configs/synthetic_panoptic_tiny_detection.py`,
things and stuff boxes) is frozen and the mask head (attention maps over the encoder
memory, then an FPN-like convolutional head over the backbone's res2..res4) is trained on
top of it with the focal and DICE losses, from the detector's best checkpoint. Only the
mask head's parameters train (`train.param_rules`: everything else None = frozen); the
detection losses are still computed (the matching needs them) but change nothing.

    detr-jax train --config configs/synthetic_panoptic_tiny_detection.py \\
        --workdir workdirs/synthetic_panoptic_tiny_detection
    detr-jax train --config configs/synthetic_panoptic_tiny.py --workdir workdirs/synthetic_panoptic_tiny

Evaluation reports PQ/SQ/RQ (all, things, stuff) and mask AP besides box AP; the best
checkpoint is the one with the best PQ. What it reaches: docs/BENCHMARKS.md ("Panoptic
segmentation on the built-in data").
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_panoptic_tiny_detection"))
    config.model.masks = True
    config.data.masks = True
    config.loss.losses = ("labels", "boxes", "cardinality", "masks")
    config.train.update(
        init_from="workdirs/synthetic_panoptic_tiny_detection/best",
        param_rules=(("(bbox_attention|mask_head)/.*", 1.0), (".*", None)),
        # The mask head's step costs ~3x the detector's (its convolutions run for every
        # query at up to 1/4 of the image size): 625 steps of 16 images, half an epoch.
        batch_size=16,
        num_steps=625,
        lr_drop_epoch=1,  # no drop within the run
        warmup_steps=0,
        checkpoint_every_steps=625,
    )
    return config
