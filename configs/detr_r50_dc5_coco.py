"""DETR-R50-DC5 on COCO 2017: the last ResNet stage dilated (stride 16), paper settings."""

from detr_jax.config import base_config


def get_config():
    config = base_config()
    config.model.dilation = True
    config.data.dataset = "tfds"
    config.data.tfds_name = "coco/2017"
    return config
