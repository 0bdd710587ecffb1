"""The diffusion's pure functions against closed forms written in NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreid import diffusion


def _numpy_bar(num_steps, s=0.008):
    t = np.arange(num_steps + 1) / num_steps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return betas, np.cumprod(1 - betas)


def test_cosine_schedule_matches_numpy():
    schedule = diffusion.cosine_schedule(50)
    betas, bar = _numpy_bar(50)
    np.testing.assert_allclose(np.asarray(schedule.betas), betas, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(schedule.alpha_bar), bar, rtol=1e-5, atol=1e-7)
    assert schedule.alpha_bar[-1] < 1e-3 < schedule.alpha_bar[0]  # from clean to noise


def test_forward_noising_closed_form():
    schedule = diffusion.cosine_schedule(100)
    _, bar = _numpy_bar(100)
    rng = np.random.default_rng(0)
    x0, noise = rng.normal(size=(2, 4, 6)).astype(np.float32)
    t = np.array([0, 17, 63, 99])
    x_t = diffusion.q_sample(schedule, x0, jnp.asarray(t), noise)
    expected = np.sqrt(bar[t])[:, None] * x0 + np.sqrt(1 - bar[t])[:, None] * noise
    np.testing.assert_allclose(np.asarray(x_t), expected, rtol=1e-5, atol=1e-6)


def test_ddpm_step_is_the_posterior_sample():
    # Ho et al.: mu = beta sqrt(a'_bar) / (1 - a_bar) x0 + (1 - a'_bar) sqrt(alpha) /
    # (1 - a_bar) x_t, variance beta (1 - a'_bar) / (1 - a_bar), x0 from eps.
    schedule = diffusion.cosine_schedule(100)
    betas, bar = _numpy_bar(100)
    rng = np.random.default_rng(1)
    x_t, eps, noise = rng.normal(size=(3, 4, 6)).astype(np.float32)
    t = np.array([1, 10, 50, 90])
    out = diffusion.ddpm_step(schedule, x_t, jnp.asarray(t), eps, noise)
    a, a_prev, beta = bar[t][:, None], bar[t - 1][:, None], betas[t][:, None]
    x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
    mean = beta * np.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * np.sqrt(1 - beta) / (1 - a) * x_t
    expected = mean + np.sqrt(beta * (1 - a_prev) / (1 - a)) * noise
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_ddim_step_closed_form_and_its_ddpm_limit():
    schedule = diffusion.cosine_schedule(100)
    _, bar = _numpy_bar(100)
    rng = np.random.default_rng(2)
    x_t, eps, noise = rng.normal(size=(3, 4, 6)).astype(np.float32)
    t, t_prev = np.array([5, 30, 60, 99]), np.array([0, 20, 59, -1])
    eta = 0.5
    out = diffusion.ddim_step(schedule, x_t, jnp.asarray(t), jnp.asarray(t_prev), eps, eta, noise)
    a = bar[t][:, None]
    a_prev = np.where(t_prev >= 0, bar[np.maximum(t_prev, 0)], 1.0)[:, None]
    x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
    # eta = 1 between neighbouring times is DDPM's ancestral step.
    t = np.array([1, 10, 50, 90])
    ddim = diffusion.ddim_step(schedule, x_t, jnp.asarray(t), jnp.asarray(t - 1), eps, 1.0, noise)
    ddpm = diffusion.ddpm_step(schedule, x_t, jnp.asarray(t), eps, noise)
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), rtol=1e-4, atol=1e-5)


def test_one_denoising_step_with_the_true_noise_lands_on_the_forward_marginal():
    # eta = 0 and eps the noise that made x_t: the step is q_sample at t_prev
    # with the same noise (the deterministic path of DDIM).
    schedule = diffusion.cosine_schedule(200)
    rng = np.random.default_rng(3)
    x0, noise = rng.uniform(-1, 1, size=(2, 3, 6)).astype(np.float32)
    x_t = diffusion.q_sample(schedule, x0, 120, noise)
    step = diffusion.ddim_step(schedule, x_t, 120, 80, noise, 0.0, np.zeros_like(noise))
    np.testing.assert_allclose(
        np.asarray(step), np.asarray(diffusion.q_sample(schedule, x0, 80, noise)), atol=1e-5
    )


@pytest.mark.parametrize("steps", [1, 5, 50])
def test_sampling_with_an_oracle_denoiser_recovers_x0(steps):
    schedule = diffusion.cosine_schedule(50)
    x0 = jnp.asarray(np.random.default_rng(4).uniform(-0.9, 0.9, size=(3, 6)), jnp.float32)

    def oracle(x_t, t):  # the noise that x0 would imply
        a = schedule.alpha_bar[t][:, None]
        return (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)

    x_T = jax.random.normal(jax.random.key(0), x0.shape)
    out = jax.jit(lambda k: diffusion.sample(oracle, schedule, x_T, k, steps=steps, eta=0.0))(
        jax.random.key(1)
    )
    # float32: x0 = (x_T - ...) / sqrt(alpha_bar[T - 1]) amplifies rounding 300x.
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=5e-4)
    # With eta = 1 the noise is drawn from the threaded key: same key, same draw.
    a = diffusion.sample(oracle, schedule, x_T, jax.random.key(2), steps=steps, eta=1.0)
    b = diffusion.sample(oracle, schedule, x_T, jax.random.key(2), steps=steps, eta=1.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sampling_times():
    np.testing.assert_array_equal(diffusion.sampling_times(10, 10), np.arange(9, -1, -1))
    np.testing.assert_array_equal(diffusion.sampling_times(1000, 5), [999, 749, 500, 250, 0])
    with pytest.raises(ValueError, match="sampling steps"):
        diffusion.sampling_times(10, 11)


def test_denoiser_starts_at_zero_and_learns():
    model = diffusion.Denoiser(6, 4, hidden=16, time_dim=8, rngs=nnx.Rngs(0))
    x = jnp.ones((3, 6))
    t = jnp.array([0, 5, 9])
    c = jnp.ones((3, 4))
    np.testing.assert_array_equal(np.asarray(model(x, t, c)), 0.0)

    def loss(m):
        return jnp.sum((m(x, t, c) - 1.0) ** 2)

    grads = nnx.grad(loss)(model)
    assert float(jnp.abs(grads.out.kernel[...]).max()) > 0
