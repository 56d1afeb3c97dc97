"""DAB-DETR on the built-in synthetic shapes: synthetic_tiny's data, model size and schedule
with `model.arch="dab_detr"` and the member's loss defaults (official DAB-DETR's and
Hugging Face's DabDetrConfig): the sigmoid class convention with the focal loss (alpha
0.25), matching costs class 2 / L1 5 / GIoU 2, loss weights class 2 / L1 5 / GIoU 2.

    detr-jax train --config configs/synthetic_dab_tiny.py --workdir workdirs/synthetic_dab_tiny
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_tiny"))
    config.model.arch = "dab_detr"
    config.loss.update(class_coef=2.0, focal_alpha=0.25)
    config.loss.matcher_args = {"cost_class": 2.0}
    return config
