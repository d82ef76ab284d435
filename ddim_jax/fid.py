"""FID and KID (the sample-quality numbers of the paper's Table 1), and the feature extractors behind them.

* Math, in float64 numpy/scipy: :func:`compute_stats`, :func:`fid_from_stats` (Heusel et al. 2017, the
  pytorch-fid formula with its epsilon fallback for singular products), :func:`kid` (Binkowski et al.
  2018: unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets).
* Reference statistics: :func:`save_stats`/:func:`load_stats` (``.npz`` with ``mu``, ``sigma`` and
  metadata; pytorch-fid's own ``.npz`` files load too) and :func:`reference_stats`, which computes them
  from data once and caches them.
* Feature extractors (``extract(images_uint8_NHWC, batch_size) -> [N, F]``, jitted, with a progress bar):
  :func:`inception_feature_extractor` (the standard FID Inception, 2048-d, from a local copy of the
  pytorch-fid weights; see :mod:`ddim_jax.inception`) and :func:`digits_feature_extractor` (64-d
  penultimate features of a small CNN trained on scikit-learn's 8x8 digits, see
  :mod:`ddim_jax.digits_classifier`, so the embedded default dataset has FID-like numbers without any
  download). FIDs are only comparable between runs that use the same extractor; the digits numbers are
  not on the Inception scale.

Files are cached under :func:`ddim_jax.cache.cache_dir` (``$DDIM_JAX_CACHE``, else
``$XDG_CACHE_HOME/ddim_jax``, else ``~/.cache/ddim_jax``).
"""

from __future__ import annotations

import os
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import digits_classifier, inception
from ddim_jax.cache import cache_dir, read_cached
from ddim_jax.files import atomic_write
from ddim_jax.parallel import pad_rows

# ----------------------------------------------------------------------------------------------
# FID / KID math (float64).


def compute_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """``[N, F]`` features -> (mean ``[F]``, covariance ``[F, F]``, unbiased, as pytorch-fid), float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, F] with N >= 2; got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    As pytorch-fid: if the matrix square root is not finite (a singular product), ``eps * I`` is added
    to both covariances and it is taken again; an imaginary part larger than 1e-3 on the diagonal is an
    error, a smaller one (rounding) is dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
    """FID between two ``[N, F]`` feature sets."""
    return fid_from_stats(*compute_stats(features1), *compute_stats(features2))


def kid(features1, features2, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        degree: int = 3, coef0: float = 1.0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): (mean, std) over ``subsets`` random subsets.

    Each subset draws ``m = min(subset_size, N1, N2)`` rows of each set without replacement and takes
    the unbiased MMD^2 estimate with the polynomial kernel ``k(x, y) = (x.y / F + coef0) ** degree``.
    Deterministic for a given ``seed``. Unbiased, so it can be slightly negative for equal distributions.
    """
    x_all = np.asarray(features1, np.float64)
    y_all = np.asarray(features2, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"features must be [N, F] with equal F; got {x_all.shape} and {y_all.shape}")
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx = (x @ x.T / d + coef0) ** degree
        kyy = (y @ y.T / d + coef0) ** degree
        kxy = (x @ y.T / d + coef0) ** degree
        mmds[i] = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                   - 2.0 * kxy.mean())
    return float(mmds.mean()), float(mmds.std())


# ----------------------------------------------------------------------------------------------
# Reference statistics on disk.


def save_stats(path: str, mu, sigma, **metadata) -> None:
    """Write ``mu``, ``sigma`` (float64) and scalar/string metadata (e.g. ``num_images``, ``extractor``)."""
    arrays = dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                  **{k: np.asarray(v) for k, v in metadata.items()})
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, metadata) from a ``.npz`` written by :func:`save_stats` or by pytorch-fid. Any other
    file (it is never unpickled), or statistics that are not finite, is a one-line ValueError naming it."""
    try:
        with np.load(path) as z:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            meta = {k: z[k].item() if z[k].ndim == 0 else z[k] for k in z.files if k not in ("mu", "sigma")}
    except (ValueError, EOFError, KeyError, AttributeError, TypeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not FID statistics (an .npz with arrays mu and sigma; "
                         f"{type(e).__name__})") from None
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean [F] and a covariance [F, F]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: the statistics are not finite (mu or sigma holds NaN or inf)")
    return mu, sigma, meta


def reference_stats(name: str, images_fn: Callable[[], np.ndarray], extractor: "FeatureExtractor",
                    path: str | None = None, batch_size: int = 50, progress: bool = True):
    """(mu, sigma) of dataset ``name``'s features, computed once from ``images_fn()`` and cached.

    The cache file (default ``<cache dir>/stats/<name>-<extractor>.npz``) records the extractor and the
    number of images; a file made with another extractor is an error, not silently reused, and one that
    cannot be read is computed again and replaced (with a warning).
    """
    path = path or os.path.join(cache_dir(), "stats", f"{name.replace('/', '_')}-{extractor.name}.npz")
    cached = read_cached(path, load_stats)  # a broken file is recomputed and replaced
    if cached is not None:
        mu, sigma, meta = cached
        if meta.get("extractor", extractor.name) != extractor.name:
            raise ValueError(f"{path!r} holds {meta['extractor']!r} statistics, not {extractor.name!r}")
        return mu, sigma
    images = images_fn()
    mu, sigma = compute_stats(extractor.extract(images, batch_size=batch_size, progress=progress))
    save_stats(path, mu, sigma, num_images=len(images), extractor=extractor.name, dataset=name)
    return mu, sigma


# ----------------------------------------------------------------------------------------------
# Feature extractors.


class FeatureExtractor:
    """Images -> features by a jitted ``apply_fn(params, images_in_[0,1]_NHWC_float32)``.

    ``extract`` feeds fixed-size batches (the last one zero-padded), so each input shape compiles once.
    """

    def __init__(self, name: str, dim: int, apply_fn: Callable, params, channels: int,
                 image_size: int | None = None, box_filter: bool = False):
        self.name, self.dim, self.params = name, dim, params
        self.channels, self.image_size, self.box_filter = channels, image_size, box_filter
        # An already-jitted apply_fn is kept as is, so extractors sharing one reuse its compilations.
        self._fn = apply_fn if hasattr(apply_fn, "lower") else jax.jit(apply_fn)

    def _prepare(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype == np.uint8:
            x = batch.astype(np.float32) / 255.0
        elif np.issubdtype(batch.dtype, np.floating):
            x = batch.astype(np.float32)  # taken to be in [0, 1]
        else:
            raise ValueError(f"images must be uint8 (0..255) or float (0..1); got {batch.dtype}")
        c = x.shape[-1]
        if c != self.channels:
            if c == 1:
                x = np.repeat(x, self.channels, axis=-1)
            elif self.channels == 1 and c == 3:
                x = x.mean(axis=-1, keepdims=True)
            else:
                raise ValueError(f"{self.name}: cannot use {c}-channel images (wants {self.channels})")
        return x

    def extract(self, images, batch_size: int = 50, progress: bool = True) -> np.ndarray:
        """uint8 ``[N, H, W, C]`` (or ``[N, H, W]``) images -> float32 ``[N, dim]`` features."""
        from tqdm.auto import tqdm

        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}")
        if self.box_filter and self.image_size is not None:
            images = box_downsample(images, self.image_size)
        if self.image_size is not None and images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"{self.name} features need {self.image_size}x{self.image_size} images; "
                             f"got {images.shape[1]}x{images.shape[2]}")
        n = len(images)
        bs = max(1, min(batch_size, n))
        out = np.empty((n, self.dim), np.float32)
        pending = None  # (start, count, device result): batch i+1 is dispatched before batch i is read
        for start in tqdm(range(0, n, bs), desc=f"{self.name} features", unit="batch", disable=not progress):
            batch = self._prepare(images[start:start + bs])
            k = len(batch)
            batch = pad_rows(batch, bs)
            result = self._fn(self.params, jnp.asarray(batch))
            if pending is not None:
                out[pending[0]:pending[0] + pending[1]] = np.asarray(pending[2])[:pending[1]]
            pending = (start, k, result)
        if pending is not None:
            out[pending[0]:pending[0] + pending[1]] = np.asarray(pending[2])[:pending[1]]
        return out


def inception_feature_extractor(weights: str | dict | None = None) -> FeatureExtractor:
    """The standard FID extractor: 2048-d pool features of the FID Inception-v3.

    ``weights``: converted params (a dict), or a path to pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` (or a converted ``.npz``); default
    :func:`ddim_jax.inception.default_weights_path`. Any image size and 1 or 3 channels are accepted;
    images are resized to 299x299 bilinearly, as pytorch-fid does.
    """
    params = weights if isinstance(weights, dict) else inception.load_inception_params(weights)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return FeatureExtractor("inception", inception.FEATURE_DIM, _inception_apply, params, channels=3)


@jax.jit
def _inception_apply(params, x):
    return inception.FIDInceptionV3().apply({"params": params}, x)


# ----------------------------------------------------------------------------------------------
# The digits extractor.


def box_downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 images ``[N, k*size, k*size, C]`` -> ``[N, size, size, C]``: the mean of each k x k block,
    rounded (the upscaled digits of a latent model, read at the digits' 8x8). Other shapes are returned
    as they are."""
    n, h, w = images.shape[:3]
    if h != w or h == size or h % size:
        return images
    f = h // size
    out = images.reshape(n, size, f, size, f, -1).astype(np.float32).mean((2, 4))
    return np.round(out).astype(images.dtype) if images.dtype == np.uint8 else out.astype(images.dtype)


@jax.jit
def _digits_apply(params, x):
    return digits_classifier.DigitsCNN().apply({"params": params}, x, features_only=True)


def digits_feature_extractor(cache: bool = True) -> FeatureExtractor:
    """64-d penultimate features of the digits CNN (:mod:`ddim_jax.digits_classifier`): 8x8 images (larger
    ones of a multiple of that size are box-filtered to 8x8), 1 channel (3-channel images are averaged).
    The trained weights are cached, so it is trained once;
    ``.test_accuracy`` holds the classifier's held-out accuracy."""
    params, acc = digits_classifier.load_digits_classifier(cache=cache)
    ext = FeatureExtractor("digits_cnn", digits_classifier.DIGITS_FEATURE_DIM, _digits_apply,
                           jax.tree_util.tree_map(jnp.asarray, params), channels=1, image_size=8, box_filter=True)
    ext.test_accuracy = acc
    return ext


def feature_extractor(name: str, **kwargs) -> FeatureExtractor:
    """By name: ``"inception"`` (kwargs: ``weights``) or ``"digits"``/``"digits_cnn"``."""
    if name == "inception":
        return inception_feature_extractor(**kwargs)
    if name in ("digits", "digits_cnn"):
        return digits_feature_extractor(**kwargs)
    raise ValueError(f"unknown feature extractor {name!r}; use 'inception' or 'digits'")
