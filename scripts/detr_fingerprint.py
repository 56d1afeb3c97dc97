"""DETR's fingerprint, to show a restructuring changed no behaviour: the default config's
(configs/synthetic_tiny.py) first training steps' losses and gradient norms, every digit,
and a hash of the optimized inference program's instructions (source locations left out:
they name files and functions, which a restructuring moves).

Run it in each checkout and compare the JSON files:

    PYTHONPATH=/path/to/before python scripts/detr_fingerprint.py --out before.json
    PYTHONPATH=/path/to/after  python scripts/detr_fingerprint.py --out after.json
    diff before.json after.json && echo identical

Only names both versions have are used (assemble, the train iterator, make_predict_fn);
the class convention is passed where the checkout has one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re

import jax
import numpy as np

from detr_jax import models
from detr_jax.train import trainer as training
from detr_jax.config import config_from_args
from detr_jax.data import make_source
from detr_jax.data.pipeline import make_train_iterator
from detr_jax.evaluation.postprocess import make_predict_fn
from detr_jax.runtime.sharding import make_mesh

METRICS = ("loss", "grad_norm", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
BATCH_KEYS = ("image", "mask", "labels", "boxes", "valid")


def instructions(hlo: str) -> str:
    """The HLO text without its source-location tables and references."""
    kept = [line for line in hlo.splitlines()
            if not re.match(r'^(\d+ ("|\{)|FileNames|FunctionNames|FileLocations|StackFrames)', line)]
    return re.sub(r",? ?stack_frame_id=\d+|metadata=\{[^}]*\}", "", "\n".join(kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="detr_fingerprint.json")
    args = parser.parse_args()

    config = config_from_args("synthetic_tiny")
    mesh = make_mesh()
    source = make_source(config.data, "train")
    training.resolve_num_classes(config, source)
    assembly = training.assemble(config, mesh, len(source) // config.train.batch_size)
    state = assembly.initial_state(config)
    batches = make_train_iterator(config.data, config.train.batch_size, config.seed, source=source)
    result = {}
    for step in range(args.steps):
        batch = next(batches)
        state, metrics = assembly.step(state, {key: batch[key] for key in BATCH_KEYS})
        result[f"step{step}"] = {key: repr(float(metrics[key])) for key in METRICS}

    model = models.build_model(config.model)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    classes = (models.build_class_convention(config),) if hasattr(models, "build_class_convention") else ()
    predict = make_predict_fn(model, mesh, *classes)
    inputs = (np.zeros((2, 64, 96, 3), np.uint8), np.ones((2, 64, 96), bool), np.full((2, 2), 64, np.int32))
    program = instructions(predict.lower(variables, *inputs).compile().as_text())
    result["predict_program_sha256"] = hashlib.sha256(program.encode()).hexdigest()
    result["predict_program_lines"] = len(program.splitlines())
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
