"""The detectors of the DETR family by name: `model.arch` -> Detector.

A detector is the unit the rest of the library talks to. Its module is called as

    module.apply(variables, images [B, H, W, 3] uint8, mask [B, H, W] bool, train=False,
                 intermediates=False, targets=None, rngs=...)

and returns float32 predictions of every decoder layer, `pred_logits` [L, B, Q, C]
(read by the detector's class convention, `detr_jax.criterion.class_convention`) and `pred_boxes`
[L, B, Q, 4] (normalized cxcywh), plus any other output branches (`losses.BRANCHES`:
"enc", "dn", "one2many", each a dict of the same keys, matched by its own rule). In
training it receives the padded targets ({"labels" [B, M], "boxes" [B, M, 4], "valid"
[B, M]}) and the rng streams "dropout" and "queries" (for queries made from the targets,
such as denoising groups). Training, evaluation, the Predictor, export and analysis use
only this, the class convention and the post-processing it implies.

A new member is one module (its file in this package) plus an entry here
(docs/EXTENDING.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import linen as nn

from detr_jax.models.detectors.conditional_detr import build_conditional_detr
from detr_jax.models.detectors.dab_detr import build_dab_detr
from detr_jax.models.detectors.deformable_detr import build_deformable_detr
from detr_jax.models.detectors.dino import build_dino
from detr_jax.models.detectors.rt_detr import build_rt_detr
from detr_jax.models.detr import build_detr


@dataclasses.dataclass(frozen=True)
class Detector:
    """A DETECTORS entry.

    build: (model_config, compute dtype, num_logits) -> the module (see the module
      docstring for its call); num_logits is C, the class head's width the class
      convention asks for.
    class_convention: the name in `class_convention.CLASS_CONVENTIONS` it trains with
      unless `model.class_convention` names another.
    """

    build: Callable[[Any, Any, int], nn.Module]
    class_convention: str


DETECTORS: dict[str, Detector] = {
    "detr": Detector(build=build_detr, class_convention="softmax"),
    "conditional_detr": Detector(build=build_conditional_detr, class_convention="sigmoid_focal"),
    "dab_detr": Detector(build=build_dab_detr, class_convention="sigmoid_focal"),
    "deformable_detr": Detector(build=build_deformable_detr, class_convention="sigmoid_focal"),
    "dino": Detector(build=build_dino, class_convention="sigmoid_focal"),
    "rt_detr": Detector(build=build_rt_detr, class_convention="sigmoid_varifocal"),
}
