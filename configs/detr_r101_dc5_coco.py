"""DETR-R101-DC5 on COCO 2017: ResNet-101 with the last stage dilated, paper settings."""

from detr_jax.config import base_config


def get_config():
    config = base_config()
    config.model.backbone = "resnet101"
    config.model.dilation = True
    config.data.dataset = "tfds"
    config.data.tfds_name = "coco/2017"
    return config
