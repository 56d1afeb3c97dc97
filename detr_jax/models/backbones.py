"""Every backbone by name: `model.backbone` -> builder `(model_config, dtype) -> module`
(ResNets from detr_jax.models.resnet, ViTs from detr_jax.models.vit); register new
backbones here."""

from detr_jax.models.resnet import RESNET_BACKBONES
from detr_jax.models.vit import VIT_BACKBONES

BACKBONES = {**RESNET_BACKBONES, **VIT_BACKBONES}
