"""Building blocks of the cross-domain methods (sal, clc, ppan): pure
functions of a batch that holds labelled source and unlabelled target
samples, each tested against NumPy (tests/test_cross_domain.py).

    MMD^2(S, T)  = mean k(s, s') + mean k(t, t') - 2 mean k(s, t),
                   k(x, y) = sum_b exp(-||x - y||^2 / (2 sigma_b^2)),
                   sigma_b^2 = m_b * (mean pairwise squared distance of S u T)
    CORAL(S, T)  = ||C_S - C_T||_F^2 / (4 d^2)    (C: feature covariance)
    agent consistency = mean_i KL(q_i || p_i), p_i = softmax(z_i / tau) of
                   the logits over the agents (source classifier), q_i the
                   same of the memory's record of image i (no gradient)
    dual classification = CE_ls(source logits, source ids)
                   + CE(target logits, imitated target ids)
    cross-domain triplet: batch-hard over both domains, a positive shares
                   the sample's domain and label, any other sample is a
                   negative
    progressive weights: per source identity, 1 - alpha + alpha * w_c, w_c
                   in [0, 1] rising with the identity's similarity to its
                   nearest target image, alpha ramping 0 -> 1
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxreid.methods.supervised import pairwise_euclidean
from jaxreid.utils import l2_normalize


def _squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    d2 = jnp.sum(x * x, 1)[:, None] + jnp.sum(y * y, 1)[None, :] - 2.0 * x @ y.T
    return jnp.maximum(d2, 0.0)


BANDWIDTHS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _kernel(x: jax.Array, bandwidths: tuple[float, ...]) -> jax.Array:
    """Sum of Gaussian kernels over the rows of x, bandwidths relative to the
    mean pairwise squared distance (no gradient through it): the loss does
    not depend on the scale of the features."""
    d2 = _squared_distances(x, x)
    n = x.shape[0]
    scale = jax.lax.stop_gradient(jnp.sum(d2) / (n * n - n))
    return sum(jnp.exp(-d2 / (2.0 * m * scale + 1e-12)) for m in bandwidths)


def mmd(
    features: jax.Array, is_source: jax.Array, bandwidths: tuple[float, ...] = BANDWIDTHS
) -> jax.Array:
    """Squared maximum mean discrepancy (biased estimate) between the source
    rows (`is_source`) and the other rows of one (B, D) batch, with a sum of
    Gaussian kernels (0 when a domain has no row)."""
    kernel = _kernel(features.astype(jnp.float32), bandwidths)
    s = is_source.astype(jnp.float32)
    t = 1.0 - s

    def mean(a, b):
        return (a @ kernel @ b) / jnp.maximum(jnp.sum(a) * jnp.sum(b), 1.0)

    both = (jnp.sum(s) > 0) & (jnp.sum(t) > 0)
    return jnp.where(both, mean(s, s) + mean(t, t) - 2.0 * mean(s, t), 0.0)


def coral(features: jax.Array, is_source: jax.Array) -> jax.Array:
    """Deep CORAL between the source rows and the other rows of one batch:
    squared Frobenius distance of the two (unbiased) feature covariances,
    over 4 d^2."""
    x = features.astype(jnp.float32)

    def covariance(mask):
        w = mask.astype(jnp.float32)[:, None]
        count = jnp.sum(w)
        centred = (x - jnp.sum(w * x, 0) / jnp.maximum(count, 1.0)) * w
        return centred.T @ centred / jnp.maximum(count - 1.0, 1.0)

    d = x.shape[1]
    return jnp.sum(jnp.square(covariance(is_source) - covariance(~is_source))) / (4.0 * d * d)


def agent_consistency(
    logits: jax.Array, reference_logits: jax.Array, temperature: float, use: jax.Array
) -> jax.Array:
    """Mean over the `use` rows of KL(q || p): p = softmax(logits / tau), the
    samples' similarity to the agents (the source classifier's weights), q
    the same of `reference_logits` (e.g. the memory's record of the image's
    last visit; no gradient). A target image keeps the relation to the
    source identities it had, whatever the augmentation."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.lax.stop_gradient(
        jax.nn.log_softmax(reference_logits.astype(jnp.float32) / temperature, axis=-1)
    )
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    return jnp.sum(jnp.where(use, kl, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Smoothed CE over the rows whose label is >= 0 (0 when none)."""
    use = labels >= 0
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    c = logits.shape[-1]
    target = jax.nn.one_hot(jnp.maximum(labels, 0), c) * (1.0 - smoothing) + smoothing / c
    ce = -jnp.sum(target * log_p, axis=-1)
    return jnp.sum(jnp.where(use, ce, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def dual_classification(
    source_logits: jax.Array,
    source_labels: jax.Array,
    target_logits: jax.Array,
    target_labels: jax.Array,
    smoothing: float,
) -> tuple[jax.Array, jax.Array]:
    """(source CE, target CE): the source identities with label smoothing, the
    imitated target's identities (pseudo-labels, -1 ignored) without (they
    are noisy already). Rows with a negative label take no part."""
    return (
        masked_cross_entropy(source_logits, source_labels, smoothing),
        masked_cross_entropy(target_logits, target_labels),
    )


def cross_domain_triplet(
    features: jax.Array, labels: jax.Array, domains: jax.Array, margin: float
) -> jax.Array:
    """Batch-hard triplet over a two-domain batch: sample i's positives share
    its domain and label, its negatives are the samples of another label or
    domain; rows with a negative label take no part. Mean over anchors with
    a positive and a negative."""
    d = pairwise_euclidean(features.astype(jnp.float32))
    labelled = labels >= 0
    both = labelled[:, None] & labelled[None, :]
    same = (labels[:, None] == labels[None, :]) & (domains[:, None] == domains[None, :])
    eye = jnp.eye(labels.shape[0], dtype=bool)
    positive, negative = same & both & ~eye, ~same & both
    hardest_pos = jnp.max(jnp.where(positive, d, -jnp.inf), axis=1)
    hardest_neg = jnp.min(jnp.where(negative, d, jnp.inf), axis=1)
    use = jnp.any(positive, 1) & jnp.any(negative, 1)
    gap = jnp.where(use, hardest_pos - hardest_neg + margin, 0.0)
    return jnp.sum(jnp.maximum(gap, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def source_identity_weights(
    source_centroids: np.ndarray, target_features: np.ndarray, alpha: float, floor: float = 0.0
) -> np.ndarray:
    """Progressive re-weighting of the source identities (host, per epoch):
    each identity's cosine similarity to its nearest target image, scaled to
    [0, 1] over the identities (min -> 0, max -> 1) and floored at `floor`,
    mixed in by `alpha` (0: all 1, the start; 1: the scaled similarity).
    Identities with no counterpart in the target weigh least."""
    s = l2_normalize(np.asarray(source_centroids, np.float64))
    t = l2_normalize(np.asarray(target_features, np.float64))
    nearest = (s @ t.T).max(axis=1)
    low, high = nearest.min(), nearest.max()
    scaled = (nearest - low) / (high - low) if high > low else np.ones_like(nearest)
    scaled = np.maximum(scaled, floor)
    return (1.0 - alpha + alpha * scaled).astype(np.float32)


def progress(epoch: int, epochs: int) -> float:
    """alpha of `source_identity_weights` at `epoch`: 0 at the first epoch,
    rising linearly to 1 at the last."""
    return 0.0 if epochs <= 1 else min(1.0, epoch / (epochs - 1))


def weighted_cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array, smoothing: float
) -> jax.Array:
    """sum_i w_{y_i} CE_ls(z_i, y_i) / sum_i w_{y_i} over rows with y >= 0:
    the source CE with each identity's progressive weight."""
    use = labels >= 0
    y = jnp.maximum(labels, 0)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    c = logits.shape[-1]
    target = jax.nn.one_hot(y, c) * (1.0 - smoothing) + smoothing / c
    ce = -jnp.sum(target * log_p, axis=-1)
    w = jnp.where(use, weights[y], 0.0)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


__all__ = [
    "agent_consistency",
    "coral",
    "cross_domain_triplet",
    "dual_classification",
    "masked_cross_entropy",
    "mmd",
    "progress",
    "source_identity_weights",
    "weighted_cross_entropy",
]
