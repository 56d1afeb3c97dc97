"""The per-channel statistics images are normalized with: ImageNet's mean and standard
deviation of RGB values in [0, 1], as torchvision, official DETR and most pretrained
backbones use. Shared by the input pipeline (which normalizes) and backbones whose weights
expect other statistics (which re-normalize)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
