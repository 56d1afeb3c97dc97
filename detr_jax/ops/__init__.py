"""Array operations that data, models, the criterion and evaluation share: box formats and IoU, nearest resize, the input image statistics, mask run-length encoding."""
