"""The `detr-jax` command line: `main` in `detr_jax.cli.main`, one thin file per command
(`train`, `eval`, `predict`, `convert`). The mains parse arguments, print and write files;
what they run lives in the library modules.
"""

# scripts/ import config_from_args from here; it lives in detr_jax.config (the one owner of
# loading and overriding configs).
from detr_jax.config import config_from_args  # noqa: F401
