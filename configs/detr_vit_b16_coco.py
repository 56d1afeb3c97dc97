"""DETR with a ViT-B/16 backbone on COCO 2017, fine-tuned from ImageNet ViT weights.

The backbone starts from a converted ViT-B/16 (`detr-jax convert` of a Hugging Face or timm
ViT/DeiT-B/16 state dict, then `--config.train.init_from=converted/vit-b16`); everything
else is DETR-R50's recipe (AdamW lr 1e-4, weight decay 1e-4, clipping 0.1, 300 epochs with
the drop at 200). What a ViT changes, following ViTDet (Li et al., 2022) for fine-tuning a
plain ViT for detection:
- windowed attention (14 x 14 patches, the pretraining grid) in every block except the
  last of each quarter (2, 5, 8, 11), so COCO-size images (50 x 76 patches at 800 x 1216)
  cost close to linear in the number of patches; the class token is dropped;
- layer-wise learning-rate decay 0.7 on top of the backbone's 0.1 x lr: block i at
  0.1 * 0.7 ** (12 - i), the embeddings at 0.1 * 0.7 ** 13;
- stochastic depth 0.1.
Weights pretrained with other input statistics than ImageNet's (Google's ViTs: 0.5, 0.5)
need `model.backbone_args` pixel_mean/pixel_std (and their num_prefix_tokens/pos_grid):
`detr-jax convert` reports what to set.

Not trained here (no COCO on our machines): the settings are ViTDet's, not a measured result.
"""

from detr_jax.config import base_config
from detr_jax.models.vit import layer_decay_rules


def get_config():
    config = base_config()
    config.model.backbone = "vit_b16"
    config.model.backbone_args = dict(window_size=14, drop_path_rate=0.1)
    config.train.param_rules = layer_decay_rules(depth=12, decay=0.7, scale=0.1)
    config.data.dataset = "tfds"
    config.data.tfds_name = "coco/2017"
    return config
