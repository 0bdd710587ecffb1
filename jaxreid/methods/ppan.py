"""PPAN, part-aware progressive adaptation, on a labelled source beside the
unlabelled target (data.source_root). The branches are the stripe head's
(model.head 'scl'): the whole body ("global") and each horizontal part
("stripes"). In every branch b:

    classification  CE(f_i^b . C_b^T / tau, y_i) on the source rows against
                    momentum centroids C_b of the source identities, each
                    row weighted by its identity's progressive weight
    alignment       MMD (or CORAL) between the branch's source and target
                    features of the batch: the branch's own UDA constraint

    loss = mean_b classification_b + alignment_weight * mean_b alignment_b

Progressive adaptation: at every epoch start each source identity's weight
is 1 - alpha + alpha * w_c (domain_losses.source_identity_weights), w_c its
whole-body centroid's similarity to its nearest target image scaled to
[0, 1]; alpha rises from 0 at the first epoch to `final_alpha` at the last,
so source identities with no counterpart in the target count less and less.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxreid.methods import SOURCE_DOMAIN, Batch, EpochPlan, Method, TrainSet, register
from jaxreid.methods.centroids import update_centroids
from jaxreid.methods.domain_losses import (
    coral,
    mmd,
    progress,
    source_identity_weights,
    weighted_cross_entropy,
)
from jaxreid.methods.sal import source_labels
from jaxreid.utils import l2_normalize
from jaxreid.validate import choice_problems, number_problems

ALIGNMENTS = {"mmd": mmd, "coral": coral}


class PartMemory(struct.PyTreeNode):
    """labels:    (N,) source identity 0..C-1 (source rows), -1 on target rows.
    global_centroids: (C, D) unit momentum centroids of the whole-body branch.
    stripe_centroids: (P, C, d) the same of each part branch.
    weights:      (C,) the identities' progressive weights."""

    labels: jax.Array
    global_centroids: jax.Array
    stripe_centroids: jax.Array
    weights: jax.Array


def identity_centroids(features: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """(C, ...) unit means of the unit features of each identity (host)."""
    flat = l2_normalize(np.asarray(features, np.float64), axis=-1).reshape(len(labels), -1)
    shape = features.shape[1:]
    sums = np.zeros((classes, flat.shape[1]))
    np.add.at(sums, labels, flat)
    return l2_normalize(sums.reshape(classes, *shape), axis=-1).astype(np.float32)


def ppan_settings() -> dict:
    return dict(
        temperature=0.05,
        momentum=0.2,
        alignment="mmd",
        alignment_weight=1.0,
        final_alpha=1.0,
        weight_floor=0.1,
    )


def ppan_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = []
    if config.model.head != "scl":
        problems.append(
            f"model.head = {config.model.head!r}: ppan's part branches are the stripe "
            "head's; set model.head='scl' (with model.num_stripes)"
        )
    return (
        problems
        + choice_problems(config, ("method.alignment", tuple(ALIGNMENTS)))
        + number_problems(
            config,
            ("method.temperature", 0, None, "()", "0.05 is usual"),
            ("method.momentum", 0, 1, "[)", "0.2 is usual"),
            ("method.alignment_weight", 0, None, "[)"),
            ("method.final_alpha", 0, 1, "[]", "1 = fully re-weighted at the last epoch"),
            ("method.weight_floor", 0, 1, "[]", "the least weight of a source identity"),
        )
    )


@register("ppan", settings=ppan_settings)
def ppan_method(config: ml_collections.ConfigDict) -> Method:
    m = config.method
    align = ALIGNMENTS.get(m.alignment, mmd)

    def init_memory(train: TrainSet) -> PartMemory:
        labels = source_labels(train)
        rows = train.source_rows
        classes = int(labels.max()) + 1
        # The source's identity centroids from the source model, once; the
        # momentum updates keep them after.
        outputs = train.extract(rows)
        return PartMemory(
            labels=labels,
            global_centroids=identity_centroids(outputs["global"], labels[rows], classes),
            stripe_centroids=np.swapaxes(
                identity_centroids(outputs["stripes"], labels[rows], classes), 0, 1
            ).copy(),
            weights=np.ones(classes, np.float32),
        )

    def start_epoch(epoch: int, train: TrainSet, memory: PartMemory, resumed: bool):
        if resumed:  # the checkpoint's memory holds this epoch's weights
            return EpochPlan(sampler_labels=np.asarray(memory.labels))
        alpha = m.final_alpha * progress(epoch, config.train.epochs)
        target = train.extract(train.target_rows)["global"]
        weights = source_identity_weights(
            np.asarray(memory.global_centroids), target, alpha, m.weight_floor
        )
        host = jax.tree.map(np.asarray, memory)
        stats = {
            "alpha": alpha,
            "weight_min": float(weights.min()),
            "weight_mean": float(weights.mean()),
        }
        return EpochPlan(
            memory=host.replace(weights=weights),
            sampler_labels=np.asarray(memory.labels),
            stats={f"ppan/{k}": v for k, v in stats.items()},
            summary=(
                f"epoch {epoch + 1}: source identity weights alpha {alpha:.2f}, min "
                f"{weights.min():.2f}, mean {weights.mean():.2f}"
            ),
        )

    def loss(outputs, memory: PartMemory, batch: Batch, rng, phase):
        is_source = batch.domains == SOURCE_DOMAIN
        labels = jnp.where(is_source, memory.labels[batch.indices], -1)
        branches = [(outputs["global"], memory.global_centroids)] + [
            (outputs["stripes"][:, p], memory.stripe_centroids[p])
            for p in range(outputs["stripes"].shape[1])
        ]
        ce, aligned = [], []
        for features, centroids in branches:
            f = l2_normalize(features.astype(jnp.float32))
            logits = f @ centroids.T / m.temperature
            ce.append(weighted_cross_entropy(logits, labels, memory.weights, 0.0))
            aligned.append(align(features, is_source))
        ce, aligned = sum(ce) / len(ce), sum(aligned) / len(aligned)
        value = ce + m.alignment_weight * aligned
        return value, None, {"loss_source_id": ce, f"loss_{m.alignment}": aligned}

    def update(memory: PartMemory, outputs, batch: Batch, aux, phase):
        labels = memory.labels[jnp.maximum(batch.indices, 0)]
        rows = jnp.where((batch.indices >= 0) & (batch.domains == SOURCE_DOMAIN), labels, -1)
        global_centroids = update_centroids(
            memory.global_centroids, outputs["global"], rows, m.momentum, "mean"
        )
        stripe_centroids = jnp.stack(
            [
                update_centroids(c, outputs["stripes"][:, p], rows, m.momentum, "mean")
                for p, c in enumerate(memory.stripe_centroids)
            ]
        )
        return memory.replace(global_centroids=global_centroids, stripe_centroids=stripe_centroids)

    return Method(
        "ppan",
        init_memory,
        start_epoch,
        loss,
        update,
        feature_keys=("global", "stripes"),
        problems=ppan_problems,
        two_domain=True,
    )
