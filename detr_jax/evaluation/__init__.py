"""Post-processing, COCO box/mask AP and PQ, the data-parallel Evaluator, and drawing detections."""
