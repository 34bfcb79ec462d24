"""Small helpers every backend module shares."""

import contextlib


def variable_path(variable) -> str:
    """A variable's path (`keras.Variable`) or name (`tf.Variable`)."""
    return getattr(variable, "path", None) or getattr(variable, "name", "?")


def outside_trace():
    """A context in which variable writes take effect now, even when called
    while a function is being traced: `tf.init_scope()` on TensorFlow (a
    write inside a `tf.function` trace would be a graph op of that trace,
    run only if the traced step is, and undone by nothing); on JAX, where
    building and restoring happen eagerly, no context is needed."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.init_scope()
    return contextlib.nullcontext()
