"""The jit Predictor and export to StableHLO, SavedModel and ONNX."""
