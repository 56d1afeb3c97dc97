"""Fine-tuning a COCO-trained DETR-R50 on your own COCO-format folder.

Starts from converted weights (`detr-jax convert detr-r50-e632da11.pth converted/detr-r50`,
then `--config.train.init_from=converted/detr-r50`) with the class head re-initialized
(`train.init_exclude`), as official DETR's advice for a new set of classes is (issue #9:
`--resume` from a released checkpoint with `class_embed` deleted) with its own training
settings: AdamW lr 1e-4, backbone 1e-5 with the stem and first stage frozen, weight decay
1e-4, gradient clipping 0.1, frozen BatchNorm, 100 queries, aux losses.

What differs from the COCO recipe, and why: `model.num_classes="auto"` (the largest
category id of the training annotations + 1, stored with the run), a batch of 8 and 50
epochs with the lr drop at 40 (a small dataset on one machine instead of 64 images on 16
GPUs for 300 epochs), and evaluation every 5 epochs.

Data: `--config.data.coco_dir=DIR` with DIR/annotations/instances_{train,val}2017.json and
DIR/{train,val}2017/ (or set data.train_annotation_file, data.train_image_dir and the eval
ones). `data.max_boxes` must hold the most boxes of an image (checked at start).
"""

from detr_jax.config import base_config


def get_config():
    config = base_config()
    config.model.num_classes = "auto"
    config.data.dataset = "coco_folder"
    config.train.update(
        init_exclude=(r"class_embed/.*",),
        batch_size=8,
        epochs=50,
        lr_drop_epoch=40,
        eval_every_epochs=5,
        checkpoint_every_steps=500,
    )
    return config
