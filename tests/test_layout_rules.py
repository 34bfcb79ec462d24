"""The layout rule of issue 24: backend-specific code (TensorFlow, JAX,
`tf.distribute`) lives under `keras_gradtools/backends/` only, and private
Keras (`keras.src`) imports too (private names in
`backends/private_api.py`, tested by test_private_api.py)."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_gradtools"
BACKENDS = PACKAGE / "backends"
FORBIDDEN = ("tensorflow", "jax", "keras.src")
# Modules outside backends/ still allowed to import a forbidden module,
# relative to the package's parent.
ALLOWED: set[str] = set()


def _forbidden(name):
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _imported_modules(tree):
    """`(line, module)` for every import at any nesting level, `from keras
    import src` and `importlib.import_module("...")`/`__import__("...")`
    with a literal name included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def _violations():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if BACKENDS in path.parents:
            continue
        name = path.relative_to(PACKAGE.parent).as_posix()
        if name in ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += [
            f"{name}:{line} imports {module}"
            for line, module in _imported_modules(tree)
            if _forbidden(module)
        ]
    return found


def test_backend_imports_live_under_backends():
    assert _violations() == []


def test_the_rule_sees_nested_and_indirect_imports():
    source = (
        "import keras\n"
        "from keras import src\n"
        "def f():\n"
        "    if True:\n"
        "        import jax.numpy as jnp\n"
        "    from tensorflow.python.ops import control_flow_util\n"
        "    importlib.import_module('tensorflow')\n"
        "from keras_gradtools import transforms\n"
    )
    seen = {m for _, m in _imported_modules(ast.parse(source)) if _forbidden(m)}
    assert seen == {
        "keras.src",
        "jax.numpy",
        "tensorflow.python.ops",
        "tensorflow.python.ops.control_flow_util",
        "tensorflow",
    }


def test_allowlist_names_existing_files_only():
    """An entry for a file that is gone is stale: remove it."""
    stale = [n for n in ALLOWED if not (PACKAGE.parent / n).exists()]
    assert stale == []


@pytest.mark.jax_only
def test_jax_only_install_imports_no_tensorflow():
    """On JAX, importing the package and the modules that delegate to
    backends/ must not need TensorFlow (blocked here, as if absent)."""
    code = (
        "import sys\n"
        "sys.modules['tensorflow'] = None\n"
        "import keras_gradtools, keras_gradtools.callbacks\n"
        "import keras_gradtools.distribute, keras_gradtools.transforms\n"
        "import keras_gradtools.exact_accumulation, keras_gradtools.plotting\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        env={**os.environ, "KERAS_BACKEND": "jax"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
