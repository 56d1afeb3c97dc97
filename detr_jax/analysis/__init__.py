"""What DETR's object queries and attention learn (`detr-jax analyze`).

- `forward_with_attention` (attention.py): predictions plus the attention weights of
  chosen layers, per head or averaged.
- `collect_predictions` (collect.py): one batched, jitted pass over a dataset split.
- `slot_statistics` (slots.py): per-slot numbers and how specialized the slots are.
- figures.py and report.py: the pictures and the static report page.
- `analyze` (run.py): all of it, written to a folder.
"""

from detr_jax.analysis.attention import forward_with_attention
from detr_jax.analysis.collect import AttentionSample, SlotPredictions, collect_predictions
from detr_jax.analysis.run import analyze
from detr_jax.analysis.slots import SlotStatistics, mutual_information_bits, slot_statistics

__all__ = ["AttentionSample", "SlotPredictions", "SlotStatistics", "analyze", "collect_predictions",
           "forward_with_attention", "mutual_information_bits", "slot_statistics"]
