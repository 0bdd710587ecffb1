"""Denoising diffusion over small vectors (PISL's patch parameters theta), as
pure functions.

    schedule = cosine_schedule(1000)
    x_t = q_sample(schedule, x0, t, noise)                  # forward noising
    x_prev = ddpm_step(schedule, x_t, t, eps_hat, noise)    # ancestral step
    x_prev = ddim_step(schedule, x_t, t, t_prev, eps_hat, eta, noise)
    x0 = sample(denoise, schedule, x_T, key, steps=5)      # lax.scan, DDIM

The schedule is a pytree of arrays (explicit state); every random draw takes
its key as an argument. `Denoiser` is the noise-prediction network: an MLP of
the noisy vector, a sinusoidal embedding of t and a conditioning vector (the
image's pooled feature).

Conventions (Ho et al. 2020, Song et al. 2021, the cosine schedule of Nichol &
Dhariwal 2021): t in 0 .. T-1, alpha_bar[t] = prod_{s <= t} (1 - beta[s]),
q(x_t | x_0) = N(sqrt(alpha_bar[t]) x_0, (1 - alpha_bar[t]) I); alpha_bar of
t = -1 is 1 (the clean end).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxreid.models.layers import host_zeros


class Schedule(struct.PyTreeNode):
    """betas (T,) and alpha_bar (T,) float32."""

    betas: jax.Array
    alpha_bar: jax.Array

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def cosine_schedule(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = f(t) / f(0),
    f(t) = cos((t / T + s) / (1 + s) * pi / 2) ** 2, betas clipped at max_beta."""
    if num_steps < 1:
        raise ValueError(f"a diffusion needs at least one step, got {num_steps}")
    x = np.linspace(0.0, num_steps, num_steps + 1, dtype=np.float64)
    f = np.cos((x / num_steps + s) / (1 + s) * math.pi * 0.5) ** 2
    f = f / f[0]
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)
    alpha_bar = np.cumprod(1.0 - betas)
    return Schedule(
        betas=jnp.asarray(betas, jnp.float32), alpha_bar=jnp.asarray(alpha_bar, jnp.float32)
    )


def _bar(schedule: Schedule, t: jax.Array) -> jax.Array:
    """alpha_bar[t], 1 for t < 0."""
    t = jnp.asarray(t)
    return jnp.where(t >= 0, schedule.alpha_bar[jnp.maximum(t, 0)], 1.0)


def _per_row(value: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar or (B,) value broadcast against x (B, ...)."""
    value = jnp.asarray(value)
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise; t scalar or (B,)."""
    bar = _per_row(_bar(schedule, t), x0)
    return jnp.sqrt(bar) * x0 + jnp.sqrt(1.0 - bar) * noise


def predict_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0 implied by the predicted noise: (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    bar = _per_row(_bar(schedule, t), x_t)
    return (x_t - jnp.sqrt(1.0 - bar) * eps) / jnp.sqrt(bar)


def ddpm_step(
    schedule: Schedule,
    x_t: jax.Array,
    t: jax.Array,
    eps: jax.Array,
    noise: jax.Array,
    clip: float | None = None,
) -> jax.Array:
    """One ancestral step x_t -> x_{t-1} ~ q(x_{t-1} | x_t, x0_hat): the
    posterior mean with x0_hat from eps (clipped to [-clip, clip] if given) plus
    sqrt(posterior variance) noise (no noise at t = 0)."""
    bar = _per_row(_bar(schedule, t), x_t)
    bar_prev = _per_row(_bar(schedule, jnp.asarray(t) - 1), x_t)
    beta = _per_row(schedule.betas[jnp.asarray(t)], x_t)
    x0 = predict_x0(schedule, x_t, t, eps)
    if clip is not None:
        x0 = jnp.clip(x0, -clip, clip)
    mean = (jnp.sqrt(bar_prev) * beta / (1.0 - bar)) * x0 + (
        jnp.sqrt(1.0 - beta) * (1.0 - bar_prev) / (1.0 - bar)
    ) * x_t
    variance = beta * (1.0 - bar_prev) / (1.0 - bar)
    return mean + jnp.where(_per_row(jnp.asarray(t), x_t) > 0, jnp.sqrt(variance), 0.0) * noise


def ddim_step(
    schedule: Schedule,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    eps: jax.Array,
    eta: float,
    noise: jax.Array,
    clip: float | None = None,
) -> jax.Array:
    """One DDIM step x_t -> x_{t_prev} (t_prev < t; -1 for the clean end):
    sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps + sigma noise, a' =
    alpha_bar[t_prev], sigma = eta sqrt((1 - a') / (1 - a) (1 - a / a'));
    eta 0 is deterministic, eta 1 DDPM's variance."""
    bar = _per_row(_bar(schedule, t), x_t)
    bar_prev = _per_row(_bar(schedule, t_prev), x_t)
    x0 = predict_x0(schedule, x_t, t, eps)
    if clip is not None:
        x0 = jnp.clip(x0, -clip, clip)
        # The direction term uses the noise consistent with the clipped x0.
        eps = (x_t - jnp.sqrt(bar) * x0) / jnp.sqrt(1.0 - bar)
    sigma = eta * jnp.sqrt((1.0 - bar_prev) / (1.0 - bar) * (1.0 - bar / bar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - bar_prev - sigma**2, 0.0))
    return jnp.sqrt(bar_prev) * x0 + direction * eps + sigma * noise


def sampling_times(num_steps: int, steps: int) -> np.ndarray:
    """`steps` decreasing times from T - 1 towards 0, evenly spaced (DDIM's
    sub-sequence; all T steps when steps == T)."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"sampling steps must be in [1, {num_steps}], got {steps}")
    return np.round(np.linspace(num_steps - 1, 0, steps)).astype(np.int32)


def sample(
    denoise: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    steps: int,
    eta: float = 0.0,
    clip: float | None = 1.0,
) -> jax.Array:
    """x0 from x_T by `steps` DDIM steps in a lax.scan; denoise(x_t, t (B,)) -> eps.

    With steps == T and eta == 1 this is DDPM's ancestral sampler. `key` is
    split per step (unused when eta == 0)."""
    times = sampling_times(schedule.num_steps, steps)
    previous = np.append(times[1:], -1).astype(np.int32)
    keys = jax.random.split(key, steps)
    b = x_T.shape[0]

    def body(x, step):
        t, t_prev, k = step
        eps = denoise(x, jnp.full((b,), t, jnp.int32))
        noise = jax.random.normal(k, x.shape, x.dtype)
        return ddim_step(schedule, x, t, t_prev, eps, eta, noise, clip), None

    x0, _ = jax.lax.scan(body, x_T, (jnp.asarray(times), jnp.asarray(previous), keys))
    return x0


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """(B,) times -> (B, dim) [sin, cos] of t / 10000^(i / (dim/2 - 1))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


class Denoiser(nnx.Module):
    """eps_hat = MLP([x_t, embed(t), condition]): two SiLU hidden layers; the
    output layer starts at zero (predicting no noise, x0_hat = x_t / sqrt(a))."""

    def __init__(self, dim: int, condition_dim: int, *, hidden: int, time_dim: int, rngs: nnx.Rngs):
        self.time_dim = time_dim
        kernel = nnx.initializers.lecun_normal()
        self.hidden = nnx.List(
            [
                nnx.Linear(dim + time_dim + condition_dim, hidden, kernel_init=kernel, rngs=rngs),
                nnx.Linear(hidden, hidden, kernel_init=kernel, rngs=rngs),
            ]
        )
        self.out = nnx.Linear(hidden, dim, kernel_init=host_zeros, bias_init=host_zeros, rngs=rngs)

    def __call__(self, x_t: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
        h = jnp.concatenate(
            [x_t, timestep_embedding(t, self.time_dim), condition.astype(jnp.float32)], -1
        )
        for layer in self.hidden:
            h = jax.nn.silu(layer(h))
        return self.out(h)
