"""Checks that saved optimizer state fits the optimizer it is loaded into.

`save_own_variables` writes, next to the variables, a small JSON record of
the layout: the optimizer class, the settings that decide which slots exist,
and each variable's shape and dtype. `check_layout` compares it with the
optimizer being restored and raises a `ValueError` that says what differs.
"""

import json

import numpy as np

LAYOUT_KEY = "keras_gradtools_layout"


def encode_layout(layout):
    """Returns `layout` (JSON-able) as a uint8 array a weights store keeps."""
    return np.frombuffer(json.dumps(layout).encode("utf-8"), dtype=np.uint8)


def decode_layout(array):
    return json.loads(bytes(np.asarray(array, dtype=np.uint8)).decode("utf-8"))


def check_layout(store, expected, variables):
    """Raises a `ValueError` if the state in `store` does not fit.

    Args:
        store: The weights store passed to `load_own_variables`.
        expected: The layout of the optimizer being restored.
        variables: Its variables, in order.
    """
    keys = set(store.keys())
    saved = decode_layout(store[LAYOUT_KEY]) if LAYOUT_KEY in keys else None
    count = len(keys - {LAYOUT_KEY})
    differences = []
    if saved is not None:
        differences = _differences(saved, expected)
    elif count != len(variables):
        differences = [
            f"the saved state has {count} variables (not written by "
            f"keras_gradtools), this optimizer has {len(variables)}"
        ]
    else:
        for i, variable in enumerate(variables):
            shape = tuple(np.shape(store[str(i)]))
            if shape != tuple(variable.shape):
                differences.append(
                    f"variable {i} ({variable.name}) has shape "
                    f"{tuple(variable.shape)}, the saved one {shape}"
                )
    if differences:
        raise ValueError(
            f"Cannot restore optimizer state into {expected['class']}: "
            + "; ".join(differences)
            + ". Restore into an optimizer built like the one that saved "
            "it, or start this optimizer from fresh state (e.g. compile "
            "the model anew) on purpose."
        )


def _differences(saved, expected):
    found = []
    if saved["class"] != expected["class"]:
        found.append(
            f"it was saved by {saved['class']}, not {expected['class']}"
        )
    for key in sorted(set(saved["settings"]) | set(expected["settings"])):
        before = saved["settings"].get(key)
        now = expected["settings"].get(key)
        if before != now:
            found.append(f"{key} was {before!r} when saved, is {now!r} now")
    if not found:
        before, now = saved["variables"], expected["variables"]
        if len(before) != len(now):
            found.append(
                f"the saved state has {len(before)} variables, this "
                f"optimizer has {len(now)} (a different model?)"
            )
        else:
            for i, (a, b) in enumerate(zip(before, now)):
                if a != b:
                    found.append(
                        f"variable {i} was {a[1]}{tuple(a[0])} when saved, "
                        f"is {b[1]}{tuple(b[0])} now (a different model?)"
                    )
                    break
    return found
