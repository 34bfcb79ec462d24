"""Faults and odd cases: absent and sparse gradients, mixed precision,
loss-scale overflows, cycles that span epochs, and properties that must hold
for any shape, K, beta and clipping setting (hypothesis)."""

import keras
import numpy as np
import pytest
from helpers import compiled_classifier
from helpers import digits
from helpers import tiny_classifier
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_gradtools as kg


def test_absent_variable_restarts_its_sums_each_cycle(rng):
    a = keras.Variable(np.zeros(3, "float32"))
    b = keras.Variable(np.zeros(2, "float32"))
    optimizer = kg.SGD(1.0, accumulation_steps=2, jit_compile=False)
    g = [
        rng.normal(size=(4, 3)).astype("float32"),
        rng.normal(size=(4, 2)).astype("float32"),
    ]
    optimizer.apply([g[0][0], g[1][0]], [a, b])  # cycle 1: b present...
    optimizer.apply([g[0][1], None], [a, b])  # ...then absent: not updated
    np.testing.assert_array_equal(b.numpy(), 0.0)
    optimizer.apply([g[0][2], None], [a, b])  # cycle 2 starts without b
    optimizer.apply([g[0][3], g[1][3]], [a, b])
    # b's cycle-2 sum is g_b[3] alone (mean over the 2 micro-batches), not
    # the stale g_b[0] from cycle 1 plus g_b[3].
    np.testing.assert_allclose(b.numpy(), -g[1][3] / 2, rtol=1e-6)
    np.testing.assert_allclose(
        a.numpy(), -(g[0].sum(axis=0)) / 2, rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.tensorflow_only
def test_sparse_embedding_gradients_equal_the_dense_computation():
    """Rows are scattered into the sums (repeated ids summed first); the
    result, statistics included, equals densifying every gradient."""
    import tensorflow as tf

    ids = np.random.default_rng(0).integers(0, 20, size=(4, 8, 6))
    targets = np.random.default_rng(1).normal(size=(4, 8, 1)).astype("float32")

    def run(densify):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6,), dtype="int32"),
                keras.layers.Embedding(50, 4),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(1),
            ]
        )
        optimizer = kg.Adam(
            0.05,
            accumulation_steps=2,
            noise_eta=1e-3,
            noise_seed=1,
            global_clipnorm=1.0,
            track_gradient_statistics=True,
        )
        initial = model.get_weights()[0]
        kinds = set()
        for x, y in zip(ids, targets):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean((model(x) - y) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            kinds |= {type(g).__name__ for g in grads}
            if densify:
                grads = [tf.convert_to_tensor(g) for g in grads]
            optimizer.apply(grads, model.trainable_variables)
        stats = {
            k: float(v) for k, v in optimizer.gradient_statistics().items()
        }
        return model.get_weights(), stats, kinds, initial

    sparse, sparse_stats, kinds, initial = run(densify=False)
    dense, dense_stats, _, _ = run(densify=True)
    assert "IndexedSlices" in kinds
    for s, d in zip(sparse, dense):
        np.testing.assert_allclose(s, d, rtol=1e-6, atol=1e-7)
    for key, value in dense_stats.items():
        np.testing.assert_allclose(sparse_stats[key], value, rtol=1e-5)
    untouched = np.setdiff1d(np.arange(50), ids)
    assert untouched.size  # rows no id touched: moved by noise alone
    assert not np.allclose(
        sparse[0][untouched], run_initial_embedding()[untouched]
    )


def run_initial_embedding():
    keras.utils.set_random_seed(0)
    layer = keras.layers.Embedding(50, 4)
    layer.build((None, 6))
    return layer.get_weights()[0]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_state(policy):
    x, y = digits(512)
    keras.mixed_precision.set_global_policy(policy)
    try:
        optimizer = kg.Adam(
            1e-2, accumulation_steps=4, noise_eta=1e-4, noise_seed=0
        )
        model = compiled_classifier(optimizer)
        # Six epochs: the loss falls to about half under either policy, so
        # the 0.7 bound tests training, not the draw of the noise.
        history = model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]
    for variable in optimizer.variables:
        if len(variable.shape):
            assert variable.dtype == "float32", variable.name
    assert (
        int(optimizer.iterations.numpy())
        == int(optimizer.micro_steps.numpy()) // 4
    )


def test_loss_scale_overflows_do_not_advance_the_cycle():
    x, y = digits(512)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        optimizer = kg.Adam(1e-2, accumulation_steps=4)
        # A loss scale of 2**24 overflows float16 gradients: Keras skips
        # those steps (halving the scale) before our optimizer sees them.
        wrapped = keras.optimizers.LossScaleOptimizer(
            optimizer, initial_scale=2.0**24
        )
        model = compiled_classifier(wrapped)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    steps = 512 // 16
    micro = int(optimizer.micro_steps.numpy())
    assert float(wrapped.dynamic_scale.numpy()) < 2.0**24
    assert 0 < micro < steps
    assert int(optimizer.iterations.numpy()) == micro // 4
    assert int(optimizer.skipped_micro_batches.numpy()) == 0
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_cycle_spans_epochs_and_k_larger_than_an_epoch():
    x, y = digits(64)
    optimizer = kg.SGD(0.1, accumulation_steps=10)
    model = compiled_classifier(optimizer)
    before = model.get_weights()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # 8 micro-batches
    assert all(
        np.array_equal(a, b) for a, b in zip(before, model.get_weights())
    )
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)  # 20 in total
    assert int(optimizer.micro_steps.numpy()) == 20
    assert int(optimizer.iterations.numpy()) == 2


# ----------------------------------------------------------------------
# Properties (hypothesis). jit_compile=False keeps each example cheap; the
# compiled path is covered by the other tests.

shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    min_size=1,
    max_size=3,
)
clips = st.one_of(
    st.just({}),
    st.floats(0.05, 5.0).map(lambda v: {"clipvalue": v}),
    st.floats(0.05, 5.0).map(lambda v: {"clipnorm": v}),
    st.floats(0.05, 5.0).map(lambda v: {"global_clipnorm": v}),
)
PROPERTY = settings(max_examples=20, deadline=None, derandomize=True)


def _gradients(seed, shapes, count, scale):
    rng = np.random.default_rng(seed)
    return [
        [(scale * rng.normal(size=s)).astype("float32") for s in shapes]
        for _ in range(count)
    ]


@pytest.mark.slow
@PROPERTY
@given(
    shapes=shapes,
    k=st.integers(1, 8),
    beta_1=st.floats(0.0, 0.95),
    beta_2=st.floats(0.5, 0.999),
    clip=clips,
    seed=st.integers(0, 2**16),
)
def test_macro_adam_is_large_batch_adam(shapes, k, beta_1, beta_2, clip, seed):
    micro = _gradients(seed, shapes, 2 * k, 1.0)
    init = _gradients(seed + 1, shapes, 1, 1.0)[0]
    ours_vars = [keras.Variable(v) for v in init]
    keras_vars = [keras.Variable(v) for v in init]
    ours = kg.Adam(
        0.01,
        beta_1=beta_1,
        beta_2=beta_2,
        accumulation_steps=k,
        second_moment="macro",
        jit_compile=False,
        **clip,
    )
    reference = keras.optimizers.Adam(
        0.01, beta_1=beta_1, beta_2=beta_2, **clip
    )
    for grads in micro:
        ours.apply(grads, ours_vars)
    for c in range(2):
        cycle = micro[c * k : (c + 1) * k]
        reference.apply(
            [
                np.mean([g[i] for g in cycle], axis=0)
                for i in range(len(shapes))
            ],
            keras_vars,
        )
    for a, b in zip(ours_vars, keras_vars):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=2e-6)


@pytest.mark.slow
@PROPERTY
@given(
    shapes=shapes,
    k=st.integers(1, 8),
    rule=st.sampled_from(["sgd", "adam_micro", "adam_macro", "adamw"]),
    clip=clips,
    noise=st.sampled_from([0.0, 1e-2]),
    scale=st.sampled_from([1e-6, 1.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_finite_inputs_give_finite_state(
    shapes, k, rule, clip, noise, scale, seed
):
    factories = {
        "sgd": lambda **kw: kg.SGD(0.1, momentum=0.9, **kw),
        "adam_micro": lambda **kw: kg.Adam(0.01, **kw),
        "adam_macro": lambda **kw: kg.Adam(0.01, second_moment="macro", **kw),
        "adamw": lambda **kw: kg.AdamW(0.01, amsgrad=True, **kw),
    }
    optimizer = factories[rule](
        accumulation_steps=k, noise_eta=noise, noise_seed=seed,
        track_gradient_statistics=True, jit_compile=False, **clip,
    )  # fmt: skip
    variables = [keras.Variable(v) for v in _gradients(seed, shapes, 1, 1.0)[0]]
    for grads in _gradients(seed + 1, shapes, 2 * k, scale):
        optimizer.apply(grads, variables)
    assert int(optimizer.iterations.numpy()) == 2
    for v in variables + [
        v for v in optimizer.variables if "statistic_" not in v.name
    ]:
        assert np.all(np.isfinite(np.asarray(v.numpy(), "float64"))), v.name


@PROPERTY
@given(
    k=st.integers(1, 8),
    lr=st.floats(0.0, 1.0),
    eta=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**31 - 1),
    clip=clips,
    second_moment=st.sampled_from(["micro", "macro"]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_config_round_trip_is_the_identity(
    k, lr, eta, gamma, seed, clip, second_moment, flags
):
    optimizer = kg.AdamW(
        lr, accumulation_steps=k, noise_eta=eta, noise_gamma=gamma,
        noise_seed=seed, second_moment=second_moment,
        clip_micro_batches=flags[0], track_gradient_statistics=flags[1],
        amsgrad=flags[2], **clip,
    )  # fmt: skip
    config = optimizer.get_config()
    assert kg.AdamW.from_config(config).get_config() == config


# On JAX, Keras's own trainer cannot freeze a layer between fits with the
# same optimizer, for any optimizer: without recompiling, its
# stateless_apply refuses the shorter variable list; recompiled, "Unable to
# automatically build the model" (Keras 3.15).
@pytest.mark.tensorflow_only
def test_freeze_and_unfreeze_between_fits():
    x, y = digits(256)
    model = tiny_classifier()
    optimizer = kg.Adam(1e-2, accumulation_steps=3)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(x, y, batch_size=32, verbose=0)  # 8 micro-batches: mid-cycle
    first = model.layers[0]
    first.trainable = False
    model.compile(optimizer=optimizer, loss=loss)
    frozen = [w.copy() for w in first.get_weights()]
    model.fit(x, y, batch_size=32, verbose=0)
    for a, b in zip(frozen, first.get_weights()):
        np.testing.assert_array_equal(a, b)
    first.trainable = True
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(x, y, batch_size=32, verbose=0)
    assert any(
        not np.array_equal(a, b) for a, b in zip(frozen, first.get_weights())
    )
    assert int(optimizer.micro_steps.numpy()) == 24
    assert int(optimizer.iterations.numpy()) == 8
    assert all(np.isfinite(w).all() for w in model.get_weights())


@pytest.mark.slow
@PROPERTY
@given(
    shapes=shapes,
    rule=st.sampled_from(["sgd", "adam", "adamw"]),
    momentum=st.floats(0.0, 0.99),
    nesterov=st.booleans(),
    beta_1=st.floats(0.0, 0.95),
    beta_2=st.floats(0.5, 0.999),
    clip=clips,
    seed=st.integers(0, 2**16),
)
def test_k1_is_keras(
    shapes, rule, momentum, nesterov, beta_1, beta_2, clip, seed
):
    pairs = {
        "sgd": (
            lambda **kw: kg.SGD(
                0.1, momentum=momentum, nesterov=nesterov, **kw
            ),
            lambda **kw: keras.optimizers.SGD(
                0.1, momentum=momentum, nesterov=nesterov, **kw
            ),
        ),
        "adam": (
            lambda **kw: kg.Adam(0.01, beta_1=beta_1, beta_2=beta_2, **kw),
            lambda **kw: keras.optimizers.Adam(
                0.01, beta_1=beta_1, beta_2=beta_2, **kw
            ),
        ),
        "adamw": (
            lambda **kw: kg.AdamW(0.01, beta_1=beta_1, beta_2=beta_2, **kw),
            lambda **kw: keras.optimizers.AdamW(
                0.01, beta_1=beta_1, beta_2=beta_2, **kw
            ),
        ),
    }
    ours_factory, keras_factory = pairs[rule]
    init = _gradients(seed, shapes, 1, 1.0)[0]
    ours_vars = [keras.Variable(v) for v in init]
    keras_vars = [keras.Variable(v) for v in init]
    ours = ours_factory(jit_compile=False, **clip)
    reference = keras_factory(**clip)
    for grads in _gradients(seed + 1, shapes, 3, 1.0):
        ours.apply(grads, ours_vars)
        reference.apply(grads, keras_vars)
    for a, b in zip(ours_vars, keras_vars):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=2e-6)
