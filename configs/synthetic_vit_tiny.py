"""DETR with a small ViT backbone on the built-in synthetic shapes: no CNN anywhere.

`synthetic_tiny` with its ResNet replaced by a ViT trained from scratch: 16-pixel patches
(an 8x8 token grid at 128 px, the grid of synthetic_tiny's dilated ResNet), 4 pre-norm
blocks of width 96 (4 heads, MLP 192), position embeddings initialized with the 2-D
sine-cosine table and trained. The ViT is the encoder: DETR's own encoder is dropped
(`num_encoder_layers=0`); the decoder, data and matching are synthetic_tiny's. The ViT
trains at 0.1 x lr (official DETR's backbone ratio), the decoder at 5e-4; synthetic_tiny's
schedule (5 epochs of 625 steps of 32 images, the drop after 4).

The search that found these settings and what they reach: docs/BENCHMARKS.md ("A ViT
backbone on the built-in data").
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_tiny"))
    config.model.update(
        backbone="vit_ti16",
        backbone_args=dict(width=96, depth=4, num_heads=4, mlp_ratio=2.0, pos_grid=(8, 8), pos_embed_init="sincos"),
        num_encoder_layers=0,
    )
    config.train.param_rules = (("backbone/.*", 0.1),)
    return config
