"""Stripe-driven learning (SDFT's losses) on top of cluster contrast.

SDFT (a stripe-driven fusion transformer for unsupervised re-id) ties the
features of P horizontal stripes to the global feature and to the clusters.
Its two terms, as this library formulates them from the paper's description
(there is no public code to follow):

  SDCL  stripe-driven contrast: each stripe feature of a sample against one
        prototype per (cluster, stripe) pair; the positive is the sample's
        cluster at the same stripe, the negatives every other (cluster,
        stripe) pair, so stripes are contrasted by pseudo-identity and by
        position at once.
  SDR   stripe-driven regularisation, two parts:
          feature: the part-aggregated feature a = normalize(concat_p s_p)
                   agrees with the global feature g: mean(1 - <g, a>);
          cluster: their cluster assignments agree: each branch's softmax
                   over the valid clusters learns the other's as a fixed
                   target (mutual learning), KL(sg p_g || p_a) + KL(sg p_a ||
                   p_g) halved, p_g = softmax(g . C / tau), p_a = softmax(a .
                   A / tau), C the global prototypes, A the concatenated
                   stripe prototypes. (With gradients through both sides the
                   two branches could agree by flattening together: on the
                   synthetic set a ViT then collapsed into one cluster.)

The total is ClusterNCE(global) + sdcl_weight * SDCL + sdr_feature_weight *
SDR_feature + sdr_cluster_weight * SDR_cluster. The model must have the SCL
head (outputs "global" (B, D) and "stripes" (B, P, D / P)), which every
backbone has, ViT included (stripes from the patch tokens' bands), or on a ViT
the fusion head (jaxreid/models/fusion.py: part tokens fused with the [CLS]
token, SDFT's architecture).

Memory: the cluster-contrast memory of the global feature plus one (P, R, d)
table of stripe prototypes, row r the momentum mean of cluster r's stripe
features; rebuilt at every re-clustering from the same extraction.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxreid.methods import Batch, EpochPlan, Method, TrainSet, register
from jaxreid.methods.centroids import update_centroids
from jaxreid.methods.cluster import (
    ClusterMemory,
    build_memory,
    check_neighbour_sizes,
    cluster_problems,
    masked_nce,
    recluster,
    same_camera_rows,
)
from jaxreid.utils import l2_normalize
from jaxreid.validate import number_problems

_NEG = -1e9  # logit of an unused memory row (finite: keeps gradients clean)


class StripeMemory(struct.PyTreeNode):
    """clusters: the global feature's cluster-contrast memory (R = N rows).
    stripes:  (P, R, d) float32 unit rows: row r of table p is cluster r's
              prototype of stripe p (zeros where `clusters.valid` is False)."""

    clusters: ClusterMemory
    stripes: jax.Array


def build_stripe_prototypes(stripes: np.ndarray, rows: np.ndarray, num_rows: int) -> np.ndarray:
    """(P, R, d) normalised means of the (N, P, d) stripe features of each
    memory row's images (`rows` (N,), -1 for none); R = N, rows >= num_rows zero."""
    n, p, d = stripes.shape
    f = l2_normalize(np.asarray(stripes, np.float32))
    sums = np.zeros((p, n, d), np.float64)
    used = rows >= 0
    for q in range(p):
        np.add.at(sums[q], rows[used], f[used, q])
    counts = np.bincount(rows[used], minlength=n)[:n]
    means = sums / np.maximum(counts, 1)[None, :, None]
    out = l2_normalize(means).astype(np.float32)
    out[:, num_rows:] = 0.0
    return out


def stripe_contrast_loss(
    stripes: jax.Array,
    prototypes: jax.Array,
    valid: jax.Array,
    targets: jax.Array,
    temperature: float,
) -> jax.Array:
    """SDCL: mean over samples with target >= 0 and over stripes p of
    CE(softmax over every valid (cluster, stripe) prototype, target (targets, p)).

    stripes (B, P, d); prototypes (P, R, d); valid (R,) or (B, R): the rows
    each sample contrasts with; targets (B,) rows."""
    b, p, _ = stripes.shape
    r = prototypes.shape[1]
    s = l2_normalize(stripes.astype(jnp.float32))
    table = jax.lax.stop_gradient(prototypes).reshape(p * r, -1)
    logits = jnp.einsum("bpd,kd->bpk", s, table) / temperature  # k = q * R + row
    used = jnp.tile(jnp.broadcast_to(valid, (b, r)), (1, p))  # (B, P * R)
    logits = jnp.where(used[:, None, :], logits, _NEG)
    own = jnp.arange(p)[None, :] * r + jnp.maximum(targets, 0)[:, None]  # (B, P)
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, own[..., None], -1)[..., 0]
    use = targets >= 0
    return jnp.sum(jnp.where(use[:, None], ce, 0.0)) / jnp.maximum(jnp.sum(use) * p, 1)


def part_aggregate(stripes: jax.Array) -> jax.Array:
    """(B, P, d) -> (B, P * d): the concatenated unit stripes, normalised."""
    s = l2_normalize(stripes.astype(jnp.float32))
    return l2_normalize(s.reshape(s.shape[0], -1))


def feature_consistency_loss(global_features: jax.Array, stripes: jax.Array) -> jax.Array:
    """SDR, feature part: mean over the batch of 1 - <normalize(g), a>."""
    g = l2_normalize(global_features.astype(jnp.float32))
    return jnp.mean(1.0 - jnp.sum(g * part_aggregate(stripes), -1))


def cluster_consistency_loss(
    global_features: jax.Array,
    stripes: jax.Array,
    global_prototypes: jax.Array,
    stripe_prototypes: jax.Array,
    valid: jax.Array,
    temperature: float,
) -> jax.Array:
    """SDR, cluster part: mean over the batch of 0.5 (KL(sg p_g || p_a) +
    KL(sg p_a || p_g)), p_g = softmax(g . C / tau), p_a = softmax(a . A / tau)
    over the valid rows, A[r] = normalize(concat_p stripe_prototypes[p, r]),
    sg = stop-gradient: each branch moves towards the other's assignment."""
    g = l2_normalize(global_features.astype(jnp.float32))
    a = part_aggregate(stripes)
    p, r, _ = stripe_prototypes.shape
    aggregated = l2_normalize(jnp.transpose(stripe_prototypes, (1, 0, 2)).reshape(r, -1))
    logits_g = g @ jax.lax.stop_gradient(global_prototypes).T / temperature
    logits_a = a @ jax.lax.stop_gradient(aggregated).T / temperature
    logits_g = jnp.where(valid[None, :], logits_g, _NEG)
    logits_a = jnp.where(valid[None, :], logits_a, _NEG)
    log_g = jax.nn.log_softmax(logits_g, -1)
    log_a = jax.nn.log_softmax(logits_a, -1)

    def kl(log_target, log_q):  # KL(target || q), the target fixed
        log_target = jax.lax.stop_gradient(log_target)
        terms = jnp.exp(log_target) * (log_target - log_q)
        return jnp.sum(jnp.where(valid[None, :], terms, 0.0), -1)

    return 0.5 * jnp.mean(kl(log_g, log_a) + kl(log_a, log_g))


@dataclasses.dataclass(frozen=True)
class StripeSettings:
    temperature: float
    sdcl_weight: float
    sdr_feature_weight: float
    sdr_cluster_weight: float
    # As the cluster family's setting: the contrasts (ClusterNCE, SDCL) take
    # their negatives from the rows with a member in the sample's camera.
    camera_negatives: bool = False


def stripe_driven_loss(
    outputs: dict[str, jax.Array],
    memory: StripeMemory,
    indices: jax.Array,
    cameras: jax.Array,
    s: StripeSettings,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of a batch (pure; the memory is constant)."""
    clusters = memory.clusters
    targets = clusters.rows[indices]
    g, stripes = outputs["global"], outputs["stripes"]
    rows_used = clusters.valid
    if s.camera_negatives:
        rows_used = clusters.valid[None, :] & same_camera_rows(clusters, cameras)
    cluster = masked_nce(g, clusters.prototypes, rows_used, targets, s.temperature)
    sdcl = stripe_contrast_loss(stripes, memory.stripes, rows_used, targets, s.temperature)
    # Outliers (no row) take part in the feature term: it needs no cluster.
    feature = feature_consistency_loss(g, stripes)
    consistency = cluster_consistency_loss(
        g, stripes, clusters.prototypes, memory.stripes, clusters.valid, s.temperature
    )
    total = (
        cluster
        + s.sdcl_weight * sdcl
        + s.sdr_feature_weight * feature
        + s.sdr_cluster_weight * consistency
    )
    metrics = {
        "loss_cluster": cluster,
        "loss_sdcl": sdcl,
        "loss_sdr_feature": feature,
        "loss_sdr_cluster": consistency,
    }
    return total, metrics


def update_stripe_memory(
    memory: StripeMemory,
    global_features: jax.Array,
    stripes: jax.Array,
    indices: jax.Array,
    *,
    momentum: float,
    mode: str,
) -> StripeMemory:
    """Momentum updates of the global and of every stripe's prototypes by the
    batch (`centroids.update_centroids`); indices of -1 write nothing."""
    clusters = memory.clusters
    targets = jnp.where(indices >= 0, clusters.rows[indices], -1)
    prototypes = update_centroids(
        clusters.prototypes, jax.lax.stop_gradient(global_features), targets, momentum, mode
    )
    per_stripe = jax.vmap(
        lambda table, f: update_centroids(table, f, targets, momentum, mode), in_axes=(0, 1)
    )(memory.stripes, jax.lax.stop_gradient(stripes).astype(jnp.float32))
    return StripeMemory(clusters=clusters.replace(prototypes=prototypes), stripes=per_stripe)


def build_stripe_memory(
    features: dict[str, np.ndarray], cameras: np.ndarray, labels: np.ndarray
) -> StripeMemory:
    clusters = build_memory("cluster_contrast", features["global"], cameras, labels)
    num_rows = int(np.sum(clusters.valid))
    stripes = build_stripe_prototypes(features["stripes"], np.asarray(clusters.rows), num_rows)
    return StripeMemory(clusters=clusters, stripes=stripes)


def sdft_settings() -> dict:
    """Cluster contrast's values (temperature 0.05, momentum 0.1, batch-mean
    updates) and the stripe terms' weights (chosen on the synthetic set, not
    tuned on a test split; see docs/results/cuhk03_adaptation.md)."""
    return dict(
        temperature=0.05,
        momentum=0.1,
        memory_update="mean",  # mean | hard | sequential (methods/centroids.py)
        sdcl_weight=0.5,
        sdr_feature_weight=0.5,
        sdr_cluster_weight=0.5,
        # Contrast each sample only with memory rows of its own camera (besides
        # its positives), as the cluster family's camera_negatives.
        camera_negatives=False,
    )


def sdft_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = cluster_problems(config)
    problems += number_problems(
        config,
        *[
            (f"method.{key}", 0, None, "[)")
            for key in ("sdcl_weight", "sdr_feature_weight", "sdr_cluster_weight")
        ],
    )
    if config.model.head not in ("scl", "fusion"):
        problems.append(
            f"model.head = {config.model.head!r}: method sdft needs the stripe features of "
            "the 'scl' head (or a ViT's 'fusion' head): set --config.model.head=scl"
        )
    return problems


@register("sdft", settings=sdft_settings)
def sdft_method(config: ml_collections.ConfigDict) -> Method:
    """Cluster contrast on the global feature + SDCL + SDR (module docstring)."""
    m = config.method
    settings = StripeSettings(
        temperature=m.temperature,
        sdcl_weight=m.sdcl_weight,
        sdr_feature_weight=m.sdr_feature_weight,
        sdr_cluster_weight=m.sdr_cluster_weight,
        camera_negatives=bool(m.camera_negatives),
    )

    def init_memory(train: TrainSet) -> StripeMemory:
        check_neighbour_sizes(config, train.num_images)
        return build_stripe_memory(
            train.zero_outputs(), train.cameras, np.full(train.num_images, -1)
        )

    def start_epoch(epoch: int, train: TrainSet, memory, resumed: bool) -> EpochPlan:
        if resumed:
            return EpochPlan(sampler_labels=np.asarray(memory.clusters.pseudo_labels))
        extracted: dict[str, np.ndarray] = {}

        def extract_once() -> dict[str, np.ndarray]:
            # recluster extracts the training set; keep its stripes too.
            extracted.update(train.extract())
            return extracted

        _, labels, stats = recluster(
            "cluster_contrast", config, dataclasses.replace(train, extract=extract_once), epoch
        )
        memory = build_stripe_memory(extracted, train.cameras, labels)
        return EpochPlan(
            memory=memory,
            sampler_labels=labels,
            stats={f"cluster/{k}": v for k, v in stats.items()},
            summary=(
                f"epoch {epoch + 1}: eps {stats['eps']:.3f}, {stats['num_clusters']} clusters, "
                f"{100 * stats['outlier_fraction']:.1f}% outliers, largest "
                f"{stats['largest_cluster']} (extract {stats['extract_s']:.1f}s, "
                f"cluster {stats['cluster_s']:.1f}s)"
            ),
            arrays={"pseudo_labels": labels},
        )

    def loss(outputs, memory: StripeMemory, batch: Batch, rng, phase):
        value, metrics = stripe_driven_loss(outputs, memory, batch.indices, batch.cameras, settings)
        return value, None, metrics

    def update(memory: StripeMemory, outputs, batch: Batch, aux, phase):
        return update_stripe_memory(
            memory,
            outputs["global"],
            outputs["stripes"],
            batch.indices,
            momentum=m.momentum,
            mode=m.memory_update,
        )

    return Method(
        "sdft",
        init_memory,
        start_epoch,
        loss,
        update,
        feature_keys=("global", "stripes"),
        problems=sdft_problems,
    )
