"""Argument checks run at construction time.

Each check raises a `ValueError` that names the argument, the value received
and the accepted range, so a bad setting never surfaces later as a stack
trace from inside a compiled update.
"""

import math
import numbers


def check_int(name, value, minimum, maximum=None):
    """Returns `value` if it is an integer in `[minimum, maximum]` (bools
    rejected)."""
    accepted = (
        f"an integer >= {minimum}"
        if maximum is None
        else f"an integer in [{minimum}, {maximum}]"
    )
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        raise ValueError(
            f"`{name}` must be {accepted}. Received: {name}={value!r}"
        )
    return int(value)


def check_float(
    name, value, minimum=None, maximum=None, open_min=False, open_max=False
):
    """Returns `float(value)` if it is a finite real number in range.

    Args:
        name: The argument's name, for the error message.
        value: The value to check.
        minimum, maximum: Optional bounds.
        open_min, open_max: Whether the bound itself is excluded.
    """
    low = "" if minimum is None else ("(" if open_min else "[") + f"{minimum}"
    high = "" if maximum is None else f"{maximum}" + (")" if open_max else "]")
    accepted = _describe_range(minimum, maximum, low, high)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"`{name}` must be a float {accepted}. Received: {name}={value!r}"
        )
    value = float(value)
    too_low = minimum is not None and (
        value <= minimum if open_min else value < minimum
    )
    too_high = maximum is not None and (
        value >= maximum if open_max else value > maximum
    )
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(
            f"`{name}` must be a float {accepted}. Received: {name}={value!r}"
        )
    return value


def check_optional_positive(name, value):
    """Returns `None` or a float > 0 (used for the clipping thresholds)."""
    if value is None:
        return None
    return check_float(name, value, minimum=0.0, open_min=True)


def check_choice(name, value, choices):
    """Returns `value` if it is one of `choices`."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(
            f"`{name}` must be one of {options}. Received: {name}={value!r}"
        )
    return value


def check_optional_seed(name, value):
    """Returns `None` or an integer seed in [0, 2**31 - 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"`{name}` must be None or an integer in [0, 2147483647]. "
            f"Received: {name}={value!r}"
        )
    if not 0 <= value <= 2**31 - 1:
        raise ValueError(
            f"`{name}` must be None or an integer in [0, 2147483647]. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def _describe_range(minimum, maximum, low, high):
    if minimum is not None and maximum is not None:
        return f"in {low}, {high}"
    if minimum is not None:
        return f"{'>' if low.startswith('(') else '>='} {minimum}"
    if maximum is not None:
        return f"{'<' if high.endswith(')') else '<='} {maximum}"
    return "(any finite value)"


# K and its maximum are int32 state (saved, and the same on every device).
MAX_ACCUMULATION_STEPS = 2**31 - 1


def resolve_accumulation_steps(accumulation_steps, gradient_accumulation_steps):
    """Returns K from `accumulation_steps` or its Keras alias (not both)."""
    if gradient_accumulation_steps is not None:
        if accumulation_steps is not None:
            raise ValueError(
                "Pass either `accumulation_steps` or its Keras alias "
                "`gradient_accumulation_steps`, not both. Received: "
                f"accumulation_steps={accumulation_steps!r}, "
                f"gradient_accumulation_steps={gradient_accumulation_steps!r}"
            )
        return check_int(
            "gradient_accumulation_steps",
            gradient_accumulation_steps,
            1,
            MAX_ACCUMULATION_STEPS,
        )
    if accumulation_steps is None:
        return 1
    return check_int(
        "accumulation_steps", accumulation_steps, 1, MAX_ACCUMULATION_STEPS
    )


def resolve_max_accumulation_steps(max_accumulation_steps, steps):
    """Returns the largest K the optimizer accepts (default: `steps`)."""
    if max_accumulation_steps is None:
        return steps
    maximum = check_int(
        "max_accumulation_steps",
        max_accumulation_steps,
        1,
        MAX_ACCUMULATION_STEPS,
    )
    if maximum < steps:
        raise ValueError(
            "`max_accumulation_steps` must be an integer >= "
            f"accumulation_steps ({steps}). Received: "
            f"max_accumulation_steps={max_accumulation_steps!r}"
        )
    return maximum


def check_learning_rate(learning_rate):
    """Returns a float >= 0 unchanged as float; schedules pass through."""
    if isinstance(learning_rate, bool):
        raise ValueError(
            "`learning_rate` must be a float >= 0, a LearningRateSchedule or "
            f"a callable. Received: learning_rate={learning_rate!r}"
        )
    if isinstance(learning_rate, (int, float)):
        return check_float("learning_rate", learning_rate, 0)
    return learning_rate


def check_keras_optimizer_arguments(kwargs):
    """Validates the `keras.optimizers.Optimizer` arguments Keras itself
    leaves unchecked until they fail inside a compiled update."""
    if kwargs.get("weight_decay") is not None:
        kwargs["weight_decay"] = check_float(
            "weight_decay", kwargs["weight_decay"], minimum=0
        )
    if kwargs.get("use_ema"):
        kwargs["ema_momentum"] = check_float(
            "ema_momentum", kwargs.get("ema_momentum", 0.99), 0, 1
        )
    if kwargs.get("loss_scale_factor") is not None:
        kwargs["loss_scale_factor"] = check_float(
            "loss_scale_factor",
            kwargs["loss_scale_factor"],
            minimum=0,
            open_min=True,
        )


def require_built(optimizer, what: str) -> None:
    """Raises a `ValueError` that names `what` if `optimizer` is not built.

    Args:
        optimizer: A keras_gradtools optimizer (anything with `built`).
        what: The member that needs the optimizer built, e.g.
            `"micro_steps"`.
    """
    if not optimizer.built:
        raise ValueError(
            f"`{what}` needs a built optimizer: call `apply` (or "
            "`model.fit`) or `build(variables)` first."
        )
