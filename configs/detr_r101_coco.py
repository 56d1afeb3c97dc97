"""DETR-R101 on COCO 2017, paper settings."""

from detr_jax.config import base_config


def get_config():
    config = base_config()
    config.model.backbone = "resnet101"
    config.data.dataset = "tfds"
    config.data.tfds_name = "coco/2017"
    return config
