"""`python -m detr_jax.cli ...`, the same as `detr-jax ...`."""

import sys

from detr_jax.cli.main import main

sys.exit(main())
