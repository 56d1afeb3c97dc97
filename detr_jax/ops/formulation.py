"""Which runtime a model is being traced for, where the fastest formulation of an operation
differs between runtimes (a trace-time choice: it changes the traced program, never the
parameters or the result beyond rounding).

XLA (the default) is what `jax.jit`, the Predictor, training, and the StableHLO and SavedModel
exports trace for. ONNXRUNTIME is set by the ONNX export (`detr_jax.serving.export`) around its
trace, so that the ONNX graph has the operators onnxruntime's CPU kernels and graph optimizer
run best. Modules ask `for_onnxruntime()` while they are traced; nothing else reads it:

    with formulated_for(ONNXRUNTIME):
        jax2onnx.to_onnx(fn, ...)

The choice is read while tracing, and jit's cache does not know it: a function jitted and
traced outside the block keeps its XLA trace inside it. The ONNX export traces a function
of its own, made for it (`serving_function`), so nothing traced for XLA is reused there,
and nothing traced for onnxruntime reaches a jit cache.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

XLA = "xla"
ONNXRUNTIME = "onnxruntime"
TARGETS = (XLA, ONNXRUNTIME)

_TARGET: contextvars.ContextVar[str] = contextvars.ContextVar("detr_jax_formulation_target", default=XLA)


@contextlib.contextmanager
def formulated_for(target: str) -> Iterator[None]:
    """Traces inside this block formulate the model for `target` (one of TARGETS)."""
    if target not in TARGETS:
        raise ValueError(f"formulation target {target!r}: expected one of {', '.join(TARGETS)}")
    token = _TARGET.set(target)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target() -> str:
    """The runtime the current trace is formulated for (XLA unless inside `formulated_for`)."""
    return _TARGET.get()


def for_onnxruntime() -> bool:
    """Whether the current trace is formulated for onnxruntime (the ONNX export)."""
    return _TARGET.get() == ONNXRUNTIME
