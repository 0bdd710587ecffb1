"""MGCE-HCL: hybrid contrast weighted by a multi-granularity clustering ensemble.

After "Hybrid Contrastive Learning with Cluster Ensemble for Unsupervised
Person Re-identification" (Sun, Li, Li, ACPR 2021). Each epoch the training
set is clustered at G granularities: DBSCAN at cluster.eps (the clustering
that trains: memory rows, P x K sampler, camera filter) and at cluster.eps +
each of `method.eps_offsets` (finer ones: negative offsets), all on ONE
sparse Jaccard distance computed once. A pseudo-positive pair (i, j), two
images of one training cluster, gets the co-association count c_ij: how many
of the G clusterings put them in one cluster. Its priority is

    w_ij = c_ij / G  (in [1/G, 1]),   w_ii = 1,

so a pair that only the coarsest clustering joins (the noisy positives of a
too-wide eps) weighs 1/G, one that every granularity agrees on weighs 1.

Loss of sample i (f unit, tau the temperature, P(i) its training cluster's
images, i itself when an outlier; I the instance bank, C the centroids):

    instance   L_ins(i) = -sum_{j in P(i)} w_ij log softmax_j(f . I^T / tau)
                          / sum_{j in P(i)} w_ij
    cluster    L_clu(i) = a_i CE(f . C^T / tau, y_i),  a_i = mean_{j in P(i)} w_ij
    loss = mean_i L_clu(i) + instance_weight * mean_i L_ins(i)

(a_i: how firmly the sample belongs to its cluster). With camera_negatives
the softmaxes keep the rows and instances of the sample's camera besides its
positives, as the other family members do. The memory is the `joint`
member's (centroids + instance bank, jaxreid.methods.cluster) plus the (G, N)
labels of the granularities, from which the step computes the priorities of
its batch (the same counts as `co_association` on the host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxreid.methods import Batch, EpochPlan, Method, TrainSet, register
from jaxreid.methods.cluster import (
    ClusterMemory,
    build_memory,
    check_neighbour_sizes,
    cluster_problems,
    cluster_settings,
    cluster_training_set,
    clustering_summary,
    memory_similarities,
    partial_extraction,
    same_camera_rows,
    update_cluster_memory,
    warn_cpu_bfloat16,
)
from jaxreid.utils import l2_normalize

_NEG = -1e9  # logit of an unused memory row (finite: keeps gradients clean)


class MGCEMemory(struct.PyTreeNode):
    """cluster:        the joint memory of the training labels (centroids +
                       instance bank; jaxreid.methods.cluster.ClusterMemory).
    granularities:  (G, N) int32 labels at each granularity (row 0: the
                    training eps, before the camera filter), -1 outlier."""

    cluster: ClusterMemory
    granularities: jax.Array


# ------------------------------------------------------------- priorities


def co_association(granularities: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(P,) int: for each pair (rows[p], cols[p]), the number of granularities
    (rows of the (G, N) labels) that put both images in one cluster
    (outliers share none)."""
    g = np.asarray(granularities)
    a, b = g[:, np.asarray(rows)], g[:, np.asarray(cols)]
    return np.sum((a == b) & (a >= 0), axis=0)


def positive_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols), rows < cols: every pair of images in one cluster of `labels`."""
    labels = np.asarray(labels)
    rows, cols = [], []
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.diff(sorted_labels, prepend=-2)) if len(labels) else []
    for start, end in zip(starts, [*starts[1:], len(labels)], strict=True):
        if sorted_labels[start] < 0:
            continue
        members = order[start:end]
        i, j = np.triu_indices(len(members), k=1)
        rows.append(members[i])
        cols.append(members[j])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols)


def pair_priorities(
    granularities: jax.Array, labels: jax.Array, indices: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(positive (B, N) bool, weight (B, N) float32) of the batch images
    `indices`: j is a positive of i when both are in one cluster of the
    training `labels` (N,), or j = i; the weight is w_ij = c_ij / G (w_ii =
    1) on positives, 0 elsewhere."""
    own = granularities[:, indices]  # (G, B)
    agree = (own[:, :, None] == granularities[:, None, :]) & (own[:, :, None] >= 0)
    count = jnp.sum(agree, axis=0).astype(jnp.float32)  # (B, N)
    mine = labels[indices]
    columns = jnp.arange(labels.shape[0])[None, :]
    itself = columns == indices[:, None]
    positive = ((labels[None, :] == mine[:, None]) & (mine[:, None] >= 0)) | itself
    weight = jnp.where(itself, 1.0, count / granularities.shape[0])
    return positive, jnp.where(positive, weight, 0.0)


# ------------------------------------------------------------------ loss


def priority_hybrid_loss(
    features: jax.Array,
    memory: MGCEMemory,
    indices: jax.Array,
    cams: jax.Array,
    *,
    temperature: float,
    instance_weight: float,
    camera_negatives: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of the priority-weighted hybrid loss (module doc); pure,
    the memory a constant."""
    m = memory.cluster
    f = l2_normalize(features.astype(jnp.float32))
    positive, weight = pair_priorities(memory.granularities, m.pseudo_labels, indices)
    labels = m.pseudo_labels[indices]
    clustered = labels >= 0
    # Cluster level: CE over the centroids, scaled by the sample's mean priority.
    rows_used = m.valid[None, :]
    if camera_negatives:
        rows_used = rows_used & same_camera_rows(m, cams)
    logits = memory_similarities(f, m.prototypes) / temperature
    logits = jnp.where(rows_used, logits, _NEG)
    target = jnp.maximum(m.rows[indices], 0)
    ce = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, target[:, None], 1)[:, 0]
    firmness = jnp.sum(weight, axis=1) / jnp.maximum(jnp.sum(positive, axis=1), 1)
    used = jnp.maximum(jnp.sum(clustered), 1)
    cluster = jnp.sum(jnp.where(clustered, firmness * ce, 0.0)) / used
    # Instance level: priority-weighted multi-positive NCE over the bank.
    s = memory_similarities(f, m.instances) / temperature
    if camera_negatives:
        s = jnp.where(positive | (m.cameras[None, :] == cams[:, None]), s, _NEG)
    log_p = s - jax.nn.logsumexp(s, axis=1, keepdims=True)
    per_sample = -jnp.sum(weight * log_p, axis=1) / jnp.sum(weight, axis=1)
    instance = jnp.mean(per_sample)
    total = cluster + instance_weight * instance
    metrics = {
        "loss_cluster": cluster,
        "loss_instance": instance,
        "mean_priority": jnp.sum(jnp.where(clustered, firmness, 0.0)) / used,
    }
    return total, metrics


# ---------------------------------------------------------------- method


def mgce_settings() -> dict:
    """The joint member's settings (centroids + instance bank, jaxreid.methods.
    cluster) and the granularities."""
    settings = cluster_settings("joint")
    # Its instance bank stays whole on every device (its loss reads it directly).
    del settings["instance_shards"]
    settings.update(
        instance_weight=1.0,
        # The other granularities: DBSCAN at cluster.eps + each offset (finer
        # when negative; a coarser one agrees with every training pair).
        eps_offsets=(-0.05, -0.1),
    )
    return settings


def mgce_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = cluster_problems(config)
    if config.cluster.get("algorithm", "dbscan") != "dbscan":
        problems.append(
            f"cluster.algorithm = {config.cluster.algorithm!r}: mgce clusters with DBSCAN at "
            "several eps values; set cluster.algorithm = 'dbscan'"
        )
    offsets = config.method.eps_offsets
    if not isinstance(offsets, (tuple, list)) or not offsets:
        return [
            *problems,
            f"method.eps_offsets = {offsets!r}: must be a non-empty tuple of numbers "
            "(e.g. (-0.05, -0.1): DBSCAN also at cluster.eps - 0.05 and - 0.1)",
        ]
    eps = config.cluster.eps
    lowest = min(eps, config.cluster.get("final_eps", 0.0) or eps)
    for offset in offsets:
        if isinstance(offset, bool) or not isinstance(offset, (int, float)):
            problems.append(f"method.eps_offsets = {offsets!r}: {offset!r} is not a number")
        elif not 0 < lowest + offset <= 1 or offset == 0:
            problems.append(
                f"method.eps_offsets = {offsets!r}: cluster.eps ({lowest:g} at its lowest) + "
                f"{offset:g} must be in (0, 1] and differ from it; use offsets such as "
                "-0.05, -0.1 (finer granularities)"
            )
    return problems


@register("mgce", settings=mgce_settings)
def mgce_method(config: ml_collections.ConfigDict) -> Method:
    m = config.method
    offsets = tuple(float(o) for o in m.eps_offsets)
    num_granularities = 1 + len(offsets)
    layout, dtype = m.prototype_table, m.memory_dtype

    def init_memory(train: TrainSet) -> MGCEMemory:
        check_neighbour_sizes(config, train.num_images)  # before any work
        warn_cpu_bfloat16(dtype)
        dim = train.output_shapes["global"]
        placeholder = np.zeros((train.num_images, *dim), np.float32)
        unlabelled = np.full(train.num_images, -1)
        return MGCEMemory(
            cluster=build_memory("joint", placeholder, train.cameras, unlabelled, layout, dtype),
            granularities=np.full((num_granularities, train.num_images), -1, np.int32),
        )

    def start_epoch(epoch: int, train: TrainSet, memory, resumed: bool) -> EpochPlan:
        if resumed:  # the checkpoint's memory holds this epoch's clustering
            return EpochPlan(sampler_labels=np.asarray(memory.cluster.pseudo_labels))
        train, extraction = partial_extraction(
            train, memory.cluster, float(m.extract_fraction), seed=config.seed, epoch=epoch
        )
        result = cluster_training_set(config, train, epoch, offsets)
        result.stats.update(extraction)
        memory = MGCEMemory(
            cluster=build_memory(
                "joint", result.features, train.cameras, result.labels, layout, dtype
            ),
            granularities=result.granularities.astype(np.int32),
        )
        stats, line = ensemble_stats(result.granularities, result.labels, result.eps_values)
        return EpochPlan(
            memory=memory,
            sampler_labels=result.labels,
            stats={
                **{f"cluster/{k}": v for k, v in result.stats.items()},
                **{f"mgce/{k}": v for k, v in stats.items()},
            },
            summary=f"{clustering_summary(epoch, result.stats)}; {line}",
            arrays={"pseudo_labels": result.labels, "granularities": result.granularities},
        )

    def loss(outputs, memory: MGCEMemory, batch: Batch, rng, phase):
        value, metrics = priority_hybrid_loss(
            outputs["global"],
            memory,
            batch.indices,
            batch.cameras,
            temperature=m.temperature,
            instance_weight=m.instance_weight,
            camera_negatives=m.camera_negatives,
        )
        return value, None, metrics

    def update(memory: MGCEMemory, outputs, batch: Batch, aux, phase):
        cluster = update_cluster_memory(
            "joint",
            memory.cluster,
            outputs["global"],
            batch.indices,
            momentum=m.momentum,
            mode=m.memory_update,
            instance_momentum=m.instance_momentum,
        )
        return memory.replace(cluster=cluster)

    return Method(
        "mgce",
        init_memory,
        start_epoch,
        loss,
        update,
        feature_keys=("global",),
        problems=mgce_problems,
    )


def ensemble_stats(
    granularities: np.ndarray, labels: np.ndarray, eps_values: tuple[float, ...]
) -> tuple[dict[str, float], str]:
    """The epoch's log of the ensemble: clusters at each granularity, and how
    the priorities of the training positive pairs (i < j) are distributed
    (the fraction at each count c of G, and their mean)."""
    from jaxreid.pseudo_labels.clustering import pseudo_label_stats

    g = len(granularities)
    stats: dict[str, float] = {}
    parts = []
    for index, (eps, row) in enumerate(zip(eps_values, granularities, strict=True)):
        clusters = pseudo_label_stats(row)["num_clusters"]
        stats[f"eps_{index}"] = eps
        stats[f"clusters_{index}"] = clusters
        parts.append(f"eps {eps:.3f}: {clusters}")
    counts = co_association(granularities, *positive_pairs(labels))
    histogram = np.bincount(counts, minlength=g + 1)[1:] / max(len(counts), 1)
    for c, fraction in enumerate(histogram, start=1):
        stats[f"pairs_priority_{c}of{g}"] = float(fraction)
    stats["positive_pairs"] = len(counts)
    stats["mean_pair_priority"] = float(np.mean(counts) / g) if len(counts) else 0.0
    spread = ", ".join(f"{c}/{g}: {100 * f:.0f}%" for c, f in enumerate(histogram, start=1))
    line = (
        f"clusters per granularity ({', '.join(parts)}); priorities of {len(counts)} "
        f"positive pairs {spread} (mean {stats['mean_pair_priority']:.2f})"
    )
    return stats, line
