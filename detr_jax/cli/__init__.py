"""The `detr-jax` command line: `main` in `detr_jax.cli.main`, one thin file per command
(`train`, `eval`, `predict`, `convert`). The mains parse arguments, print and write files;
what they run lives in the library modules.
"""
