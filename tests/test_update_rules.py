"""The optimizers against the independent float64 reference (numpy_reference).

Every update rule x accumulation steps K x clipping mode is trained for
five cycles on random shapes and compared, after every update, with the
float64 NumPy reference written from docs/design.md (eagerly, plus one
XLA-compiled case per rule). The noise is checked
statistically on a million-element variable.

Tolerances. Each comparison uses rtol=1e-5, atol=1e-6 on weights of order
one. float32 round-off in a few updates is ~1e-7 relative; the largest
float32 effect is the representation of beta_2 inside 1 - beta_2**t, a
relative error of about 6e-8 / (1 - beta_2) in the step, so the Adam cases
use beta_2 = 0.99 (6e-6 of a step of lr = 0.02, i.e. ~1e-7 absolute)
rather than 0.999. A wrong exponent, a missing W term or clipping at the
wrong place changes the step by O(1), far beyond these tolerances.
"""

import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import numpy_reference as ref  # noqa: E402
import pytest  # noqa: E402

import keras_gradtools as kg  # noqa: E402

RTOL = 1e-5
ATOL = 1e-6
SHAPE_POOL = [(3, 4), (5,), (2, 3, 2), (4, 1), (7,), (2, 2, 3)]
# Thresholds chosen against gradients of scale ~0.2..2 (see
# `_cycle_gradients`) so that every mode clips in the large-scale cycles;
# each test also asserts that the reference did clip.
CLIP_THRESHOLDS = {
    None: None,
    "clipvalue": 1.0,
    "clipnorm": 3.0,
    "global_clipnorm": 4.0,
}
# Per-cycle gradient scales: large, then smaller (so that v decreases and
# amsgrad's maximum matters), then large again.
CYCLE_SCALES = (2.0, 0.7, 0.3, 1.5, 0.2)

LR_SGD = 0.1
LR_ADAM = 0.02
BETA_1 = 0.9
BETA_2 = 0.99
WEIGHT_DECAY = 0.1

RULES = {
    "sgd": (
        lambda **kw: kg.SGD(LR_SGD, **kw),
        lambda k: ref.SGDRule(LR_SGD),
    ),
    "sgd_momentum": (
        lambda **kw: kg.SGD(LR_SGD, momentum=0.9, **kw),
        lambda k: ref.SGDRule(LR_SGD, momentum=0.9),
    ),
    "sgd_nesterov": (
        lambda **kw: kg.SGD(LR_SGD, momentum=0.9, nesterov=True, **kw),
        lambda k: ref.SGDRule(LR_SGD, momentum=0.9, nesterov=True),
    ),
    "adam_macro": (
        lambda **kw: kg.Adam(
            LR_ADAM, BETA_1, BETA_2, second_moment="macro", **kw
        ),
        lambda k: ref.AdamRule(
            LR_ADAM, BETA_1, BETA_2, second_moment="macro", accumulation_steps=k
        ),
    ),
    "adam_micro": (
        lambda **kw: kg.Adam(
            LR_ADAM, BETA_1, BETA_2, second_moment="micro", **kw
        ),
        lambda k: ref.AdamRule(
            LR_ADAM, BETA_1, BETA_2, second_moment="micro", accumulation_steps=k
        ),
    ),
    "adam_amsgrad": (
        lambda **kw: kg.Adam(
            LR_ADAM,
            BETA_1,
            BETA_2,
            amsgrad=True,
            second_moment="micro",
            **kw,
        ),
        lambda k: ref.AdamRule(
            LR_ADAM,
            BETA_1,
            BETA_2,
            amsgrad=True,
            second_moment="micro",
            accumulation_steps=k,
        ),
    ),
    "adamw": (
        lambda **kw: kg.AdamW(
            LR_ADAM, WEIGHT_DECAY, beta_1=BETA_1, beta_2=BETA_2, **kw
        ),
        # AdamW's default second moment, written here: "macro".
        lambda k: ref.AdamRule(
            LR_ADAM,
            BETA_1,
            BETA_2,
            weight_decay=WEIGHT_DECAY,
            second_moment="macro",
            accumulation_steps=k,
        ),
    ),
}
RULE_NAMES = list(RULES)
CLIP_MODES = list(CLIP_THRESHOLDS)


def _xla_cases():
    """One XLA-compiled case per rule (a compilation costs ~1 s), with K
    and the clip mode rotating over the rules."""
    return [
        (rule, (3, 4, 1)[i % 3], CLIP_MODES[(i + 1) % 4])
        for i, rule in enumerate(RULE_NAMES)
    ]


def _seed(*parts):
    """A seed from the test's parameters, stable across processes."""
    return zlib.crc32(repr(parts).encode())


def _case_id(case):
    rule, k, mode = case
    return f"{rule}-K{k}-{mode or 'noclip'}"


def _clip_kwargs(mode):
    return {} if mode is None else {mode: CLIP_THRESHOLDS[mode]}


def _random_shapes(rng):
    n = int(rng.integers(2, 4))
    picks = rng.choice(len(SHAPE_POOL), size=n, replace=False)
    return [SHAPE_POOL[i] for i in picks]


def _cycle_gradients(rng, shapes, k, scale):
    """K micro-batch gradients: a shared mean plus per-micro-batch noise,
    so that the within-cycle variance W is neither zero nor dominant."""
    means = [scale * rng.normal(size=s) for s in shapes]
    return [
        [
            (m + 0.6 * scale * rng.normal(size=m.shape)).astype("float32")
            for m in means
        ]
        for _ in range(k)
    ]


def _values(variables):
    return [np.asarray(v.numpy()) for v in variables]


def _assert_close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    for j, (a, e) in enumerate(zip(actual, expected)):
        np.testing.assert_allclose(
            a, e, rtol=rtol, atol=atol, err_msg=f"{what} variable {j}"
        )


def _train_and_compare(rng, optimizer, reference, shapes, k, cycles):
    """Runs both for `cycles` updates, checking the weights after every
    micro-batch (unchanged inside a cycle, equal to the reference after
    each update) and the two counters."""
    variables = [keras.Variable(w.astype("float32")) for w in reference.weights]
    for cycle, scale in enumerate(CYCLE_SCALES[:cycles]):
        for i, grads in enumerate(_cycle_gradients(rng, shapes, k, scale)):
            before = _values(variables)
            optimizer.apply(grads, variables)
            updated = reference.apply(grads)
            assert updated == (i == k - 1)
            assert int(optimizer.micro_steps) == reference.micro_steps
            assert int(optimizer.iterations) == reference.iterations
            assert reference.iterations == cycle + 1 - (not updated)
            if updated:
                _assert_close(
                    _values(variables),
                    reference.weights,
                    what=f"update {reference.iterations}",
                )
            else:
                for a, b in zip(_values(variables), before):
                    np.testing.assert_array_equal(a, b)
    return variables


def _check_rule(rule, k, mode, jit_compile):
    make_optimizer, make_rule = RULES[rule]
    rng = np.random.default_rng(_seed(rule, k, mode))
    shapes = _random_shapes(rng)
    weights = [rng.normal(size=s).astype("float32") for s in shapes]
    optimizer = make_optimizer(
        accumulation_steps=k, jit_compile=jit_compile, **_clip_kwargs(mode)
    )
    reference = ref.ReferenceOptimizer(
        make_rule(k), weights, k, mode, CLIP_THRESHOLDS[mode]
    )
    _train_and_compare(rng, optimizer, reference, shapes, k, cycles=5)
    assert reference.clipped_any == (mode is not None)


@pytest.mark.parametrize(
    "k",
    [
        pytest.param(1, marks=pytest.mark.slow),
        3,
        pytest.param(4, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_rule_matches_reference_eager(rule, k):
    """All four clip modes in one test (the per-test session reset costs
    as much as an eager run); `mode` names the failing one."""
    for mode in CLIP_MODES:
        try:
            _check_rule(rule, k, mode, jit_compile=False)
        except AssertionError as error:
            raise AssertionError(f"clip mode {mode}: {error}") from error


@pytest.mark.parametrize("case", _xla_cases(), ids=_case_id)
def test_rule_matches_reference_xla(case):
    _check_rule(*case, jit_compile=True)


def test_micro_and_macro_differ_when_accumulating():
    """Guards the comparison above: with K > 1 the two second moments
    lead to different weights (else "micro" vs "macro" is untested)."""
    rng = np.random.default_rng(5)
    shapes = [(3, 4), (5,)]
    weights = [rng.normal(size=s) for s in shapes]
    results = []
    for mode in ("micro", "macro"):
        reference = ref.ReferenceOptimizer(
            ref.AdamRule(
                LR_ADAM,
                BETA_1,
                BETA_2,
                second_moment=mode,
                accumulation_steps=3,
            ),
            weights,
            3,
        )
        grng = np.random.default_rng(6)
        for scale in CYCLE_SCALES:
            for grads in _cycle_gradients(grng, shapes, 3, scale):
                reference.apply(grads)
        results.append(reference.weights)
    assert ref.global_norm([a - b for a, b in zip(*results)]) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clipvalue", "clipnorm", "global_clipnorm"])
@pytest.mark.parametrize("rule", ["sgd_momentum", "adam_micro"])
def test_clip_micro_batches_matches_reference(rule, mode):
    k = 3
    make_optimizer, make_rule = RULES[rule]
    rng = np.random.default_rng(_seed((rule, mode)))
    shapes = _random_shapes(rng)
    weights = [rng.normal(size=s).astype("float32") for s in shapes]
    optimizer = make_optimizer(
        accumulation_steps=k, clip_micro_batches=True, **_clip_kwargs(mode)
    )
    reference = ref.ReferenceOptimizer(
        make_rule(k),
        weights,
        k,
        mode,
        CLIP_THRESHOLDS[mode],
        clip_micro_batches=True,
    )
    _train_and_compare(rng, optimizer, reference, shapes, k, cycles=4)
    assert reference.clipped_any


# ----------------------------------------------------------------------
# Gradient statistics.


STAT_KEYS = ("variance", "mean_norm_sq", "noise_scale", "snr", "grad_norm")


@pytest.mark.slow
@pytest.mark.parametrize(
    "rule, mode",
    [
        ("sgd", None),
        ("sgd_momentum", "global_clipnorm"),
        ("adam_macro", "clipvalue"),
        ("adam_micro", None),
        ("adam_micro", "clipnorm"),
    ],
)
def test_gradient_statistics_match_reference(rule, mode):
    """K = 4; the statistics use the unclipped micro-batch gradients."""
    k = 4
    make_optimizer, make_rule = RULES[rule]
    rng = np.random.default_rng(_seed((rule, mode, "stats")))
    shapes = _random_shapes(rng)
    weights = [rng.normal(size=s).astype("float32") for s in shapes]
    optimizer = make_optimizer(
        accumulation_steps=k,
        track_gradient_statistics=True,
        **_clip_kwargs(mode),
    )
    reference = ref.ReferenceOptimizer(
        make_rule(k), weights, k, mode, CLIP_THRESHOLDS[mode]
    )
    variables = [keras.Variable(w) for w in weights]
    for scale in CYCLE_SCALES[:4]:
        for grads in _cycle_gradients(rng, shapes, k, scale):
            optimizer.apply(grads, variables)
            reference.apply(grads)
        stats = {
            key: float(value)
            for key, value in optimizer.gradient_statistics().items()
        }
        for key in STAT_KEYS:
            np.testing.assert_allclose(
                stats[key], reference.statistics[key], rtol=1e-4, err_msg=key
            )
        assert stats["noise_std"] == 0.0
    if mode is not None:
        assert reference.clipped_any


# ----------------------------------------------------------------------
# Noise.


@pytest.mark.slow
@pytest.mark.parametrize(
    "eta, gamma, k",
    [(0.01, 0.55, 1), (1.0, 1.0, 2), (0.3, 0.0, 1), (2.5, 2.0, 3)],
)
def test_noise_std_follows_schedule(eta, gamma, k):
    variables = [keras.Variable(np.zeros((3, 2), "float32"))]
    optimizer = kg.SGD(
        0.1,
        accumulation_steps=k,
        noise_eta=eta,
        noise_gamma=gamma,
        noise_seed=3,
        track_gradient_statistics=True,
    )
    for t in range(5):
        assert optimizer.noise_std == pytest.approx(
            ref.noise_std(eta, gamma, t), rel=1e-6
        )
        for _ in range(k):
            optimizer.apply([np.ones((3, 2), "float32")], variables)
        # The statistics record the sigma the update used.
        np.testing.assert_allclose(
            float(optimizer.gradient_statistics()["noise_std"]),
            ref.noise_std(eta, gamma, t),
            rtol=1e-6,
        )


N_LARGE = 1_000_000
LARGE_SHAPES = [(1000, 1000), (250, 4000)]
# Sampling errors for n = 1e6 standard normal draws (5 standard errors):
#   mean / sigma:      1 / sqrt(n)               -> 5e-3
#   std / sigma - 1:   1 / sqrt(2 n) = 7.1e-4    -> 3.5e-3
#   correlation:       1 / sqrt(n)               -> 5e-3
#   P(|x| < sigma):    sqrt(p (1 - p) / n) = 4.7e-4 (p = 0.6827) -> 2.3e-3
#   kurtosis:          sqrt(24 / n) = 4.9e-3     -> 2.4e-2
FIVE_SE_MEAN = 5 / np.sqrt(N_LARGE)
FIVE_SE_STD = 5 / np.sqrt(2 * N_LARGE)
FIVE_SE_CORR = 5 / np.sqrt(N_LARGE)
P_ONE_SIGMA = 0.6826894921370859
FIVE_SE_P = 5 * np.sqrt(P_ONE_SIGMA * (1 - P_ONE_SIGMA) / N_LARGE)
FIVE_SE_KURTOSIS = 5 * np.sqrt(24 / N_LARGE)


def _noise_draws(optimizer, shapes, k, updates):
    """With zero gradients, lr = 1 and no momentum the weight change of an
    update is exactly -epsilon. Returns draws[t][j] (float64, flat) and
    asserts the weights do not move before the K-th micro-batch."""
    variables = [keras.Variable(np.zeros(s, "float32")) for s in shapes]
    zeros = [np.zeros(s, "float32") for s in shapes]
    draws = []
    for _ in range(updates):
        before = [v.numpy().astype(np.float64) for v in variables]
        for i in range(k):
            optimizer.apply(zeros, variables)
            if i < k - 1:
                for v, b in zip(variables, before):
                    np.testing.assert_array_equal(v.numpy(), b)
        draws.append(
            [
                (b - v.numpy().astype(np.float64)).ravel()
                for v, b in zip(variables, before)
            ]
        )
    return draws


def _check_gaussian(x, sigma, what):
    n = x.size
    assert n == N_LARGE
    assert abs(x.mean()) < FIVE_SE_MEAN * sigma, what
    std = x.std()
    assert abs(std / sigma - 1) < FIVE_SE_STD, (what, std, sigma)
    inside = np.mean(np.abs(x) < sigma)
    assert abs(inside - P_ONE_SIGMA) < FIVE_SE_P, (what, inside)
    kurtosis = np.mean(x**4) / sigma**4
    assert abs(kurtosis - 3) < FIVE_SE_KURTOSIS, (what, kurtosis)


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_noise_is_gaussian_with_scheduled_std_and_uncorrelated():
    eta, gamma = 0.5, 0.55
    optimizer = kg.SGD(1.0, noise_eta=eta, noise_gamma=gamma, noise_seed=11)
    draws = _noise_draws(optimizer, LARGE_SHAPES, k=1, updates=3)
    for t, per_tensor in enumerate(draws):
        sigma = ref.noise_std(eta, gamma, t)
        for j, x in enumerate(per_tensor):
            _check_gaussian(x, sigma, f"update {t} tensor {j}")
    flat = [(t, j, x) for t, per in enumerate(draws) for j, x in enumerate(per)]
    for a in range(len(flat)):
        for b in range(a + 1, len(flat)):
            ta, ja, xa = flat[a]
            tb, jb, xb = flat[b]
            assert abs(_corr(xa, xb)) < FIVE_SE_CORR, (ta, ja, tb, jb)


def test_noise_accumulating_draws_once_per_update():
    """K = 4: weights move only at the 4th micro-batch, by one draw of
    std sigma_t (not the sum of four draws, 2 sigma, nor their mean)."""
    eta, gamma = 0.2, 1.0
    optimizer = kg.SGD(
        1.0,
        accumulation_steps=4,
        noise_eta=eta,
        noise_gamma=gamma,
        noise_seed=5,
    )
    draws = _noise_draws(optimizer, [(N_LARGE,)], k=4, updates=2)
    for t, (x,) in enumerate(draws):
        _check_gaussian(x, ref.noise_std(eta, gamma, t), f"update {t}")
    assert abs(_corr(draws[0][0], draws[1][0])) < FIVE_SE_CORR
    assert int(optimizer.iterations) == 2
    assert int(optimizer.micro_steps) == 8


def test_noise_seed_determines_the_draws():
    shapes = [(300, 7), (11,)]

    def draws(seed):
        optimizer = kg.SGD(1.0, noise_eta=0.3, noise_seed=seed)
        return _noise_draws(optimizer, shapes, k=1, updates=2)

    first, again, other = draws(21), draws(21), draws(22)
    for t in range(2):
        for j in range(len(shapes)):
            np.testing.assert_array_equal(first[t][j], again[t][j])
            assert np.mean(first[t][j] == other[t][j]) < 0.01
    x = np.concatenate([x for per in first for x in per])
    y = np.concatenate([y for per in other for y in per])
    assert abs(_corr(x, y)) < 5 / np.sqrt(x.size)


def _adam_with_noise(seed, mode, k, jit_compile=True):
    return kg.Adam(
        LR_ADAM,
        BETA_1,
        BETA_2,
        second_moment="micro",
        accumulation_steps=k,
        noise_eta=0.05,
        noise_gamma=0.55,
        noise_seed=seed,
        jit_compile=jit_compile,
        **_clip_kwargs(mode),
    )


def test_noisy_adam_is_deterministic_given_the_seed():
    k = 3
    rng = np.random.default_rng(8)
    shapes = [(3, 4), (5,), (2, 3, 2)]
    weights = [rng.normal(size=s).astype("float32") for s in shapes]
    cycles = [_cycle_gradients(rng, shapes, k, s) for s in CYCLE_SCALES]
    results = []
    for seed in (4, 4):
        optimizer = _adam_with_noise(seed, "global_clipnorm", k)
        variables = [keras.Variable(w) for w in weights]
        for cycle in cycles:
            for grads in cycle:
                optimizer.apply(grads, variables)
        results.append(_values(variables))
    for a, b in zip(results[0], results[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "mode, jit_compile",
    [
        (None, False),
        ("clipvalue", False),
        ("global_clipnorm", False),
        ("clipnorm", True),
    ],
)
def test_noisy_adam_matches_reference_given_the_draws(mode, jit_compile):
    """The deterministic part of a noisy update. The draws are read off a
    plain SGD (lr = 1, zero gradients) with the same seed and variable
    shapes, which relies on the noise depending only on the seed, the
    update number and the variable, not on the update rule. The reference
    then adds these draws after clipping (g~ = c * g_bar + epsilon). Both
    optimizers use the same `jit_compile`: eager and XLA draws may differ
    in the last bit."""
    k = 3
    rng = np.random.default_rng(_seed(("noisy", mode)))
    shapes = _random_shapes(rng)
    weights = [rng.normal(size=s).astype("float32") for s in shapes]
    updates = 4
    sgd = kg.SGD(
        1.0,
        accumulation_steps=k,
        noise_eta=0.05,
        noise_seed=17,
        jit_compile=jit_compile,
    )
    draws = _noise_draws(sgd, shapes, k, updates)
    optimizer = _adam_with_noise(17, mode, k, jit_compile)
    reference = ref.ReferenceOptimizer(
        ref.AdamRule(LR_ADAM, BETA_1, BETA_2, accumulation_steps=k),
        weights,
        k,
        mode,
        CLIP_THRESHOLDS[mode],
    )
    variables = [keras.Variable(w) for w in weights]
    for t in range(updates):
        for i, grads in enumerate(
            _cycle_gradients(rng, shapes, k, CYCLE_SCALES[t])
        ):
            optimizer.apply(grads, variables)
            noise = None
            if i == k - 1:
                noise = [d.reshape(s) for d, s in zip(draws[t], shapes)]
            reference.apply(grads, noise=noise)
        _assert_close(_values(variables), reference.weights, what=f"t={t}")
    if mode is not None:
        assert reference.clipped_any


# ----------------------------------------------------------------------
# The wrapper.


@pytest.mark.parametrize(
    "k, mode",
    [(3, "global_clipnorm"), (3, "clipnorm"), (3, "clipvalue"), (1, None)],
)
def test_wrapped_rmsprop_matches_keras_on_reference_gradients(k, mode):
    """kg.wrap(RMSprop) equals Keras's RMSprop fed the reference's clipped
    mean gradient once per cycle."""
    rng = np.random.default_rng(_seed(("wrap", k, mode)))
    shapes = _random_shapes(rng)
    weights = [rng.normal(size=s).astype("float32") for s in shapes]

    def rmsprop():
        return keras.optimizers.RMSprop(0.01, rho=0.8, momentum=0.5)

    optimizer = kg.wrap(rmsprop(), accumulation_steps=k, **_clip_kwargs(mode))
    expected_optimizer = rmsprop()
    reference = ref.ReferenceOptimizer(
        ref.IdentityRule(), weights, k, mode, CLIP_THRESHOLDS[mode]
    )
    variables = [keras.Variable(w) for w in weights]
    expected = [keras.Variable(w) for w in weights]
    for cycle, scale in enumerate(CYCLE_SCALES):
        for i, grads in enumerate(_cycle_gradients(rng, shapes, k, scale)):
            before = _values(variables)
            optimizer.apply(grads, variables)
            if reference.apply(grads):
                expected_optimizer.apply(
                    [g.astype("float32") for g in reference.processed],
                    expected,
                )
                _assert_close(
                    _values(variables), _values(expected), what=f"{cycle}"
                )
            else:
                for a, b in zip(_values(variables), before):
                    np.testing.assert_array_equal(a, b)
            assert int(optimizer.iterations) == cycle + (i == k - 1)
            assert int(optimizer.micro_steps) == cycle * k + i + 1
    assert reference.clipped_any == (mode is not None)
