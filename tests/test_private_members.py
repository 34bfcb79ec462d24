"""The encapsulation rule of issue 24: no module of the package reaches
into private members (`_name`) that only another module of the package
defines.

Counted strictly, per module: an access `X._name` (any `X`, `self`
included; `getattr`/`hasattr` with a literal name too) or an import of a
private name counts when `_name` is defined nowhere in the module itself
(as `def _name`, an assignment to `_name` or `X._name`, `setattr` /
`object.__setattr__` with the literal name) but is defined in another
module of the package. So a mixin that reads `self._x` which only the
class it is mixed into sets counts; it should ask through a public,
documented member instead, or own the state itself.

Names that Keras's own optimizer defines (`self._iterations`,
`self._var_key`, ...) are Keras's subclassing interface, used as Keras's
own optimizers use them, and are not counted. Private names of other
libraries (TensorFlow, JAX, Keras internals) are the business of
`backends/private_api.py` and test_private_api.py.
"""

import ast
import collections
import pathlib

import keras

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_gradtools"

# At most 5 cross-module private uses, each justified:
# "module:name" -> why it is not a public member.
ALLOWED: dict[str, str] = {
    "keras_gradtools/optimizers/base.py:_apply_rule": (
        "PipelineHooks, the adapter through which the pipeline reaches its "
        "optimizer (design.md §4), calls the rule sequence's step, which "
        "the wrapper overrides; a hook, not a user API"
    ),
}

_DEFINING_CALLS = ("setattr", "__setattr__")
_READING_CALLS = ("getattr", "hasattr")


def _is_private(name):
    return (
        name.startswith("_")
        and not (name.startswith("__") and name.endswith("__"))
        and name != "_"
    )


def _literal_name(call):
    """The literal attribute name of `getattr(x, "_name", ...)` and
    friends, or `None`."""
    if len(call.args) >= 2 and isinstance(call.args[1], ast.Constant):
        value = call.args[1].value
        if isinstance(value, str):
            return value
    return None


def _called_name(call):
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _scan(tree):
    """`(defined, used)`: the private names a module defines, and
    `(line, name)` for each private name it reads or imports."""
    defined = set()
    used = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defined.add(node.name)
        elif isinstance(node, ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute):
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                defined.add(node.attr)
            else:
                used.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call):
            called = _called_name(node)
            name = _literal_name(node)
            if name is None:
                continue
            if called in _DEFINING_CALLS:
                defined.add(name)
            elif called in _READING_CALLS:
                used.append((node.lineno, name))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                used.append((node.lineno, alias.name))
    return (
        {name for name in defined if _is_private(name)},
        [(line, name) for line, name in used if _is_private(name)],
    )


def _keras_names():
    """The private names of Keras's optimizer (class and instance: its
    subclassing interface) and of its variables (which
    `backends/private_api.py` reads, e.g. `_layout`)."""
    names = set()
    for cls in keras.optimizers.Optimizer.__mro__:
        names.update(vars(cls))
    names.update(vars(keras.optimizers.SGD(0.1)))
    variable = keras.Variable(0.0)
    for cls in type(variable).__mro__:
        names.update(vars(cls))
    names.update(vars(variable))
    return {name for name in names if _is_private(name)}


def _modules():
    scanned = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        scanned[name] = _scan(tree)
    return scanned


def cross_module_uses():
    """`{"module:name": ["module:line", ...]}` for every cross-module
    private use, and the same for uses of Keras's optimizer's privates."""
    scanned = _modules()
    definers = collections.defaultdict(set)
    for module, (defined, _) in scanned.items():
        for name in defined:
            definers[name].add(module)
    keras_names = _keras_names()
    ours = collections.defaultdict(list)
    keras_interface = collections.defaultdict(list)
    for module, (defined, used) in scanned.items():
        for line, name in used:
            if name in defined or not definers[name] - {module}:
                continue
            where = f"{module}:{line}"
            if name in keras_names:
                keras_interface[f"{module}:{name}"].append(where)
            else:
                ours[f"{module}:{name}"].append(where)
    return dict(ours), dict(keras_interface)


def test_no_private_member_of_another_module():
    ours, _ = cross_module_uses()
    unexpected = {
        key: lines for key, lines in ours.items() if key not in ALLOWED
    }
    assert not unexpected, (
        "Private members used outside the module that defines them (give "
        "the owner a public, documented member, or move the state to the "
        "module that uses it):\n"
        + "\n".join(
            f"  {key}: {', '.join(lines)}"
            for key, lines in sorted(unexpected.items())
        )
    )


def test_allowlist_is_short_justified_and_current():
    ours, _ = cross_module_uses()
    assert len(ALLOWED) <= 5
    for key, reason in ALLOWED.items():
        assert reason.strip(), key
        assert key in ours, f"{key} is allowed but no longer used: remove it"
