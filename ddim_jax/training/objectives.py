"""What a run trains for, one entry per objective (:data:`OBJECTIVES`, chosen by the model kind's
``objective``): the trainable parameters, the loss of one device's rows, the model a run exports and the
preview grid it writes.

* ``diffusion``: DDPM's denoising loss (eps, v or x0 target) at a uniform timestep; class-conditional
  models see their labels dropped to the null label with probability ``training.p_uncond``. A latent
  model's images are first encoded by its frozen autoencoder (a posterior sample, times the scale
  factor; see :mod:`ddim_jax.training.latent`).
* ``autoencoder``: latent diffusion's autoencoder loss: L1 reconstruction, a regulariser and, from step
  ``loss.disc_start``, a PatchGAN discriminator's hinge loss weighted by taming-transformers' adaptive
  weight ``||grad_W rec|| / (||grad_W adv|| + 1e-4)`` at the decoder's last layer ``W``, times
  ``loss.disc_weight``. The regulariser: for a KL autoencoder ``loss.kl_weight`` x KL to N(0, I) (both
  per-image sums as LDM, here divided by the pixels per image so that the loss reads as a per-pixel L1);
  for a VQ autoencoder ``loss.codebook_weight`` x the VQ loss (codebook + beta x commitment; the number of
  codes in use is logged). The discriminator is trained in the same step on the same batch (its
  parameters sit next to the autoencoder's in the train state; the autoencoder's loss sees it frozen and
  its own loss sees the reconstructions frozen, so one gradient serves both). With LPIPS weights given
  (``loss.lpips_vgg16``, ``loss.lpips_heads``; :mod:`ddim_jax.training.perceptual`) the reconstruction
  term is LDM's ``L1 + loss.perceptual_weight x LPIPS(x, x_rec)`` (each image's LPIPS distance added to
  each of its pixels' L1, so here to their mean), and the adaptive weight balances the adversarial term
  against that sum, as LDM's. None is shipped and nothing is downloaded: without the files the term is
  absent and the run's log says so.

The train step (:mod:`ddim_jax.training.state`) draws each example's key, normalises and flips the images,
averages the gradients over devices and applies the update; an objective's ``loss`` runs inside the
step's ``shard_map`` on the whole parameters (``lax.pmean`` over the batch's axes,
``ddim_jax.parallel.BATCH_AXES``, is available) and returns ``(value, metrics)``: the
value is differentiated, the metrics (``loss`` is the value unless the objective reports its own) are
averaged over devices and logged. ``frozen`` holds the parameters the run uses but does not train (a
latent model's autoencoder: ``{"autoencoder": ...}``; an autoencoder's LPIPS network: ``{"lpips": ...}``;
else ``{}``; a LoRA run's frozen base network: ``{"base": ...}``, :mod:`ddim_jax.training.adapters`);
``model_params(params, frozen)`` is the model a run exports.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import conditioning, experiments, kinds, lpips
from ddim_jax.conditioning import Conditioning
from ddim_jax.diffusion import per_example_loss
from ddim_jax.models import ModelSpec
from ddim_jax.parallel import BATCH_AXES, round_up
from ddim_jax.training import adapters, distill
from ddim_jax.training.inputs import diffusion_inputs, fold
from ddim_jax.training.perceptual import enabled as perceptual_enabled




class Diffusion:
    def __init__(self, config, spec: ModelSpec, model):
        self.spec, self.model, self.p_uncond = spec, model, config.training.p_uncond
        self.schedule = spec.make_schedule()

    def init(self, key) -> dict:
        return self.spec.init(key)

    def frozen_shapes(self) -> dict:
        return {} if self.spec.autoencoder is None else {"autoencoder": self.spec.autoencoder.param_shapes()}

    def model_params(self, params, frozen) -> dict:
        return params if self.spec.autoencoder is None else {"denoiser": params, **frozen}

    def summary(self) -> str:
        s = dict(self.spec.schedule)
        return (f"objective: diffusion ({self.spec.prediction_type} target, {s['name']} schedule over "
                f"{s['num_timesteps']} steps" + (f", labels dropped with p = {self.p_uncond}"
                                                   if self.spec.null_label is not None else "") + ")"
                + (f", on its {self.spec.autoencoder.kind}'s latents x {self.spec.scale_factor:.5g}"
                   if self.spec.autoencoder is not None else "")
                + (f", conditioned by concatenation on {self.spec.concat}" if self.spec.concat else ""))

    def loss(self, params, frozen, x0, labels, keys, step, dropout_key):
        spec, T = self.spec, self.schedule.num_timesteps
        x0, y, cond = diffusion_inputs(spec, frozen, x0, labels, keys, self.p_uncond)
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, T, jnp.int32))(fold(keys, 0))
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(fold(keys, 1))

        def net(x, tt, yy):
            return self.model.apply({"params": params}, x, tt, yy, train=True, rngs={"dropout": dropout_key})

        eps_fn = functools.partial(conditioning.apply, net, Conditioning(labels=y, concat=cond))
        return jnp.mean(per_example_loss(eps_fn, self.schedule, x0, t, noise, prediction_type=spec.prediction_type)), {}

    def preview(self, params, mesh, source, n: int, config):
        """``n`` DDIM samples (``training.sample_steps`` steps) of the model being trained."""
        model = experiments.Model(self.spec, params, mesh)
        sources = None if self.spec.concat is None else source.get(range(min(n, len(source))))
        return experiments.generate(model, n, round_up(n, mesh.devices.size), config.training.sample_steps,
                                    seed=config.training.seed + 1, progress=False, sources=sources)


# ---------------------------------------------------------------------------------------------
# The autoencoder's losses (pure functions of arrays).


def hinge_discriminator_loss(logits_real, logits_fake):
    """The discriminator's hinge loss: ``(mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec)))) / 2``."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(grad_rec, grad_adv, max_weight: float = 1e4):
    """taming-transformers' balance of the adversarial term: ``||grad rec|| / (||grad adv|| + 1e-4)`` at the
    decoder's last layer, clipped to ``[0, max_weight]``."""
    w = jnp.linalg.norm(grad_rec.ravel()) / (jnp.linalg.norm(grad_adv.ravel()) + 1e-4)
    return jnp.clip(w, 0.0, max_weight)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN as taming-transformers' ``NLayerDiscriminator``: 4x4 convs, ``layers`` of them with
    stride 2 and doubling channels (up to 8 x ``channels``), one with stride 1, then a 1-channel 4x4 conv:
    one real/fake logit per overlapping patch. GroupNorm (8 groups) stands in for BatchNorm, so the
    train state holds no batch statistics."""

    layers: int = 3
    channels: int = 64

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        conv = lambda ch, stride, bias=False: nn.Conv(ch, (4, 4), (stride, stride), padding=1,  # noqa: E731
                                                      use_bias=bias, kernel_init=init)
        h = nn.leaky_relu(conv(self.channels, 2, bias=True)(x), 0.2)
        for n in range(1, self.layers + 1):
            h = conv(self.channels * min(2 ** n, 8), 2 if n < self.layers else 1)(h)
            h = nn.leaky_relu(nn.GroupNorm(num_groups=8, epsilon=1e-5)(h), 0.2)
        return conv(1, 1, bias=True)(h)


class Autoencoder:
    def __init__(self, config, spec: ModelSpec, model):
        self.spec, self.model, self.cfg = spec, model, config.loss
        self.latents = kinds.get(spec.kind).latents
        self.disc = (PatchDiscriminator(self.cfg.disc_layers, self.cfg.disc_channels)
                     if self.cfg.disc_weight > 0 else None)
        self.perceptual = perceptual_enabled(self.cfg)

    def init(self, key) -> dict:
        params = {"autoencoder": self.spec.init(jax.random.fold_in(key, 0))}
        if self.disc is not None:
            x = jnp.zeros((1, self.spec.image_size, self.spec.image_size, self.spec.channels), jnp.float32)
            params["discriminator"] = self.disc.init(jax.random.fold_in(key, 1), x)["params"]
        return params

    def frozen_shapes(self) -> dict:
        return {"lpips": lpips.param_shapes()} if self.perceptual else {}

    @staticmethod
    def model_params(params, frozen) -> dict:
        return params["autoencoder"]

    def summary(self) -> str:
        cfg = self.cfg
        adv = (f"PatchGAN hinge x {cfg.disc_weight} x adaptive weight from step {cfg.disc_start}" if self.disc
               else "no discriminator")
        reg = f"{cfg[self.latents.reg_weight]:g} {self.latents.reg_name}"
        if self.perceptual:
            rec = f"L1 + {cfg.perceptual_weight:g} x LPIPS (VGG16 {cfg.lpips_vgg16}, heads {cfg.lpips_heads})"
        elif cfg.get("lpips_vgg16"):
            rec = "L1, no perceptual loss: loss.perceptual_weight is 0"
        else:
            rec = ("L1, no perceptual loss: no LPIPS weights given (loss.lpips_vgg16, loss.lpips_heads; nothing is "
                   "downloaded)")
        return f"objective: autoencoder ({rec} + {reg}, {adv})"

    def _latent(self, ae, x0, keys):
        """``(z, regulariser, metrics)``: the decoder's input (a KL posterior's sample, a VQ autoencoder's
        quantised latents) and the regularisation term weighted by its ``loss`` field (KL per pixel x
        ``kl_weight``; the VQ loss x ``codebook_weight``)."""
        side, ch = self.spec.latent_shape
        noise = jax.vmap(lambda k: jax.random.normal(k, (side, side, ch), jnp.float32))(fold(keys, 0))
        z, reg, metrics = self.latents.regularized(self.model, {"params": ae}, x0, noise)
        return z, self.cfg[self.latents.reg_weight] * reg, metrics

    def _decode(self, params, z):
        return self.model.apply({"params": params}, z, method=self.latents.decode)

    def loss(self, params, frozen, x0, labels, keys, step, dropout_key):
        cfg, ae = self.cfg, params["autoencoder"]
        z, reg, metrics = self._latent(ae, x0, keys)
        rec = self._decode(ae, z)
        rec_loss, terms = self._rec_loss(x0, rec, frozen)
        metrics.update(terms)
        ae_loss = rec_loss + reg
        if self.disc is None:
            return ae_loss, dict(metrics, loss=ae_loss)
        on = (step >= cfg.disc_start).astype(jnp.float32)
        d = lambda p, x: self.disc.apply({"params": p}, x)  # noqa: E731
        frozen_d = jax.lax.stop_gradient(params["discriminator"])
        g_loss = -jnp.mean(d(frozen_d, rec))
        weight = cfg.disc_weight * self._adaptive_weight(jax.lax.stop_gradient(ae), jax.lax.stop_gradient(z), x0,
                                                         jax.lax.stop_gradient(rec), frozen_d, frozen)
        ae_loss = ae_loss + on * weight * g_loss
        d_loss = on * hinge_discriminator_loss(d(params["discriminator"], x0),
                                               d(params["discriminator"], jax.lax.stop_gradient(rec)))
        metrics.update(loss=ae_loss, g_loss=g_loss, disc_loss=d_loss, d_weight=weight)
        return ae_loss + d_loss, metrics

    def _rec_loss(self, x0, rec, frozen):
        """``(loss, terms)``: the reconstruction term, mean L1 (``rec_loss``) plus ``perceptual_weight`` x mean
        LPIPS (``p_loss``) when the run has one."""
        terms = {"rec_loss": jnp.mean(jnp.abs(x0 - rec))}
        if not self.perceptual:
            return terms["rec_loss"], terms
        terms["p_loss"] = jnp.mean(lpips.distance(frozen["lpips"], x0, rec))
        return terms["rec_loss"] + self.cfg.perceptual_weight * terms["p_loss"], terms

    def _adaptive_weight(self, ae, z, x0, rec, disc, frozen):
        """The adaptive weight from the gradients (averaged over devices) of the reconstruction term (with its
        perceptual part) and the adversarial loss with respect to the decoder's last conv kernel."""
        last = ae["decoder"]["conv_out"]
        _, vjp = jax.vjp(lambda w: self._decode(dict(ae, decoder=dict(ae["decoder"], conv_out=dict(last, kernel=w))),
                                                z), last["kernel"])
        # Each loss's gradient at the loss's own reconstruction ``rec``, then through the last layer. At that
        # same ``rec`` XLA computes LPIPS' VGG forward passes and its backward pass once, for this and for the
        # loss's own gradient (the compiled step holds one VGG backward; benchmarks/lpips_cost.py).
        at_rec = (jax.grad(lambda r: self._rec_loss(x0, r, frozen)[0])(rec),
                  jax.grad(lambda r: -jnp.mean(self.disc.apply({"params": disc}, r)))(rec))
        (grad_rec,), (grad_adv,) = vjp(at_rec[0]), vjp(at_rec[1])
        grad_rec, grad_adv = jax.lax.pmean((grad_rec, grad_adv), BATCH_AXES)
        return jax.lax.stop_gradient(adaptive_weight(grad_rec, grad_adv))

    def preview(self, params, mesh, source, n: int, config):
        """The first ``n`` training images over their reconstructions (from the posterior mean)."""
        images = source.get(np.arange(min(n, len(source))))
        x = images.astype(np.float32) / 127.5 - 1.0
        rec = np.asarray(_reconstruct(self.model, params, x))
        rec = np.clip(np.round((rec + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return np.concatenate([images, rec])


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(model, params, x):
    """An autoencoder's reconstructions (from the posterior mean), compiled once per network and batch shape
    (a run's previews, and a resumed run's in the same process, reuse the program)."""
    return model.apply({"params": params}, x)


OBJECTIVES = {"diffusion": Diffusion, "autoencoder": Autoencoder}


def make_objective(config, spec: ModelSpec, model=None):
    """The objective of ``spec``'s kind, around ``model`` (default: the spec's network, in
    ``training.compute_dtype``, rematerialised with ``training.remat``)."""
    if model is None:
        model = spec.build(config.training.compute_dtype, config.training.remat)
    if distill.enabled(config):
        return distill.make(config, spec, model)  # a student of a frozen teacher (ddim_jax.training.distill)
    objective = OBJECTIVES[kinds.get(spec.kind).objective](config, spec, model)
    return adapters.LoraObjective(objective, config) if adapters.enabled(config) else objective
