"""DINO with hybrid matching (H-DETR) on the built-in synthetic shapes: synthetic_dino_tiny's
data, schedule, tiny multi-scale backbone and model (2 + 3 deformable layers of width 128,
30 queries from the encoder's top proposals, look-forward-twice, contrastive denoising with
dn_number 100) plus H-DETR's one-to-many branch in training: 150 extra queries (5 x the 30
one-to-one queries, H-Deformable-DETR's 1500 / 300) from the next-best proposals, kept from
the other queries by the self-attention mask, matched against the targets repeated k = 6
times and weighted by loss.one2many_coef = 1 (the official 12-epoch hybrid-branch recipe's
k and lambda). Inference (evaluation, the Predictor, export) is synthetic_dino_tiny's: the
one-to-many queries exist in training only.

    detr-jax train --config configs/synthetic_dino_hybrid_tiny.py --workdir workdirs/synthetic_dino_hybrid_tiny
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_dino_tiny"))
    config.model.transformer_args = {**config.model.transformer_args, "num_queries_one2many": 150, "k_one2many": 6}
    config.loss.one2many_coef = 1.0
    return config
