"""The shadow proxy: production answers, shadows are called at the same moment, all is traced."""

__all__ = ["__version__"]
__version__ = "0.1.0"
