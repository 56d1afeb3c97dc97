"""DETR-R50 on COCO 2017, the paper's settings (AP 42.0 with the official 500-epoch weights).

Batch 64 over all devices, AdamW lr 1e-4 (backbone 1e-5), weight decay 1e-4, gradient
clipping 0.1, 300 epochs with the learning rate dropped x0.1 at epoch 200 (official repo).
Data: TFDS `coco/2017` (needs the `tfds` extra and the prepared dataset); for a COCO
folder use `--config.data.dataset=coco_folder --config.data.coco_dir=/path/to/coco`.
"""

from detr_jax.config import base_config


def get_config():
    config = base_config()
    config.data.dataset = "tfds"
    config.data.tfds_name = "coco/2017"
    return config
