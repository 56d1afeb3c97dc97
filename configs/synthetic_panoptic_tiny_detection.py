"""Stage 1 of the synthetic panoptic recipe: a tiny DETR detecting things AND stuff.

The paper's recipe (and official DETR's): train the detector on the panoptic categories,
with a box for every "stuff" region too, then train the mask head on top of it with the
detector frozen (`configs/synthetic_panoptic_tiny.py`, which starts from this run's best
checkpoint). The data is the built-in synthetic shapes with two stuff regions ("sky" and
"ground", ids 4 and 5) behind the shapes (ids 1..3), so num_classes = 6; otherwise the
model and schedule are `synthetic_tiny`'s.

    detr-jax train --config configs/synthetic_panoptic_tiny_detection.py \\
        --workdir workdirs/synthetic_panoptic_tiny_detection
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_tiny"))
    config.model.num_classes = 6
    config.data.synthetic_stuff = True
    config.data.max_boxes = 8  # 3 shapes + 2 stuff regions at most
    return config
