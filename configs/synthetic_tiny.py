"""A tiny DETR on the built-in synthetic shapes: the default that trains on a laptop CPU.

No download: the dataset is generated procedurally (3 shape classes, ids 1..3, so
num_classes = 4). Small images, a narrow one-block-per-stage ResNet, a 2+2 layer
transformer of width 64 and 10 queries.
"""

from detr_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(
        backbone="resnet_tiny",
        hidden_dim=64,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=128,
        num_queries=10,
        num_classes=4,
    )
    # --- data ---
    config.data.update(
        dataset="synthetic",
        synthetic_train_examples=2000,
        synthetic_eval_examples=200,
        synthetic_image_size=(96, 128),
        synthetic_num_objects=(1, 3),
        max_boxes=8,
        train_scales=(96, 112, 128),
        train_max_size=160,
        crop_scales=(80, 96, 112),
        crop_size=(64, 96),
        eval_scale=128,
        eval_max_size=160,
        bucket_step=32,
    )
    # --- end data ---
    config.train.update(batch_size=8, epochs=20, lr_drop_epoch=15)
    config.eval.update(batch_size=8)
    return config
