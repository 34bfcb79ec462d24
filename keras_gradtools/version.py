"""The package version, importable without importing Keras."""

__version__ = "0.2.0"
