"""An independent float64 NumPy reference of the gradient pipeline.

Written from docs/design.md §1-§3 (the maths), not from the package's
code, so that the tests comparing the two can catch mistakes in either.
Everything here is plain float64 NumPy; no Keras, no TensorFlow.

One call to `ReferenceOptimizer.apply` is one micro-batch. With K the
number of accumulation steps, G = sum g_i, S = sum g_i**2 and
g_bar = G / K, the K-th call:

1. clips g_bar (or each g_i before accumulation, with
   `clip_micro_batches=True`), giving the factor c (1 if not clipped);
2. adds the noise it is handed (the random draw cannot be reproduced, so
   the caller passes it, or zero);
3. applies the update rule to g_tilde = c * g_bar + noise and resets G, S.
"""

import numpy as np

CLIP_MODES = (None, "clipvalue", "clipnorm", "global_clipnorm")


def _f64(arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# ----------------------------------------------------------------------
# Clipping. Each returns (clipped gradients, clip factors c), where
# clipped = c * gradient: c is elementwise for clip-by-value and a scalar
# per tensor (or one scalar for all tensors) for the norm clips.


def clip_by_value(grads, value):
    clipped, factors = [], []
    for g in _f64(grads):
        x = np.clip(g, -value, value)
        safe = np.where(g == 0, 1.0, g)
        factors.append(np.where(g == 0, 1.0, x / safe))
        clipped.append(x)
    return clipped, factors


def clip_by_norm(grads, clip_norm):
    clipped, factors = [], []
    for g in _f64(grads):
        c = clip_norm / max(np.sqrt(np.sum(g * g)), clip_norm)
        clipped.append(c * g)
        factors.append(np.float64(c))
    return clipped, factors


def global_norm(grads):
    return float(np.sqrt(sum(np.sum(g * g) for g in _f64(grads))))


def clip_by_global_norm(grads, clip_norm):
    grads = _f64(grads)
    c = clip_norm / max(global_norm(grads), clip_norm)
    return [c * g for g in grads], [np.float64(c) for _ in grads]


def clip(grads, mode, threshold):
    """Clips with `mode` in `CLIP_MODES`; returns (clipped, factors)."""
    if mode is None:
        grads = _f64(grads)
        return grads, [np.float64(1.0) for _ in grads]
    if mode == "clipvalue":
        return clip_by_value(grads, threshold)
    if mode == "clipnorm":
        return clip_by_norm(grads, threshold)
    if mode == "global_clipnorm":
        return clip_by_global_norm(grads, threshold)
    raise ValueError(f"unknown clip mode {mode!r}")


# ----------------------------------------------------------------------
# Noise schedule and statistics.


def noise_variance(eta, gamma, t):
    """sigma_t**2 = eta / (1 + t)**gamma, t = updates already applied."""
    return eta / (1.0 + t) ** gamma


def noise_std(eta, gamma, t):
    return float(np.sqrt(noise_variance(eta, gamma, t)))


def gradient_statistics(micro_grads):
    """docs/design.md §3 from the K >= 2 micro-batch gradients of a cycle.

    `micro_grads[i][j]` is micro-batch i's gradient of variable j. Returns
    the same keys as `optimizer.gradient_statistics()` except `noise_std`.
    """
    k = len(micro_grads)
    if k < 2:
        raise ValueError("the statistics need at least two micro-batches")
    micro_grads = [_f64(mg) for mg in micro_grads]
    sums = [sum(column) for column in zip(*micro_grads)]
    squares = [sum(g * g for g in column) for column in zip(*micro_grads)]
    variance = float(
        sum(np.sum((s2 - s * s / k) / (k - 1)) for s, s2 in zip(sums, squares))
    )
    mean_sq = float(sum(np.sum((s / k) ** 2) for s in sums))
    return _statistics(variance, mean_sq, k)


def _statistics(variance, mean_sq, k):
    """The reported statistics from the micro-batch variance, |g_bar|^2 and
    the number of micro-batches."""
    mean_norm_sq = mean_sq - variance / k
    return {
        "variance": variance,
        "mean_norm_sq": mean_norm_sq,
        "noise_scale": variance / mean_norm_sq,
        "snr": mean_norm_sq / (variance / k),
        "grad_norm": float(np.sqrt(mean_sq)),
    }


def weighted_gradient_statistics(micro_grads, weights):
    """docs/design.md §7: the statistics of micro-batches of unequal counts
    `weights` (those of count 0 left out), in micro-batches of the mean
    count. A micro-batch gradient of count w has variance tr(Sigma) / w:
    tr(Sigma) = (sum w |h|^2 - W |g_bar|^2) / (K - 1), and the reported
    variance is tr(Sigma) / (W / K)."""
    kept = [(g, w) for g, w in zip(micro_grads, weights) if w > 0]
    k = len(kept)
    total = float(sum(w for _, w in kept))
    grads = [_f64(g) for g, _ in kept]
    mean = [
        sum(w * g[j] for g, (_, w) in zip(grads, kept)) / total
        for j in range(len(grads[0]))
    ]
    mean_sq = float(sum(np.sum(m * m) for m in mean))
    weighted_sq = float(
        sum(w * sum(np.sum(x * x) for x in g) for g, (_, w) in zip(grads, kept))
    )
    trace = (weighted_sq - total * mean_sq) / (k - 1)
    return _statistics(trace * k / total, mean_sq, k)


# ----------------------------------------------------------------------
# Update rules. `step(weights, g, micro_variance, t)` updates `weights`
# (a list of float64 arrays) in place; `t` is the 1-based update number.


class SGDRule:
    """m = beta * m - lr * g; w += m (Nesterov: w += beta * m - lr * g)."""

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False):
        self.lr = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov
        self.m = None

    def step(self, weights, grads, micro_variance, t):
        del micro_variance, t
        if self.m is None:
            self.m = [np.zeros_like(w) for w in weights]
        for w, g, m in zip(weights, grads, self.m):
            if self.momentum == 0:
                w -= self.lr * g
                continue
            m *= self.momentum
            m -= self.lr * g
            if self.nesterov:
                w += self.momentum * m - self.lr * g
            else:
                w += m


class AdamRule:
    """Adam in Keras's form, with the "macro" or "micro" second moment.

    alpha = lr * sqrt(1 - b2_eff**t) / (1 - b1**t)
    m = b1 * m + (1 - b1) * g
    macro: v = b2 * v + (1 - b2) * g**2                   b2_eff = b2
    micro: v = b2**K * v + (1 - b2**K) * (g**2 + W)       b2_eff = b2**K
    (amsgrad: v_hat = max(v_hat, v), used instead of v)
    w -= alpha * m / (sqrt(v) + epsilon)
    AdamW first does w -= w * weight_decay * lr.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        second_moment="micro",
        weight_decay=None,
        accumulation_steps=1,
    ):
        self.lr = learning_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = amsgrad
        self.second_moment = second_moment
        self.weight_decay = weight_decay
        self.k = accumulation_steps
        self.m = self.v = self.v_hat = None

    @property
    def micro(self):
        return self.second_moment == "micro" and self.k > 1

    def step(self, weights, grads, micro_variance, t):
        if self.m is None:
            self.m = [np.zeros_like(w) for w in weights]
            self.v = [np.zeros_like(w) for w in weights]
            self.v_hat = [np.zeros_like(w) for w in weights]
        b1 = self.beta_1
        b2 = self.beta_2**self.k if self.micro else self.beta_2
        alpha = self.lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for j, (w, g) in enumerate(zip(weights, grads)):
            if self.weight_decay:
                w -= w * self.weight_decay * self.lr
            u = g * g
            if self.micro:
                u = u + micro_variance[j]
            self.m[j] = b1 * self.m[j] + (1 - b1) * g
            self.v[j] = b2 * self.v[j] + (1 - b2) * u
            v = self.v[j]
            if self.amsgrad:
                self.v_hat[j] = np.maximum(self.v_hat[j], self.v[j])
                v = self.v_hat[j]
            w -= alpha * self.m[j] / (np.sqrt(v) + self.epsilon)


class IdentityRule:
    """Leaves the weights alone; for recording the processed gradients."""

    def step(self, weights, grads, micro_variance, t):
        del weights, grads, micro_variance, t


# ----------------------------------------------------------------------
# The pipeline.


class ReferenceOptimizer:
    """Accumulation, clipping, (given) noise and an update rule.

    Attributes after each update: `processed` (g_tilde per variable),
    `clip_factors`, `micro_variance` (W per variable) and `statistics`
    (docs/design.md §3, K >= 2, from the unclipped micro-batches unless
    `clip_micro_batches`).
    """

    def __init__(
        self,
        rule,
        weights,
        accumulation_steps=1,
        clip_mode=None,
        clip_threshold=None,
        clip_micro_batches=False,
    ):
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {clip_mode!r}")
        self.rule = rule
        self.weights = _f64([np.array(w, copy=True) for w in weights])
        self.k = accumulation_steps
        self.clip_mode = clip_mode
        self.clip_threshold = clip_threshold
        self.clip_micro_batches = clip_micro_batches
        self.iterations = 0
        self.micro_steps = 0
        self._cycle = []
        self._counts = []
        self.processed = None
        self.clip_factors = None
        self.micro_variance = None
        self.statistics = None
        self.clipped_any = False

    def apply(self, grads, noise=None, count=None):
        """One micro-batch (of weight `count`, docs/design.md §7, or
        unweighted); returns True when it completed an update."""
        grads = _f64(grads)
        self._counts.append(count)
        if self.clip_micro_batches:
            grads, factors = clip(grads, self.clip_mode, self.clip_threshold)
            self.clipped_any |= _any_below_one(factors)
        self.micro_steps += 1
        self._cycle.append(grads)
        if len(self._cycle) < self.k:
            return False
        self._update(noise)
        return True

    def _update(self, noise):
        k = self.k
        cycle, self._cycle = self._cycle, []
        counts, self._counts = self._counts, []
        n_vars = len(self.weights)
        if counts[0] is None:
            w = [1.0] * len(cycle)
            self.statistics = gradient_statistics(cycle) if k >= 2 else None
        else:
            w = [float(c) for c in counts]
            self.statistics = (
                weighted_gradient_statistics(cycle, w) if k >= 2 else None
            )
        total = sum(w)
        g_sum = [
            sum(c * mg[j] for c, mg in zip(w, cycle)) for j in range(n_vars)
        ]
        s_sum = [
            sum(c * mg[j] ** 2 for c, mg in zip(w, cycle))
            for j in range(n_vars)
        ]
        k = total
        mean = [g / k for g in g_sum]
        if self.clip_micro_batches:
            clipped, factors = mean, [np.float64(1.0)] * n_vars
        else:
            clipped, factors = clip(mean, self.clip_mode, self.clip_threshold)
            self.clipped_any |= _any_below_one(factors)
        self.micro_variance = [
            c**2 * np.maximum(s / k - g**2, 0.0)
            for c, s, g in zip(factors, s_sum, mean)
        ]
        if noise is not None:
            clipped = [
                g + np.asarray(e, np.float64) for g, e in zip(clipped, noise)
            ]
        self.processed = clipped
        self.clip_factors = factors
        self.iterations += 1
        self.rule.step(
            self.weights, clipped, self.micro_variance, self.iterations
        )


def _any_below_one(factors):
    return any(bool(np.any(np.asarray(c) < 1.0 - 1e-12)) for c in factors)
