"""CLC, classification and latent commonality, on a labelled source beside
the unlabelled target (data.source_root).

At every epoch start the current model (the "imitate model") extracts the
target and clusters it (the family's Jaccard + DBSCAN): the imitated target
domain, one pseudo-identity per cluster. The same features give the pseudo
target domain's pairwise labels: each target image and its mutual nearest
neighbour among the other cameras' images. Per step, on a batch of source
P x K and target P x K over the clusters:

    dual classification  CE_ls(z_i, y_i) on the source rows (the trained
                         classifier) + CE(f_i . C^T / tau, c_i) on the target
                         rows against the momentum centroids of the clusters
    triplets             batch-hard over both domains (a positive shares
                         the sample's domain and (pseudo-)identity)
    pairwise             -log softmax(f_i . M^T / tau)_{partner(i)} of the
                         target rows with a cross-camera partner, against
                         the epoch's target features M

    loss = dual + triplet_weight * triplets + pair_weight * pairwise
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxreid.methods import (
    SOURCE_DOMAIN,
    TARGET_DOMAIN,
    Batch,
    EpochPlan,
    Method,
    TrainSet,
    pk_sampler_problems,
    register,
)
from jaxreid.methods.centroids import update_centroids
from jaxreid.methods.cluster import (
    _NEG,
    check_neighbour_sizes,
    cluster_training_set,
    clustering_summary,
)
from jaxreid.methods.domain_losses import cross_domain_triplet, dual_classification
from jaxreid.methods.sal import classifier_problems, configure_source_classifier, source_labels
from jaxreid.utils import l2_normalize
from jaxreid.validate import number_problems


class CommonalityMemory(struct.PyTreeNode):
    """labels:     (N,) source identity (source rows) or cluster (target rows), -1 none.
    centroids:     (N_t, D) unit momentum centroids of the target clusters
                   (the first `num_clusters` rows valid).
    valid:         (N_t,) bool.
    features:      (N_t, D) the epoch's target features (the pairwise term's memory).
    partner:       (N,) int32 cross-camera partner row of each target row, -1 none."""

    labels: jax.Array
    centroids: jax.Array
    valid: jax.Array
    features: jax.Array
    partner: jax.Array


def target_view(train: TrainSet) -> TrainSet:
    """The target rows as a one-domain training set (rows 0..N_t-1, as the
    two-domain set orders them): what the family's clustering reads."""
    rows = train.target_rows
    return TrainSet(
        cameras=train.cameras[rows],
        identities=np.full(len(rows), -1, np.int32),
        extract=lambda: train.extract(rows),
        output_shapes=train.output_shapes,
    )


def cross_camera_partners(
    features: np.ndarray, cameras: np.ndarray, block: int = 4096
) -> np.ndarray:
    """(N,) int32: for each image its mutual nearest neighbour among the
    images of the other cameras (cosine), -1 when the nearest one's own
    nearest other-camera image is someone else."""
    f = l2_normalize(np.asarray(features, np.float32))
    cameras = np.asarray(cameras)
    n = len(f)
    nearest = np.full(n, -1, np.int64)
    for start in range(0, n, block):
        sim = f[start : start + block] @ f.T
        sim[cameras[start : start + block, None] == cameras[None, :]] = -np.inf
        best = sim.argmax(axis=1)
        found = np.isfinite(sim[np.arange(len(best)), best])
        nearest[start : start + block] = np.where(found, best, -1)
    has = nearest >= 0
    mutual = has & (nearest[np.maximum(nearest, 0)] == np.arange(n))
    return np.where(mutual, nearest, -1).astype(np.int32)


def clc_settings() -> dict:
    return dict(
        label_smoothing=0.1,
        temperature=0.05,
        momentum=0.2,
        triplet_margin=0.3,
        triplet_weight=1.0,
        pair_weight=0.5,
    )


def clc_problems(config: ml_collections.ConfigDict) -> list[str]:
    return (
        classifier_problems(config)
        + pk_sampler_problems(config)
        + number_problems(
            config,
            ("method.label_smoothing", 0, 1, "[)", "0.1 is usual"),
            ("method.temperature", 0, None, "()", "0.05 is usual"),
            ("method.momentum", 0, 1, "[)", "0.2 is usual"),
            ("method.triplet_margin", 0, None, "[)", "0.3 is usual"),
            ("method.triplet_weight", 0, None, "[)"),
            ("method.pair_weight", 0, None, "[)"),
        )
    )


@register("clc", settings=clc_settings)
def clc_method(config: ml_collections.ConfigDict) -> Method:
    m = config.method

    def init_memory(train: TrainSet) -> CommonalityMemory:
        check_neighbour_sizes(config, len(train.target_rows))
        n_t, dim = len(train.target_rows), train.output_shapes["global"]
        return CommonalityMemory(
            labels=source_labels(train),
            centroids=np.zeros((n_t, *dim), np.float32),
            valid=np.zeros(n_t, bool),
            features=np.zeros((n_t, *dim), np.float32),
            partner=np.full(train.num_images, -1, np.int32),
        )

    def start_epoch(epoch: int, train: TrainSet, memory: CommonalityMemory, resumed: bool):
        if resumed:  # the checkpoint's memory holds this epoch's clustering
            return EpochPlan(sampler_labels=np.asarray(memory.labels))
        target = target_view(train)
        result = cluster_training_set(config, target, epoch)
        rows = train.target_rows
        labels = source_labels(train)
        labels[rows] = result.labels
        features = l2_normalize(np.asarray(result.features, np.float32))
        num = int(result.labels.max(initial=-1)) + 1
        centroids = np.zeros_like(features)
        clustered = result.labels >= 0
        sums = np.zeros((num, features.shape[1]), np.float64)
        np.add.at(sums, result.labels[clustered], features[clustered])
        centroids[:num] = l2_normalize(sums)
        partner = np.full(train.num_images, -1, np.int32)
        partner[rows] = cross_camera_partners(features, target.cameras)
        stats = {**result.stats, "pair_fraction": float(np.mean(partner[rows] >= 0))}
        memory = CommonalityMemory(
            labels=labels,
            centroids=centroids,
            valid=np.arange(len(rows)) < num,
            features=features,
            partner=partner,
        )
        return EpochPlan(
            memory=memory,
            sampler_labels=labels,
            stats={f"cluster/{k}": v for k, v in stats.items()},
            summary=clustering_summary(epoch, result.stats)
            + f"; {100 * stats['pair_fraction']:.1f}% of the target paired across cameras",
            arrays={"pseudo_labels": result.labels},
        )

    def loss(outputs, memory: CommonalityMemory, batch: Batch, rng, phase):
        is_target = batch.domains == TARGET_DOMAIN
        labels = memory.labels[batch.indices]
        source = jnp.where(batch.domains == SOURCE_DOMAIN, labels, -1)
        clusters = jnp.where(is_target, labels, -1)
        f = l2_normalize(outputs["global"].astype(jnp.float32))
        target_logits = f @ memory.centroids.T / m.temperature
        target_logits = jnp.where(memory.valid, target_logits, _NEG)
        source_ce, target_ce = dual_classification(
            outputs["logits"], source, target_logits, clusters, m.label_smoothing
        )
        triplet = cross_domain_triplet(outputs["pre_bn"], labels, batch.domains, m.triplet_margin)
        partner = jnp.where(is_target, memory.partner[batch.indices], -1)
        pair_logits = f @ memory.features.T / m.temperature
        log_p = jax.nn.log_softmax(pair_logits, axis=-1)
        picked = jnp.take_along_axis(log_p, jnp.maximum(partner, 0)[:, None], axis=1)[:, 0]
        has = partner >= 0
        pair = -jnp.sum(jnp.where(has, picked, 0.0)) / jnp.maximum(jnp.sum(has), 1)
        value = source_ce + target_ce + m.triplet_weight * triplet + m.pair_weight * pair
        metrics = {
            "loss_source_id": source_ce,
            "loss_target_id": target_ce,
            "loss_triplet": triplet,
            "loss_pair": pair,
        }
        return value, None, metrics

    def update(memory: CommonalityMemory, outputs, batch: Batch, aux, phase):
        # Target rows pull their cluster's centroid; source rows write nothing.
        labels = memory.labels[jnp.maximum(batch.indices, 0)]
        rows = jnp.where(
            (batch.indices >= 0) & (batch.domains == TARGET_DOMAIN) & (labels >= 0), labels, -1
        )
        centroids = update_centroids(memory.centroids, outputs["global"], rows, m.momentum, "mean")
        return memory.replace(centroids=centroids)

    return Method(
        "clc",
        init_memory,
        start_epoch,
        loss,
        update,
        feature_keys=("global",),
        configure=configure_source_classifier,
        problems=clc_problems,
        two_domain=True,
    )
