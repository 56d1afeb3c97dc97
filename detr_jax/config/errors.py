"""The config error type: a leaf module (imports nothing from detr_jax), so any module that
checks a config section (the data section's own defaults included) can raise it."""


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, bad value)."""
