"""Conditional DETR on the built-in synthetic shapes: synthetic_tiny's data, model size and
schedule with `model.arch="conditional_detr"` and the member's loss defaults (official
Conditional DETR's and Hugging Face's ConditionalDetrConfig): the sigmoid class convention
with the focal loss (alpha 0.25), matching costs class 2 / L1 5 / GIoU 2, loss weights
class 2 / L1 5 / GIoU 2.

    detr-jax train --config configs/synthetic_conditional_tiny.py \\
        --workdir workdirs/synthetic_conditional_tiny
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_tiny"))
    config.model.arch = "conditional_detr"
    config.loss.update(class_coef=2.0, focal_alpha=0.25)
    config.loss.matcher_args = {"cost_class": 2.0}
    return config
