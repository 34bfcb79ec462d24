"""The saved layout of optimizer state: which variables, in which order,
and a check that state being restored fits the optimizer receiving it.

`save_own_variables` writes, next to the variables, a small JSON record:
the optimizer class, whether it was built, the settings that decide which
variables exist, and each variable's shape and kind of dtype (int or float:
an update counter is int64 on TensorFlow and int32 on JAX, and a file must
load on either). `check` compares a saved record with the optimizer being
restored and raises a `ValueError` that says what differs.
"""

import json

import numpy as np
from keras import backend

LAYOUT_KEY = "keras_gradtools_layout"
FORMAT = 2

# The order of the pipeline's variables after Keras's own and the update
# rule's (which keep their creation order): the same whenever a part was
# created, so that state saved by one optimizer loads into another built
# like it (statistics may be switched on after `build`). The `*_transfer`
# switches (Adam, AdamW: `callbacks/transfer.py`) are absent from files
# written before they existed; such files load with them off.
ROLE_ORDER = (
    "micro_steps",
    "skipped_micro_batches",
    "accumulation_steps",
    "learning_rate_factor",
    "beta_1_transfer",
    "beta_2_transfer",
    "weight_decay_transfer",
    "cycle_steps",
    "cycle_position",
    "cycle_micro_batches",
    "gradient_sum",
    "square_sum",
    "square_norm_sum",
    "cycle_samples",
    "noise_seed",
    "statistic",
    "running_statistic",
)


def role_rank(role) -> int:
    """Sort key of a variable with pipeline role `role` (0: Keras's and the
    update rule's own variables, which come first)."""
    return ROLE_ORDER.index(role) + 1 if role in ROLE_ORDER else 0


def dtype_kind(dtype) -> str:
    """`"int"` for any integer dtype, else the dtype's name."""
    name = backend.standardize_dtype(dtype)
    return "int" if name.startswith(("int", "uint")) else name


def describe(class_name, built, settings, variables):
    """The layout record of an optimizer."""
    return {
        "format": FORMAT,
        "class": class_name,
        "built": bool(built),
        "settings": settings,
        "variables": [[list(v.shape), dtype_kind(v.dtype)] for v in variables],
    }


def encode(layout) -> np.ndarray:
    """`layout` (JSON-able) as a uint8 array a weights store keeps."""
    return np.frombuffer(json.dumps(layout).encode("utf-8"), dtype=np.uint8)


def decode(array):
    return json.loads(bytes(np.asarray(array, dtype=np.uint8)).decode("utf-8"))


def saved_layout(store):
    """The layout record in `store`, or `None` if it holds none."""
    if LAYOUT_KEY not in set(store.keys()):
        return None
    return decode(store[LAYOUT_KEY])


def saved_arrays(store):
    """The saved variables of `store`, in order."""
    count = len(set(store.keys()) - {LAYOUT_KEY})
    return [store[str(i)] for i in range(count)]


def check(saved, arrays, expected):
    """Raises a `ValueError` if saved state does not fit.

    Args:
        saved: The saved layout record, or `None` (state not written by
            keras_gradtools).
        arrays: The saved variables.
        expected: The layout of the optimizer being restored.
    """
    differences = _differences(saved, arrays, expected)
    if differences:
        raise ValueError(
            f"Cannot restore optimizer state into {expected['class']}: "
            + "; ".join(differences)
            + ". Restore into an optimizer built like the one that saved "
            "it, or start this optimizer from fresh state (e.g. compile "
            "the model anew) on purpose."
        )


def _differences(saved, arrays, expected):
    if saved is None:
        return [
            f"the saved state has {len(arrays)} variables and was not "
            f"written by keras_gradtools (this optimizer has "
            f"{len(expected['variables'])})"
        ]
    if saved.get("format") != FORMAT:
        return [
            "it was saved by keras_gradtools 0.1, whose optimizer state "
            "layout differs (load the model with compile=False and compile "
            "it with a fresh optimizer to continue from the weights)"
        ]
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
    if found:
        return found
    before, now = saved["variables"], expected["variables"]
    if len(before) != len(now):
        return [
            f"the saved state has {len(before)} variables, this optimizer "
            f"has {len(now)} (a different model?)"
        ]
    for i, (a, b) in enumerate(zip(before, now)):
        if a != b:
            return [
                f"variable {i} was {a[1]}{tuple(a[0])} when saved, is "
                f"{b[1]}{tuple(b[0])} now (a different model?)"
            ]
    return []
