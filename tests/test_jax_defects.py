"""JAX defects of issue 23: sparse (`jax.experimental.sparse`) gradients,
and errors raised by the optimizer inside `fit`.

1. Keras's optimizers accept `BCOO` (and `BCSR`) gradients on JAX; ours
   crashed in the non-finite check (`bcoo_reshape`). They are densified, so
   the result must equal that of the same gradients given dense, which the
   tests build with NumPy from the sparse arrays' coordinates.
2. An error raised inside the first step of a JAX `fit` (our refusal of
   `on_nonfinite="raise"` under `jax.jit`, a non-finite gradient in that
   mode, Keras's own check of the variables after a layer is frozen) must
   reach the user, not a `TypeError` from reading the variables that
   Keras's trainer has detached.
"""

import keras
import numpy as np
import pytest

import keras_gradtools as kg

pytestmark = pytest.mark.jax_only

K_VALUES = (1, 3)

OPTIMIZERS = {
    "sgd": lambda k: kg.SGD(
        learning_rate=0.1, momentum=0.9, accumulation_steps=k
    ),
    "adam_micro": lambda k: kg.Adam(
        learning_rate=0.01, second_moment="micro", accumulation_steps=k
    ),
    "adam_macro": lambda k: kg.Adam(
        learning_rate=0.01, second_moment="macro", accumulation_steps=k
    ),
    "adamw": lambda k: kg.AdamW(
        learning_rate=0.01, weight_decay=0.1, accumulation_steps=k
    ),
    "wrap_rmsprop": lambda k: kg.wrap(
        keras.optimizers.RMSprop(learning_rate=0.01), accumulation_steps=k
    ),
}

# (5, 3, 2) row-sparse, (4, 3) element-sparse, (4, 3) as BCSR, (3,) dense.
SHAPES = [(5, 3, 2), (4, 3), (4, 3), (3,)]


def _micro_batch(rng):
    """One micro-batch of gradients, as sparse arrays (and a dense one) and
    as the dense NumPy arrays they stand for (built from their coordinates,
    repeated coordinates summed)."""
    from jax.experimental import sparse as jax_sparse

    # Rows 0 and 3 of a (5, 3, 2) variable, row 0 twice.
    rows = np.array([[0], [3], [0]])
    row_data = rng.normal(size=(3, 3, 2)).astype("float32")
    row_dense = np.zeros((5, 3, 2), "float32")
    np.add.at(row_dense, rows[:, 0], row_data)
    row_sparse = jax_sparse.BCOO((row_data, rows), shape=(5, 3, 2))

    # Single entries of a (4, 3) variable, (1, 2) twice.
    entries = np.array([[1, 2], [3, 0], [1, 2], [0, 1]])
    entry_data = rng.normal(size=(4,)).astype("float32")
    entry_dense = np.zeros((4, 3), "float32")
    np.add.at(entry_dense, (entries[:, 0], entries[:, 1]), entry_data)
    entry_sparse = jax_sparse.BCOO((entry_data, entries), shape=(4, 3))

    csr_dense = rng.normal(size=(4, 3)).astype("float32")
    csr_dense[rng.random((4, 3)) < 0.5] = 0.0
    csr_sparse = jax_sparse.BCSR.fromdense(csr_dense)

    plain = rng.normal(size=(3,)).astype("float32")
    return (
        [row_sparse, entry_sparse, csr_sparse, plain],
        [row_dense, entry_dense, csr_dense, plain],
    )


def _variables(rng):
    return [rng.normal(size=s).astype("float32") for s in SHAPES]


def _assert_states_equal(opt_a, vars_a, opt_b, vars_b):
    for a, b in zip(vars_a, vars_b):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            rtol=1e-6,
            atol=1e-7,
        )
    for a, b in zip(opt_a, opt_b):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a),
            keras.ops.convert_to_numpy(b),
            rtol=1e-6,
            atol=1e-7,
        )


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sparse_gradients_apply_like_dense(name, k, rng):
    initial = _variables(rng)
    sparse_vars = [keras.Variable(v) for v in initial]
    dense_vars = [keras.Variable(v) for v in initial]
    sparse_opt = OPTIMIZERS[name](k)
    dense_opt = OPTIMIZERS[name](k)
    for _ in range(2 * k):  # two updates
        sparse_grads, dense_grads = _micro_batch(rng)
        sparse_opt.apply(sparse_grads, sparse_vars)
        dense_opt.apply(dense_grads, dense_vars)
    assert int(sparse_opt.iterations) == 2
    # The update did move the variables.
    assert not np.allclose(sparse_vars[0].numpy(), initial[0])
    _assert_states_equal(
        sparse_opt.variables, sparse_vars, dense_opt.variables, dense_vars
    )


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("name", ["adam_micro", "wrap_rmsprop"])
def test_sparse_gradients_through_jitted_stateless_apply(name, k, rng):
    import jax

    initial = _variables(rng)
    states, steps = {}, {}
    for kind in ("sparse", "dense"):
        variables = [keras.Variable(v) for v in initial]
        optimizer = OPTIMIZERS[name](k)
        optimizer.build(variables)
        steps[kind] = jax.jit(optimizer.stateless_apply)
        states[kind] = (
            [v.value for v in optimizer.variables],
            [v.value for v in variables],
        )
    for _ in range(2 * k):
        sparse_grads, dense_grads = _micro_batch(rng)
        for kind, grads in (("sparse", sparse_grads), ("dense", dense_grads)):
            opt_values, var_values = states[kind]
            var_values, opt_values = steps[kind](opt_values, grads, var_values)
            states[kind] = (opt_values, var_values)
    sparse_opt, sparse_vars = states["sparse"]
    dense_opt, dense_vars = states["dense"]
    assert not np.allclose(np.asarray(sparse_vars[0]), initial[0])
    _assert_states_equal(sparse_opt, sparse_vars, dense_opt, dense_vars)


# ----------------------------------------------------------------------
# Errors raised in the first step of `fit`.


def _model():
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)]
    )


def _data(value=1.0):
    return np.full((8, 3), value, "float32"), np.ones((8, 1), "float32")


def test_fit_shows_the_refusal_of_raise_under_jit():
    model = _model()
    model.compile(optimizer=kg.Adam(on_nonfinite="raise"), loss="mse")
    with pytest.raises(ValueError, match="cannot raise inside a jax.jit"):
        model.fit(*_data(), epochs=1, verbose=0)


def test_fit_shows_a_nonfinite_gradient_with_raise_uncompiled():
    model = _model()
    model.compile(
        optimizer=kg.Adam(on_nonfinite="raise"), loss="mse", jit_compile=False
    )
    with pytest.raises(FloatingPointError, match="holds NaN or inf"):
        model.fit(*_data(np.nan), epochs=1, verbose=0)


def test_fit_shows_keras_error_after_a_layer_is_frozen():
    model = _model()
    model.compile(optimizer=kg.Adam(), loss="mse")
    model.fit(*_data(), epochs=1, verbose=0)
    model.layers[0].trainable = False
    # Keras's own check of the variables the optimizer was built with.
    with pytest.raises(ValueError, match="the optimizer was built with"):
        model.fit(*_data(), epochs=1, verbose=0)


def test_sparse_gradient_with_nan_is_refused_with_raise(rng):
    from jax.experimental import sparse as jax_sparse

    variable = keras.Variable(np.ones((5, 3), "float32"))
    optimizer = kg.SGD(learning_rate=0.1, on_nonfinite="raise")
    data = np.array([1.0, np.nan], "float32")
    grad = jax_sparse.BCOO((data, np.array([[0, 1], [4, 2]])), shape=(5, 3))
    with pytest.raises(FloatingPointError, match="holds NaN or inf"):
        optimizer.apply([grad], [variable])
    np.testing.assert_array_equal(variable.numpy(), np.ones((5, 3)))
    assert int(optimizer.iterations) == 0


@pytest.mark.parametrize(
    "options",
    [
        {"second_moment": "micro"},
        {"global_clipnorm": 1.0, "noise_eta": 1e-3},
        {"track_gradient_statistics": True},
        {"weighted_accumulation": True},
    ],
    ids=["micro", "clip_noise", "statistics", "weighted"],
)
def test_state_keeps_its_types_so_fit_compiles_once(options):
    """Every optimizer variable keeps its dtype, weak type and shape over
    a step: a changed type (a weakly typed int written into an int32
    counter) made JAX compile the step again at the next `fit`."""
    import jax

    optimizer = kg.Adam(1e-3, accumulation_steps=4, **options)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build(model.trainable_variables)

    def signature():
        return {
            v.path: (str(v.value.dtype), v.value.weak_type, v.value.shape)
            for v in optimizer.variables
        }

    before = signature()
    x, y = np.ones((8, 4), "float32"), np.ones((8, 2), "float32")
    model.fit(x, y, batch_size=8, verbose=0)
    assert signature() == before
    assert isinstance(optimizer.variables[0].value, jax.Array)
