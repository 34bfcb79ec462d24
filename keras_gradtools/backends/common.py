"""Small helpers every backend module shares."""


def variable_path(variable) -> str:
    """A variable's path (`keras.Variable`) or name (`tf.Variable`)."""
    return getattr(variable, "path", None) or getattr(variable, "name", "?")
