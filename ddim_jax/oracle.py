"""An exact denoiser for Gaussian-mixture data, and a distribution distance to score samples.

If ``x_0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` then ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` is the
mixture ``sum_k w_k N(sqrt(a) mu_k, diag(a s_k^2 + 1 - a))``, and the optimal epsilon-prediction is
``E[eps | x_t] = -sqrt(1 - a) grad log p_t(x_t)
             = sqrt(1 - a) sum_k r_k(x_t) (x_t - sqrt(a) mu_k) / (a s_k^2 + 1 - a)``
with ``r_k`` the posterior responsibilities. It is what a perfectly trained network would output,
so it is the ground truth for tests and benchmarks, and usable directly as an ``eps_fn``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax.diffusion import PREDICTION_TYPES, x0_eps_to_v
from ddim_jax.schedules import Schedule, _check_choice


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """``means`` ``[K, D]``; ``stds`` ``[K, D]``, ``[K]`` or a scalar; ``weights`` ``[K]`` (normalised).

    ``stds`` is stored as ``[K, D]``, or ``[K, 1]`` when every component is isotropic.
    """

    means: np.ndarray
    stds: np.ndarray | float = 0.1
    weights: np.ndarray | None = None

    def __post_init__(self):
        means = np.asarray(self.means, np.float32)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D]; got {means.shape}")
        K, D = means.shape
        stds = np.asarray(self.stds, np.float32)
        stds = np.broadcast_to(stds.reshape(stds.shape + (1,) * (2 - stds.ndim)) if stds.ndim < 2 else stds, (K, D))
        if np.all(stds == stds[:, :1]):
            stds = stds[:, :1]  # isotropic components: [K, 1], so the oracle takes K logs, not K * D
        if np.any(stds < 0) or not np.all(np.isfinite(stds)):
            raise ValueError("stds must be finite and >= 0")
        w = np.full(K, 1.0 / K) if self.weights is None else np.asarray(self.weights, np.float64)
        if w.shape != (K,) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", np.ascontiguousarray(stds))
        object.__setattr__(self, "weights", (w / w.sum()).astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, key, n: int):
        """``n`` draws from the mixture, ``[n, D]`` float32 (one compiled program per ``n`` and shape)."""
        return _sample_mixture(self.means, self.stds, self.weights, key, int(n))

    def mean(self):
        return self.weights @ self.means

    def cov(self):
        """Covariance of the mixture, ``[D, D]``."""
        mu = self.mean()
        d = self.means - mu
        return (np.einsum("k,kd,ke->de", self.weights, d, d)
                + np.diag(self.weights @ np.broadcast_to(self.stds, self.means.shape) ** 2))

    def eps(self, x_t, a):
        """E[eps | x_t] for x_t ``[B, D]`` (or ``[B, ...]`` with prod(...) = D) at alpha-bar ``a`` ``[B]``."""
        return mixture_posterior(self.means, self.stds, self.weights, x_t, a)[1]

    def x0(self, x_t, a):
        """E[x_0 | x_t], finite even at a = 0 (where it is the mixture mean)."""
        return mixture_posterior(self.means, self.stds, self.weights, x_t, a)[0]

    def eps_fn(self, schedule: Schedule, prediction_type: str = "epsilon"):
        """The oracle as a sampler ``eps_fn(x_t, t)`` for 0-indexed timesteps of ``schedule``, returning
        the optimal output of a model of the given ``prediction_type`` ('epsilon', 'x0' or 'v')."""
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        return jax.tree_util.Partial(_ORACLE_MODELS[prediction_type], self.means, self.stds, self.weights,
                                     schedule.alphas_cumprod)

    def conditional_eps_fn(self, schedule: Schedule, prediction_type: str = "epsilon", *,
                           null_label: int | None = None):
        """The class-conditional oracle ``model_fn(x_t, t, labels)``, for classifier-free guidance.

        Component k is class k: an integer label ``k`` in ``[0, K)`` gives the exact output of a model
        trained on component k alone (a single Gaussian), and ``null_label`` (default ``K``) the whole
        mixture, i.e. what :meth:`eps_fn` returns (the unconditional model). ``labels`` is int ``[B]``;
        any other label value gives NaN (it is traced, so it cannot be checked on the host). The output
        is that of a model of the given ``prediction_type`` ('epsilon', 'x0' or 'v'). Wrap it with
        :func:`ddim_jax.guided` to get a sampler ``eps_fn``.
        """
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        K = int(self.means.shape[0])
        null = K if null_label is None else null_label
        if isinstance(null, bool) or not isinstance(null, (int, np.integer)) or 0 <= null < K:
            raise ValueError(f"null_label must be an integer outside [0, {K}) (the class labels); got {null_label!r}")
        return jax.tree_util.Partial(_CONDITIONAL_MODELS[prediction_type], self.means, self.stds, self.weights,
                                     schedule.alphas_cumprod, np.int32(null))


@functools.partial(jax.jit, static_argnums=4)
def _sample_mixture(means, stds, weights, key, n):
    kc, kn = jax.random.split(key)
    k = jax.random.choice(kc, means.shape[0], (n,), p=weights)
    return means[k] + stds[k] * jax.random.normal(kn, (n, means.shape[1]))


def mixture_posterior(means, stds, weights, x_t, a):
    """(E[x_0 | x_t], E[eps | x_t]) for the mixture; ``means`` ``[K, D]``, ``stds`` ``[K, D]`` or ``[K, 1]``.

    Per component k, with ``var_k = a s_k^2 + 1 - a``: ``E[eps | x_t, k] = sqrt(1 - a) (x_t - sqrt(a) mu_k)
    / var_k`` and ``E[x_0 | x_t, k] = mu_k + sqrt(a) s_k^2 (x_t - sqrt(a) mu_k) / var_k``; both are
    averaged with the responsibilities ``r_k(x_t)``.
    """
    shape = x_t.shape
    x = x_t.reshape(shape[0], -1).astype(jnp.float32)
    D = x.shape[1]
    a = jnp.broadcast_to(jnp.asarray(a, jnp.float32), (shape[0],))[:, None]  # [B, 1]
    s2 = jnp.square(stds)
    if stds.shape[1] == 1:  # isotropic components: distances through matmuls, [B, K] intermediates only
        s2 = s2[:, 0]
        var = a * s2 + (1.0 - a)  # [B, K]
        xm = x @ means.T  # [B, K]
        sq = jnp.sum(x**2, 1, keepdims=True) - 2.0 * jnp.sqrt(a) * xm + a * jnp.sum(means**2, 1)
        logp = -0.5 * (sq / var + D * jnp.log(var)) + jnp.log(weights)
        r = jax.nn.softmax(logp, axis=-1)
        w, ws = r / var, r * s2 / var
        eps = jnp.sqrt(1.0 - a) * (x * jnp.sum(w, 1, keepdims=True) - jnp.sqrt(a) * (w @ means))
        x0 = r @ means + jnp.sqrt(a) * (x * jnp.sum(ws, 1, keepdims=True) - jnp.sqrt(a) * (ws @ means))
    else:
        a = a[:, :, None]  # [B, 1, 1]
        var = a * s2 + (1.0 - a)  # [B, K, D]
        diff = x[:, None, :] - jnp.sqrt(a) * means  # [B, K, D]
        logp = -0.5 * jnp.sum(diff**2 / var + jnp.log(var), axis=-1) + jnp.log(weights)
        r = jax.nn.softmax(logp, axis=-1)[..., None]  # [B, K, 1]
        z = diff / var
        eps = jnp.sqrt(1.0 - a[:, 0]) * jnp.sum(r * z, axis=1)
        x0 = jnp.sum(r * (means + jnp.sqrt(a) * s2 * z), axis=1)
    return x0.reshape(shape).astype(x_t.dtype), eps.reshape(shape).astype(x_t.dtype)


def _mixture_model(means, stds, weights, alphas_cumprod, x_t, t, *, prediction_type):
    a = jnp.asarray(alphas_cumprod)[t]
    x0, eps = mixture_posterior(means, stds, weights, x_t, a)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "x0":
        return x0
    return x0_eps_to_v(x0, eps, a)


# One function object per prediction type, so equal oracles give equal (cache-hitting) eps_fns.
_ORACLE_MODELS = {p: functools.partial(_mixture_model, prediction_type=p) for p in PREDICTION_TYPES}


def _conditional_mixture_model(means, stds, weights, alphas_cumprod, null_label, x_t, t, labels, *,
                               prediction_type):
    # Per-example weights [B, K]: one-hot for a class label (the component alone), the mixture's
    # weights for the null label; any other label is all zeros, whose softmax is NaN.
    labels = jnp.asarray(labels)
    one_hot = jax.nn.one_hot(labels, means.shape[0], dtype=jnp.float32)
    w = jnp.where((labels == null_label)[:, None], jnp.asarray(weights, jnp.float32)[None, :], one_hot)
    return _mixture_model(means, stds, w, alphas_cumprod, x_t, t, prediction_type=prediction_type)


_CONDITIONAL_MODELS = {p: functools.partial(_conditional_mixture_model, prediction_type=p) for p in PREDICTION_TYPES}


@jax.jit
def energy_distance(x, y):
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between samples ``[N, ...]`` and ``[M, ...]``.

    Unbiased (U-statistics: self-pairs excluded), so it is 0 in expectation for two samples of the
    same distribution and can come out slightly negative. Compiled once per pair of shapes: the
    pairwise distances, the mask and the sums fuse into a few passes over the ``[N, M]`` matrices
    (run op by op, each of them would be an ``[N, M]`` array of its own).
    """
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    y = jnp.asarray(y, jnp.float32).reshape(y.shape[0], -1)
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must hold >= 2 samples of the same dimension; got {x.shape} and {y.shape}")
    center = jnp.mean(jnp.concatenate([x, y]), axis=0)  # centring limits cancellation in |p|^2 + |q|^2 - 2pq
    x, y = x - center, y - center

    def dist(p, q):
        d2 = jnp.sum(p**2, 1)[:, None] + jnp.sum(q**2, 1)[None, :] - 2.0 * p @ q.T
        return jnp.sqrt(jnp.maximum(d2, 0.0))

    def self_mean(p):
        n = p.shape[0]
        return jnp.sum(dist(p, p) * (1.0 - jnp.eye(n))) / (n * (n - 1))

    return 2.0 * jnp.mean(dist(x, y)) - self_mean(x) - self_mean(y)
