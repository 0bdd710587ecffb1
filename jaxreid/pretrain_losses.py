"""The losses of self-supervised person pre-training (SSL-KD, #52), pure
functions of arrays, and the collapse monitor.

- `distillation_loss`: the teacher's complete view, centred and sharpened
  (DINO, Caron et al. 2021), as the target distribution of every student
  view (degraded, upper body, lower body) through the projection heads;
  the centring keeps one prototype from taking every image, the sharpening
  keeps the target from going uniform: the guard against collapse.
- `update_center`: the centre's moving average over the teacher's logits.
- `restoration_loss`: masked / degraded feature cells of the student,
  through a predictor, against the teacher's cells of the complete view
  (1 - cosine, weighted per cell).
- `variance_loss`: VICReg's hinge on each dimension's standard deviation,
  an optional second guard against collapse.
- `embedding_std`, `effective_rank`: the collapse monitor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def teacher_targets(teacher_logits: jax.Array, center: jax.Array, temperature: float) -> jax.Array:
    """softmax((t - center) / temperature): the centred, sharpened targets (B, K)."""
    return jax.nn.softmax((teacher_logits - center) / temperature, axis=-1)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    center: jax.Array,
    student_temperature: float,
    teacher_temperature: float,
) -> jax.Array:
    """Mean over views V and images B of the cross-entropy
    -sum_k p_t[b, k] log softmax(s[v, b] / student_temperature)_k, with
    p_t = teacher_targets(teacher_logits, center, teacher_temperature) held
    constant (no gradient to the teacher). student_logits (V, B, K),
    teacher_logits (B, K), center (K,)."""
    targets = jax.lax.stop_gradient(teacher_targets(teacher_logits, center, teacher_temperature))
    log_p = jax.nn.log_softmax(student_logits / student_temperature, axis=-1)
    return -jnp.mean(jnp.sum(targets[None] * log_p, axis=-1))


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum: float) -> jax.Array:
    """center * momentum + (1 - momentum) * mean over the batch of the teacher's logits."""
    return center * momentum + (1.0 - momentum) * jnp.mean(teacher_logits, axis=0)


def restoration_loss(
    predicted: jax.Array, target: jax.Array, weights: jax.Array, eps: float = 1e-6
) -> jax.Array:
    """sum_{b,n} w[b, n] (1 - cos(predicted[b, n], target[b, n])) / sum w:
    predicted (B, N, C) from the student's masked / degraded view, target
    (B, N, C) the teacher's cells of the complete view (no gradient), weights
    (B, N) (1 on masked cells, less on visible but degraded ones)."""
    target = jax.lax.stop_gradient(target)
    p = predicted / jnp.sqrt(jnp.sum(predicted * predicted, axis=-1, keepdims=True) + eps)
    t = target / jnp.sqrt(jnp.sum(target * target, axis=-1, keepdims=True) + eps)
    cosine = jnp.sum(p * t, axis=-1)
    return jnp.sum(weights * (1.0 - cosine)) / jnp.maximum(jnp.sum(weights), eps)


def variance_loss(z: jax.Array, gamma: float = 1.0, eps: float = 1e-4) -> jax.Array:
    """mean_d relu(gamma - sqrt(var_d(z) + eps)) over the batch's (B, D)
    embeddings (VICReg, Bardes et al. 2022; unbiased variance)."""
    std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)
    return jnp.mean(jax.nn.relu(gamma - std))


def _unit(z: jax.Array) -> jax.Array:
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def embedding_std(z: jax.Array) -> jax.Array:
    """Mean over dimensions of the per-dimension standard deviation of the
    L2-normalised (B, D) embeddings: 0 when every image maps to one point,
    about 1 / sqrt(D) when they spread over the sphere (SimSiam's monitor)."""
    return jnp.mean(jnp.std(_unit(z), axis=0))


def effective_rank(z: jax.Array) -> jax.Array:
    """exp(entropy of the normalised singular values) of the centred,
    L2-normalised (B, D) embeddings (Roy and Vetterli 2007): between 1 (one
    direction, collapse) and min(B, D)."""
    u = _unit(z)
    s = jnp.linalg.svd(u - jnp.mean(u, axis=0), compute_uv=False)
    p = s / jnp.maximum(jnp.sum(s), 1e-12)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)
