"""The per-channel statistics images are normalized with: ImageNet's mean and standard
deviation of RGB values in [0, 1], as torchvision, official DETR and most pretrained
backbones use. Images travel as uint8 pixels; the model normalizes them on device
(`normalize`), and backbones whose weights expect other statistics re-normalize."""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN_255 = np.array(IMAGENET_MEAN, np.float32) * 255.0
_INV_STD_255 = 1.0 / (np.array(IMAGENET_STD, np.float32) * 255.0)


def normalize(pixels):
    """uint8 pixels [..., 3] (a numpy or jax array) -> float32 (x / 255 - mean) / std.

    The same float32 operations on host (numpy) and inside a jitted function (jax).
    """
    return (pixels.astype(np.float32) - _MEAN_255) * _INV_STD_255
