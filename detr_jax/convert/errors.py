"""The one error of conversion."""


class ConversionError(ValueError):
    """A checkpoint cannot be read, recognized, or converted to the target model."""
