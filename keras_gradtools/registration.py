"""Registers the package's classes for Keras serialization."""

import keras

PACKAGE = "keras_gradtools"


def register(cls):
    """Registers `cls` as `keras_gradtools>ClassName`, so that `.keras`
    files and `keras.saving.deserialize_keras_object` find it."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)
