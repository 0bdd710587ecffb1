"""Supervised reference losses (the BoT baseline): identity cross-entropy with
label smoothing on the BN-neck classifier + batch-hard triplet on the pre-BN
feature. Used as the upper bound of the unsupervised methods; identity labels
are read only by this method.

    CE_ls(z, y)   = -sum_c q_c log softmax(z)_c,  q = (1 - eps) onehot(y) + eps / C
    triplet_i     = max(0, max_{j: y_j = y_i} d_ij - min_{j: y_j != y_i} d_ij + margin)
    d_ij          = ||f_i - f_j||_2 (Euclidean, pre-BN features)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxreid.methods import (
    Batch,
    EpochPlan,
    Method,
    TrainSet,
    no_update,
    pk_sampler_problems,
    register,
)
from jaxreid.validate import number_problems


class SupervisedMemory(struct.PyTreeNode):
    """Not a memory bank: the identity labels (0..C-1) and cameras of the
    training images, carried in the state so the step can index them."""

    labels: jax.Array
    cameras: jax.Array


def relabel(pids: np.ndarray) -> np.ndarray:
    """Identity ids -> 0..C-1 (sorted order), int32."""
    return np.unique(np.asarray(pids), return_inverse=True)[1].astype(np.int32)


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Mean over the batch of CE against (1 - eps) onehot + eps / C."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    num_classes = logits.shape[-1]
    target = jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes
    return jnp.mean(-jnp.sum(target * log_p, axis=-1))


def pairwise_euclidean(x: jax.Array) -> jax.Array:
    sq = jnp.sum(jnp.square(x), axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    # Clamped before the square root: its gradient at 0 is infinite.
    return jnp.sqrt(jnp.maximum(d2, 1e-12))


def batch_hard_triplet(features: jax.Array, labels: jax.Array, margin: float) -> jax.Array:
    """Mean over anchors with a positive and a negative in the batch."""
    d = pairwise_euclidean(features.astype(jnp.float32))
    same = labels[:, None] == labels[None, :]
    eye = jnp.eye(len(labels), dtype=bool)
    positive, negative = same & ~eye, ~same
    hardest_pos = jnp.max(jnp.where(positive, d, -jnp.inf), axis=1)
    hardest_neg = jnp.min(jnp.where(negative, d, jnp.inf), axis=1)
    use = jnp.any(positive, 1) & jnp.any(negative, 1)
    gap = jnp.where(use, hardest_pos - hardest_neg + margin, 0.0)
    return jnp.sum(jnp.maximum(gap, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def supervised_settings() -> dict:
    return dict(label_smoothing=0.1, triplet_margin=0.3, triplet_weight=1.0)


def supervised_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = pk_sampler_problems(config)
    problems += number_problems(
        config,
        ("method.label_smoothing", 0, 1, "[)", "0.1 is usual"),
        ("method.triplet_margin", 0, None, "[)", "0.3 is usual"),
        ("method.triplet_weight", 0, None, "[)"),
    )
    if config.data.dataset == "folder":
        problems.append(
            "method.name = 'supervised': needs identity labels, and dataset 'folder' has none; "
            "train an unsupervised method, or use a labelled layout"
        )
    return problems


@register("supervised", settings=supervised_settings)
def supervised_method(config: ml_collections.ConfigDict) -> Method:
    """Supervised upper bound: smoothed identity CE on the classifier + batch-hard
    triplet on the pre-BN feature, P x K over the true identities."""
    m = config.method

    def init_memory(train: TrainSet) -> SupervisedMemory:
        return SupervisedMemory(
            labels=relabel(train.identities), cameras=np.asarray(train.cameras, np.int32)
        )

    def start_epoch(epoch: int, train: TrainSet, memory: SupervisedMemory, resumed: bool):
        # One (N,) leaf leaves the device, not the whole memory.
        return EpochPlan(sampler_labels=np.asarray(memory.labels))

    def loss(outputs, memory: SupervisedMemory, batch: Batch, rng, phase):
        if "logits" not in outputs:
            raise ValueError(
                "method 'supervised' needs a classifier: model.head = 'bnneck' or 'fc'"
            )
        labels = memory.labels[batch.indices]
        ce = smoothed_cross_entropy(outputs["logits"], labels, m.label_smoothing)
        triplet = batch_hard_triplet(outputs["pre_bn"], labels, m.triplet_margin)
        return ce + m.triplet_weight * triplet, None, {"loss_id": ce, "loss_triplet": triplet}

    def configure(config: ml_collections.ConfigDict, identities: np.ndarray):
        # The classifier gets one output per training identity (a copy).
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.num_classes = len(np.unique(identities))
        return config

    return Method(
        "supervised",
        init_memory,
        start_epoch,
        loss,
        no_update,
        configure=configure,
        problems=supervised_problems,
    )
