"""The pipeline's arguments, declared once.

Every optimizer of the package (and `wrap`) takes these keyword arguments.
This one declaration is what their signatures, their validation at
construction time, `get_config` and the "Args" of their docstrings are
built from: an argument is added, checked and documented here only.
"""

import dataclasses
import inspect
import random
import textwrap
from collections.abc import Callable
from typing import Any

from keras_gradtools import validation
from keras_gradtools.types import NonfinitePolicy

NONFINITE_POLICIES = ("skip", "apply", "raise")


@dataclasses.dataclass(frozen=True)
class Argument:
    """One keyword argument of the pipeline.

    Args:
        name: The keyword.
        default: Its default value.
        annotation: Its type, for the signature.
        check: `check(name, value) -> value`: validates (raising a
            `ValueError` that names the argument and its accepted range)
            and normalizes; `None` where the value is resolved with
            others (K, its alias and its maximum).
        doc: Its documentation, one paragraph.
    """

    name: str
    default: Any
    annotation: Any
    check: Callable[[str, Any], Any] | None
    doc: str


def _at_least_zero(name, value):
    return validation.check_float(name, value, minimum=0)


def _boolean(name, value):
    del name
    return bool(value)


def _nonfinite_policy(name, value):
    return validation.check_choice(name, value, NONFINITE_POLICIES)


PIPELINE_ARGUMENTS = (
    Argument(
        "accumulation_steps",
        default=None,
        annotation=int | None,
        check=None,
        doc=(
            "Int >= 1, defaults to 1. The number of micro-batches "
            "(calls to `apply`) per update. The weights move only on "
            "every `accumulation_steps`-th call, by the mean gradient "
            "of the cycle. At most 2**31 - 1."
        ),
    ),
    Argument(
        "gradient_accumulation_steps",
        default=None,
        annotation=int | None,
        check=None,
        doc=(
            "Keras's name for `accumulation_steps`, accepted as an "
            "alias (pass one of them)."
        ),
    ),
    Argument(
        "max_accumulation_steps",
        default=None,
        annotation=int | None,
        check=None,
        doc=(
            "Int in [accumulation_steps, 2**31 - 1], defaults to "
            "`accumulation_steps`. The largest K the optimizer will "
            "take: K is state (`optimizer.accumulation_steps`, set by "
            "`BatchSizeSchedule`, `Seesaw` and `AdaptiveAccumulation`) "
            "and may change during training up to it without retracing. "
            "The gradient sums exist from `build` when it is above 1."
        ),
    ),
    Argument(
        "noise_eta",
        default=0.0,
        annotation=float,
        check=_at_least_zero,
        doc=(
            "Float >= 0, defaults to 0 (no noise). Variance `eta` of "
            "the Gaussian noise added to the mean gradient at the first "
            "update; update `t` (counting from 0) uses `sigma_t**2 = "
            "eta / (1 + t)**gamma` (Neelakantan et al., 2015)."
        ),
    ),
    Argument(
        "noise_gamma",
        default=0.55,
        annotation=float,
        check=_at_least_zero,
        doc=("Float >= 0, defaults to 0.55. The annealing exponent."),
    ),
    Argument(
        "noise_seed",
        default=None,
        annotation=int | None,
        check=validation.check_optional_seed,
        doc=(
            "Int in [0, 2**31 - 1] or `None`. Seed of the stateless "
            "noise stream; `None` draws one from Python's `random` "
            "module (seeded by `keras.utils.set_random_seed`)."
        ),
    ),
    Argument(
        "clip_micro_batches",
        default=False,
        annotation=bool,
        check=_boolean,
        doc=(
            "Boolean, defaults to `False`. If `True`, the clipping set "
            "by `clipnorm`, `clipvalue` or `global_clipnorm` is applied "
            "to each micro-batch gradient before it is accumulated "
            "instead of to the mean gradient at update time."
        ),
    ),
    Argument(
        "sync_micro_batches",
        default=False,
        annotation=bool,
        check=_boolean,
        doc=(
            "Boolean, defaults to `False`. Under a `tf.distribute` "
            "strategy, sum each micro-batch's gradient over the "
            "replicas before accumulating it (K all-reduces per update "
            'instead of 1), so that Adam\'s "micro" second moment and '
            "the gradient statistics equal one device's exactly. By "
            "default each replica accumulates its own gradients, and "
            "the update reads their sums across replicas once. On JAX "
            "the gradients are global already and this has no effect."
        ),
    ),
    Argument(
        "weighted_accumulation",
        default=False,
        annotation=bool,
        check=_boolean,
        doc=(
            "Boolean, defaults to `False`. If `True`, each micro-batch "
            "weighs in the update by its count, what its loss was "
            "averaged over (valid tokens under a mask, samples, or the "
            "sum of sample weights), passed as `apply(..., count=n)` "
            "or, in `model.fit`, by "
            "`keras_gradtools.exact_accumulation(model)` (which sets "
            "this): K micro-batches of unequal counts then give the "
            "update of one big batch, where equal weights (Keras's "
            "accumulation) give a mean of means. The gradient "
            "statistics stay in micro-batches of the mean count."
        ),
    ),
    Argument(
        "on_nonfinite",
        default="skip",
        annotation=NonfinitePolicy,
        check=_nonfinite_policy,
        doc=(
            '`"skip"` (default), `"raise"` or `"apply"`. With `"skip"`, '
            "a micro-batch whose gradient holds a NaN or an infinity is "
            "left out of the accumulators (and counted in "
            "`skipped_micro_batches`); an update whose micro-batches "
            'were all non-finite is skipped. `"raise"` raises before '
            "anything is written (a `FloatingPointError` naming the "
            "micro-batch and the variables when `apply` runs eagerly; a "
            "failed assertion in a graph; not possible inside an "
            "XLA-compiled step, which is refused when traced). "
            '`"apply"` is Keras\'s behaviour.'
        ),
    ),
    Argument(
        "track_gradient_statistics",
        default=False,
        annotation=bool,
        check=_boolean,
        doc=(
            "Boolean, defaults to `False`. If `True`, measure "
            "`gradient_statistics()` inside every update (a few scalar "
            "reductions over the mean gradient) and keep the sum of "
            "squared gradients where the update rule does not already "
            "need it, so that the variance and noise scale can be "
            "reported. `GradientVarianceMonitor` switches this on."
        ),
    ),
    Argument(
        "jit_compile",
        default=True,
        annotation=bool,
        check=_boolean,
        doc=(
            "Boolean, defaults to `True`. When `apply` is called "
            "eagerly, run the whole update as one XLA-compiled "
            "function. Inside a `tf.function` or `model.fit` the update "
            "is traced into the caller's graph (and its XLA cluster, if "
            "it has one)."
        ),
    ),
)

# Keras's own clipping arguments, which the pipeline applies (to the mean
# gradient, or to each micro-batch with `clip_micro_batches`).
CLIP_ARGUMENTS = tuple(
    Argument(
        name,
        default=None,
        annotation=float | None,
        check=validation.check_optional_positive,
        doc=(
            f"Optional float > 0. {what} Applied to the mean gradient at "
            "update time (to each micro-batch with `clip_micro_batches`); "
            "at most one of the three clipping arguments."
        ),
    )
    for name, what in (
        ("clipnorm", "Each tensor's gradient is clipped to this L2 norm."),
        ("clipvalue", "Each gradient entry is clipped to [-value, value]."),
        (
            "global_clipnorm",
            "All gradients are scaled so that their global L2 norm is at "
            "most this.",
        ),
    )
)
NAME_DOC = (
    "Optional string, the optimizer's name (Keras's automatic naming when "
    "`None`: `adam`, `adam_1`, ...)."
)


class PipelineSettings:
    """The pipeline's validated settings, one attribute per argument of
    `PIPELINE_ARGUMENTS` plus the clipping thresholds.

    `accumulation_steps` is the configured K (the current K is state);
    `noise_seed` is drawn here when `None`. `track_gradient_statistics`
    and `weighted_accumulation` may be switched on later (by the monitor,
    by a count given to `apply`), before or after `build`.
    """

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any]) -> "PipelineSettings":
        """Validates `arguments` (keywords of `PIPELINE_ARGUMENTS` and
        `CLIP_ARGUMENTS`; missing ones take their defaults).

        Raises:
            ValueError: naming the argument and its accepted range.
        """
        values = {a.name: a.default for a in PIPELINE_ARGUMENTS}
        values.update({a.name: a.default for a in CLIP_ARGUMENTS})
        values.update(arguments)
        for argument in PIPELINE_ARGUMENTS + CLIP_ARGUMENTS:
            if argument.check is not None:
                values[argument.name] = argument.check(
                    argument.name, values[argument.name]
                )
        steps = validation.resolve_accumulation_steps(
            values["accumulation_steps"],
            values.pop("gradient_accumulation_steps"),
        )
        values["accumulation_steps"] = steps
        values["max_accumulation_steps"] = (
            validation.resolve_max_accumulation_steps(
                values["max_accumulation_steps"], steps
            )
        )
        if values["noise_seed"] is None:
            values["noise_seed"] = random.randrange(2**31 - 1)
        return cls(**values)

    @property
    def accumulates(self) -> bool:
        """Whether micro-batches are accumulated (the largest K is above
        1): the gradient sums exist."""
        return self.max_accumulation_steps > 1

    @property
    def noise(self) -> bool:
        return self.noise_eta > 0

    def config(self) -> dict[str, Any]:
        """The arguments that recreate this pipeline (`get_config`); the
        clipping thresholds are Keras's and saved by it."""
        return {
            a.name: getattr(self, a.name)
            for a in PIPELINE_ARGUMENTS
            if a.name != "gradient_accumulation_steps"
        }


def split_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Takes the pipeline's keywords out of `kwargs` (in place) and returns
    them."""
    names = {a.name for a in PIPELINE_ARGUMENTS}
    return {name: kwargs.pop(name) for name in list(kwargs) if name in names}


def docstring_args(indent: int = 8) -> str:
    """The "Args" entries of the pipeline's arguments and `name`, for a
    docstring whose entries are indented by `indent` spaces."""
    pad = " " * indent
    entries = [(a.name, a.doc) for a in PIPELINE_ARGUMENTS]
    entries.append(("name", NAME_DOC))
    text = []
    for name, doc in entries:
        text.append(
            textwrap.fill(
                f"{name}: {doc}",
                width=79,
                initial_indent=pad,
                subsequent_indent=pad + "    ",
                break_on_hyphens=False,
            )
        )
    return "\n".join(text).lstrip()


def declare_arguments(cls: type, declared=PIPELINE_ARGUMENTS) -> type:
    """Gives `cls` the `declared` arguments in the signature of its
    `__init__` (which takes them through `**kwargs`) and in its docstring
    (in place of `{{pipeline_keyword_args}}`); returns `cls`."""
    cls.__doc__ = cls.__doc__.replace(
        "{{pipeline_keyword_args}}", docstring_args()
    )
    cls.__init__.__signature__ = signature_with_arguments(
        cls.__init__, declared
    )
    return cls


def signature_with_arguments(
    function: Callable, arguments=PIPELINE_ARGUMENTS
) -> inspect.Signature:
    """`function`'s signature with `arguments` as keyword-only parameters
    before its `**kwargs` (what `help()` and editors show for an
    `__init__` that takes them through `**kwargs`)."""
    signature = inspect.signature(function)
    parameters = [
        p
        for p in signature.parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    present = {p.name for p in parameters}
    extra = [
        inspect.Parameter(
            a.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=a.default,
            annotation=a.annotation,
        )
        for a in arguments
        if a.name not in present
    ]
    variadic = [
        p
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.VAR_KEYWORD
    ]
    return signature.replace(parameters=parameters + extra + variadic)
