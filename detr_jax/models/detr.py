"""DETR: backbone -> 1x1 input projection -> transformer -> class and box heads; the `detr`
entry of DETECTORS (`build_detr`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from detr_jax.ops.formulation import for_onnxruntime
from detr_jax.ops.image_statistics import normalize
from detr_jax.models.backbones import BACKBONES
from detr_jax.models.neck import NECKS, flatten_levels
from detr_jax.models.position_encoding import POSITION_EMBEDDINGS
from detr_jax.models.settings import transformer_settings
from detr_jax.models.transformer import build_transformer, torch_dense

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MLP(nn.Module):
    """Official DETR's MLP: `num_layers` Linear layers (PyTorch init), ReLU between them.
    Parameters layers_0 .. layers_{num_layers - 1}. `zero_last`: the last layer starts at
    zero (kernel and bias), as the box heads of Conditional DETR and after, whose boxes then
    start at their references; its bias then starts at `last_bias_init` instead (Deformable
    DETR's box heads start with width and height logits -2)."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Any = jnp.float32
    zero_last: bool = False
    last_bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., C] -> [..., output_dim] in the compute dtype."""
        fan_in = x.shape[-1]
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            out = self.output_dim if last else self.hidden_dim
            if last and self.zero_last:
                x = nn.Dense(out, kernel_init=nn.initializers.zeros, bias_init=self.last_bias_init, dtype=self.dtype,
                             name=f"layers_{i}")(x)
            else:
                x = torch_dense(out, fan_in, f"layers_{i}", self.dtype)(x)
            fan_in = out
            if i < self.num_layers - 1:
                x = nn.relu(x)
        return x


class BoxHead(MLP):
    """3-layer MLP (hidden, hidden, 4), sigmoid at the end; relative to reference boxes
    when given (Conditional DETR and after)."""

    output_dim: int = 4
    num_layers: int = 3

    def __call__(self, x: jnp.ndarray, reference: jnp.ndarray | None = None) -> jnp.ndarray:
        """x: [..., E] -> [..., 4] normalized (cx, cy, w, h) in (0, 1), float32.

        reference: [..., R] (R <= 4) the inverse sigmoid of reference coordinates ((cx, cy)
        or a box), added to the first R outputs before the sigmoid: the head predicts
        offsets from the reference.
        """
        x = super().__call__(x).astype(jnp.float32)
        if reference is not None:
            # Padded with zeros to [..., 4] and added, rather than a scatter-add into the first
            # R outputs: the same sums, and no scatter in the ONNX export (jax2onnx 0.13 gives
            # a scatter's shape constants to a neighbouring broadcast).
            pad = [(0, 0)] * (reference.ndim - 1) + [(0, x.shape[-1] - reference.shape[-1])]
            x = x + jnp.pad(reference.astype(jnp.float32), pad)
        return jax.nn.sigmoid(x)


def zero_padding(images: jnp.ndarray, mask: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Normalized images [B, H, W, 3] with the padding (mask [B, H, W] False) zeroed, in
    `dtype`. Padded pixels are zero after normalization in the references; zeroing them
    here makes the output independent of whatever values the padding holds."""
    if for_onnxruntime():
        # A product with the mask (onnxruntime's Where runs several times slower than its
        # Mul); the same values, but for the sign of a zero, which no convolution sees.
        return (images * mask[..., None].astype(images.dtype)).astype(dtype)
    return jnp.where(mask[..., None], images, 0).astype(dtype)


def embed_image(images: jnp.ndarray, mask: jnp.ndarray, backbone: nn.Module, position_embedding: nn.Module,
                neck: Callable[..., nn.Module], dtype: Any, train: bool):
    """The detectors' front, inside a detector's compact call: normalized images through the
    backbone, its output (and the pixel mask, for necks that make levels of their own)
    through the neck (instantiated as "input_proj", a submodule of the calling module:
    DETR's parameter path), and each level's position encoding.

    images: [B, H, W, 3] uint8 pixels (normalized here with ImageNet statistics, as the
    pipeline delivers them) or floats already normalized; mask: [B, H, W] bool (True = real
    pixel). Returns (backbone output, FeatureLevels ([B, h_l, w_l, E] in `dtype` and their
    masks), the position encoding of each level [B, h_l, w_l, E]).
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        images = normalize(images)
    backbone_out = backbone(zero_padding(images, mask, dtype), mask, train)
    levels = neck(name="input_proj")(backbone_out, mask)
    return backbone_out, levels, tuple(position_embedding(level_mask) for level_mask in levels.masks)


class DETR(nn.Module):
    """The DETR detector, from its parts (official DETR's `DETR(backbone, transformer, ...)`).

    Fields:
      backbone: a module `(images, mask, train) -> BackboneOutput` (features [B, h, w, C],
        mask [B, h, w], named stages); see detr_jax.models.resnet.
      position_embedding: a module `mask [B, h, w] -> [B, h, w, hidden_dim]`.
      neck: a constructor of the one-level neck (`neck.NECKS`; DETR's 1x1 projection),
        instantiated as "input_proj": `(BackboneOutput) -> FeatureLevels`.
      transformer: a module `(src [B, S, E], mask [B, S], query_embed [Q, E], pos [B, S, E],
        deterministic) -> (decoder states [L, B, Q, E], memory [B, S, E])`.
      num_logits: C, the class head's outputs (K + 1 with DETR's "no object" class for
        K = max class id + 1; the class convention says, `class_convention.num_logits`).
      num_queries, hidden_dim: Q and E.
    The parts are submodules named after their fields ("backbone", "position_embedding",
    "transformer"; the neck "input_proj"), which fixes the parameter paths that
    checkpoints and conversion use.

    Call: `model.apply({"params": ..., "frozen_bn": ...}, images, mask, train=..., rngs=...)`
    with `rngs={"dropout": key}` when `train=True`.
    """

    backbone: nn.Module
    position_embedding: nn.Module
    transformer: nn.Module
    neck: Callable[..., nn.Module]
    num_logits: int = 92
    num_queries: int = 100
    hidden_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False,
                 intermediates: bool = False, targets: dict | None = None) -> dict[str, Any]:
        """images: [B, H, W, 3] uint8 pixels (normalized here with ImageNet statistics, as
        the pipeline delivers them), or floats already normalized; mask: [B, H, W] bool
        (True = real pixel); targets: the padded batch targets in training (the detector
        interface's; DETR's queries do not depend on them).

        Returns float32 predictions of every decoder layer (index -1 is the last):
          pred_logits [L, B, Q, num_logits] (DETR's convention: the last class is "no object"),
          pred_boxes  [L, B, Q, 4] normalized (cx, cy, w, h) relative to the unpadded image.
        With `intermediates=True` also what heads need (in the compute dtype):
          backbone_stages {name: [B, h_i, w_i, C_i]} (a ResNet's "res2".."res5"),
          projected [B, h, w, E] the input projection of the backbone features,
          pos [B, h, w, E] the position encoding, memory [B, h, w, E] the encoder output,
          memory_mask [B, h, w] bool, decoder_states [L, B, Q, E] (after the final norm).
        Attention weights: apply with `mutable=["intermediates"]` (see
        `detr_jax.models.transformer.attention_maps`).
        """
        del targets
        backbone_out, levels, pos = embed_image(images, mask, self.backbone, self.position_embedding, self.neck,
                                                self.dtype, train)
        src, feature_mask = levels.features[0], levels.masks[0]
        batch, h, w, _ = src.shape
        flat = flatten_levels(levels, pos)
        query_embed = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, self.hidden_dim))
        hs, memory = self.transformer(flat.src, flat.mask, query_embed, flat.pos, deterministic=not train)
        logits = torch_dense(self.num_logits, self.hidden_dim, "class_embed", self.dtype)(hs)
        boxes = BoxHead(self.hidden_dim, dtype=self.dtype, name="bbox_embed")(hs)
        outputs = {"pred_logits": logits.astype(jnp.float32), "pred_boxes": boxes}
        if intermediates:
            outputs.update(backbone_stages=backbone_out.stages, projected=src, pos=pos[0],
                           memory=memory.reshape(batch, h, w, -1), memory_mask=feature_mask, decoder_states=hs)
        return outputs


def build_detr(model_config, dtype: Any, num_logits: int) -> DETR:
    """DETR of the `model` config section computing in `dtype`, with `num_logits` class outputs."""
    m = model_config
    transformer_settings(m, {})
    return DETR(
        backbone=BACKBONES[m.backbone](m, dtype),
        position_embedding=POSITION_EMBEDDINGS[m.position_embedding](m, dtype),
        transformer=build_transformer(m, dtype),
        neck=NECKS[m.neck](m, dtype),
        num_logits=num_logits,
        num_queries=m.num_queries,
        hidden_dim=m.hidden_dim,
        dtype=dtype,
    )


def init_variables(model: nn.Module, rng: jax.Array, image_size: tuple[int, int] = (64, 64)) -> dict:
    """Initial variables {"params", "frozen_bn", "batch_stats"} for a batch of one image.

    The detector also sees targets (one padded slot) and a "queries" rng, as in training,
    so parameters only training uses (a denoising embedding) are created too. "frozen_bn"
    and "batch_stats" are always present ({} without frozen or trainable BatchNorms), so
    code that carries the collections need not ask which model it has.
    """
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    mask = jnp.ones((1, *image_size), bool)
    targets = {"labels": jnp.zeros((1, 1), jnp.int32), "boxes": jnp.full((1, 1, 4), 0.5, jnp.float32),
               "valid": jnp.zeros((1, 1), bool)}
    variables = jax.jit(lambda r: model.init({"params": r, "queries": r}, images, mask, train=False,
                                             targets=targets))(rng)
    return {"frozen_bn": {}, "batch_stats": {}, **variables}


def variable_shapes(model: DETR) -> dict:
    """Shapes and dtypes of the model's variables (no computation)."""
    return jax.eval_shape(lambda r: init_variables(model, r), jax.random.PRNGKey(0))
