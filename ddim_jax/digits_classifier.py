"""A small CNN trained on scikit-learn's 8x8 digits: its definition, training, cached loading and accuracy.

Its 64-d penultimate features are the digits FID extractor (:func:`ddim_jax.fid.digits_feature_extractor`),
so the embedded default dataset has FID-like numbers without any download; its softmax is the digits
classifier of ``benchmarks/digits_quality.py``. Training is deterministic and takes a few seconds on a
CPU; the weights are cached under :func:`ddim_jax.cache.cache_dir`, keyed by the training hyperparameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddim_jax.cache import cache_dir, read_cached
from ddim_jax.files import atomic_write
from ddim_jax.data import DIGITS_TRAIN, load_digits

DIGITS_FEATURE_DIM = 64
_HPARAMS = dict(version=2, seed=0, epochs=30, batch=50, lr=3e-3, weight_decay=1e-4, shift=1)


def digits_data(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (uint8 ``[N, 8, 8, 1]``, int32 labels); see :func:`ddim_jax.data.load_digits`."""
    return load_digits(split)


class _Conv3x3(nn.Module):
    """3x3 'SAME' convolution written as patches @ kernel: on 8x8 inputs a plain matmul trains several
    times faster on a CPU than XLA's convolution op."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        s = self.stride
        patches = jnp.concatenate([xp[:, i:i + h:s, j:j + w:s, :] for i in range(3) for j in range(3)], -1)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return patches @ kernel.reshape(9 * c, self.features) + bias


class DigitsCNN(nn.Module):
    """8x8x1 in [0, 1] -> conv 3x3 32 -> conv 3x3 64 stride 2 -> dense 64 (the features) -> 10 logits.

    The feature layer uses swish rather than ReLU: no unit is dead (a ReLU layer left a third of them
    constant zero), so the feature covariance has full rank and the FID's matrix square root is well posed.
    """

    @nn.compact
    def __call__(self, x, features_only: bool = False):
        x = nn.relu(_Conv3x3(32, 1, name="conv1")(x))
        x = nn.relu(_Conv3x3(64, 2, name="conv2")(x))
        h = nn.swish(nn.Dense(DIGITS_FEATURE_DIM, name="features")(x.reshape(x.shape[0], -1)))
        if features_only:
            return h
        return nn.Dense(10, name="logits")(h)


def _shift_images(x, key, max_shift: int):
    """Each image translated by a random integer offset in [-max_shift, max_shift]^2, zeros shifted in."""
    n, h, w, _ = x.shape
    pad = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offs = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
    return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, x.shape[3])))(pad, offs)


# The training is one long program (every step in one scan, on the CPU): it compiles with LLVM's optimisation,
# XLA's default, even where XLA_FLAGS turn it off (as the test suite does, to compile its many small programs
# faster). Unoptimised, it takes 2.5 times the CPU time (16.8 vs 6.6 s).
_TRAIN_OPTIONS = {"xla_backend_optimization_level": 2}


def train_digits_classifier(seed: int | None = None) -> tuple[dict, float]:
    """Train the digits CNN (deterministic for a seed; a few seconds on one CPU core).

    Returns (params, accuracy on the 297 held-out digits).
    """
    import optax

    hp = dict(_HPARAMS)
    if seed is not None:
        hp["seed"] = seed
    model = DigitsCNN()
    xtr, ytr = digits_data("train")
    xte, yte = digits_data("test")
    xtr = jnp.asarray(xtr, jnp.float32) / 255.0
    ytr = jnp.asarray(ytr)
    key = jax.random.PRNGKey(hp["seed"])
    params = model.init(jax.random.fold_in(key, 0), xtr[:1])["params"]
    steps_per_epoch = DIGITS_TRAIN // hp["batch"]
    total = hp["epochs"] * steps_per_epoch
    tx = optax.adamw(optax.cosine_decay_schedule(hp["lr"], total), weight_decay=hp["weight_decay"])
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, i):
        p, s = carry
        epoch, j = i // steps_per_epoch, i % steps_per_epoch
        idx = jax.lax.dynamic_slice(perms[epoch], (j * hp["batch"],), (hp["batch"],))
        x = _shift_images(xtr[idx], jax.random.fold_in(jax.random.fold_in(key, 2), i), hp["shift"])
        loss, g = jax.value_and_grad(loss_fn)(p, x, ytr[idx])
        updates, s = tx.update(g, s, p)
        return (optax.apply_updates(p, updates), s), loss

    # Each epoch's order of the training digits, drawn once (not at each of its steps).
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, 1), e),
                                                      DIGITS_TRAIN))(jnp.arange(hp["epochs"]))
    train = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(total)), compiler_options=_TRAIN_OPTIONS)
    (params, _), _ = train((params, opt_state))
    logits = model.apply({"params": params}, jnp.asarray(xte, jnp.float32) / 255.0)
    acc = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == yte))
    return jax.device_get(params), acc


def _cache_path() -> str:
    tag = hashlib.sha1(json.dumps(_HPARAMS, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cache_dir(), f"digits_cnn-{tag}.npz")


def _read_cache(path: str) -> tuple[dict, float]:
    with np.load(path) as z:
        acc = float(z["__accuracy__"])
        flat = {k: z[k] for k in z.files if not k.startswith("__")}
    want = jax.eval_shape(lambda: DigitsCNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))["params"]
    want = {k: v.shape for k, v in traverse_util.flatten_dict(want, sep="/").items()}
    if {k: v.shape for k, v in flat.items()} != want:
        raise ValueError("it holds other arrays than the digits CNN's parameters")
    return traverse_util.unflatten_dict(flat, sep="/"), acc


def load_digits_classifier(cache: bool = True, verbose: bool = True) -> tuple[dict, float]:
    """(params, held-out accuracy) of the digits CNN: read from the cache, else trained once and cached (a
    cached file that cannot be read is trained again and replaced, with a warning)."""
    path = _cache_path()
    cached = read_cached(path, _read_cache) if cache else None
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    with jax.default_device(jax.devices("cpu")[0]):  # the same weights whatever accelerator is present
        params, acc = train_digits_classifier()
    if verbose:
        print(f"trained the digits feature CNN in {time.perf_counter() - t0:.1f}s "
              f"(held-out accuracy {acc:.4f})" + (f"; cached at {path}" if cache else ""))
    if cache:
        arrays = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
        atomic_write(path, lambda f: np.savez(f, __accuracy__=np.float64(acc), **arrays))
    return params, acc
