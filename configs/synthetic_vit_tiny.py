"""DETR with a small ViT backbone on the built-in synthetic shapes: no CNN anywhere.

`synthetic_tiny` with its ResNet replaced by a ViT trained from scratch: 16-pixel patches
(an 8x8 token grid at 128 px, the grid of synthetic_tiny's dilated ResNet), learned
position embeddings on that grid, pre-norm blocks. Data, DETR transformer, matching and
schedule are synthetic_tiny's unless set below. The settings, the search that found them
and what they reach on 2 CPU cores are in docs/BENCHMARKS.md ("A ViT backbone on the
built-in data").
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_tiny"))
    config.model.update(
        backbone="vit_ti16",
        backbone_args=dict(width=128, depth=4, num_heads=4, pos_grid=(8, 8)),
    )
    return config
