"""DETR (End-to-End Object Detection with Transformers) in JAX/Flax."""

__version__ = "0.1.0"
