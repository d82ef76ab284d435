"""DDIM (Song, Meng and Ermon, ICLR 2021) in JAX: pure functions for schedules, the forward
process, the generalized step, the scan sampler and the encoder."""

from ddim_jax.diffusion import (
    PREDICTION_TYPES,
    diffusion_loss,
    eps_to_x0,
    predict_x0_eps,
    q_mean_std,
    q_sample,
    training_target,
    v_to_x0_eps,
    x0_eps_to_v,
    x0_to_eps,
)
from ddim_jax.guidance import guided
from ddim_jax.oracle import GaussianMixture, energy_distance
from ddim_jax.sampling import ddim_encode, ddim_sample, ddim_step, slerp, threshold_x0
from ddim_jax.schedules import SCHEDULES, SPACINGS, Schedule, make_schedule, make_timesteps
from ddim_jax.solvers import SOLVERS, sample

__version__ = "0.1.0"
