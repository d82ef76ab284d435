"""An autoencoder run's perceptual (LPIPS) term: its weights, read from local files when the run starts.

``loss.lpips_vgg16`` and ``loss.lpips_heads`` name the files (:mod:`ddim_jax.lpips` says which); with
both given and ``loss.perceptual_weight > 0`` the objective adds ``perceptual_weight x LPIPS(x, x_rec)``
to the reconstruction loss. :func:`resolve` reads them before anything is written (a missing or wrong
file stops the run with nothing in the workdir) and gives their sha256 to the run record
(:mod:`ddim_jax.training.run`), so resuming with other weights under the same paths is refused. The
params are frozen: an argument of the train step, like a latent model's autoencoder.
"""

from __future__ import annotations

from ddim_jax import lpips


def enabled(loss) -> bool:
    """Whether a loss block asks for the LPIPS term."""
    return loss is not None and bool(loss.get("lpips_vgg16")) and loss.get("perceptual_weight", 0) > 0


def resolve(config) -> tuple[dict, str]:
    """``(frozen, sha256)``: ``{"lpips": params}`` and the two files' digest (the run record's), or ``({}, "")``
    when the run has no LPIPS term."""
    loss = config.get("loss")
    if not enabled(loss):
        return {}, ""
    params = lpips.load_params(loss.lpips_vgg16, loss.lpips_heads)
    return {"lpips": params}, lpips.files_digest(loss.lpips_vgg16, loss.lpips_heads)
