"""SAL, self-supervised agent learning, on a labelled source beside the
unlabelled target (data.source_root). The agents are the source
classifier's weights, one per source identity (model.head 'fc' or 'bnneck'
with the classifier sized by `configure`). Three terms, learned jointly:

    supervised   CE_ls(z_i, y_i) + triplet on the source rows
    consistency  KL(q_i || softmax(z_i / tau_a)) on the target rows: q_i the
                 image's agent similarity at its last visit (a momentum
                 record in the memory), so a target image keeps its relation
                 to the source identities across augmentations and steps
    self-sup.    instance NCE of every image (both domains) against a
                 momentum memory of all images' features (its own row the
                 positive, every other image a negative)

    loss = supervised + consistency_weight * consistency
           + instance_weight * instance NCE
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
    register,
)
from jaxreid.methods.centroids import update_centroids
from jaxreid.methods.domain_losses import (
    agent_consistency,
    cross_domain_triplet,
    masked_cross_entropy,
)
from jaxreid.utils import l2_normalize
from jaxreid.validate import number_problems


class AgentMemory(struct.PyTreeNode):
    """labels:    (N,) source identity 0..C-1 of each source row, -1 on target rows.
    instances:    (N, D) unit momentum features of every image.
    agent_logits: (N, C) momentum record of each image's logits over the agents.
    visited:      (N,) bool, the image has a record (consistency starts then)."""

    labels: jax.Array
    instances: jax.Array
    agent_logits: jax.Array
    visited: jax.Array


def source_labels(train: TrainSet) -> np.ndarray:
    """(N,) int32: 0..C-1 over the source's identities, -1 on target rows."""
    labels = np.full(train.num_images, -1, np.int32)
    rows = train.source_rows
    labels[rows] = np.unique(train.identities[rows], return_inverse=True)[1]
    return labels


def configure_source_classifier(config: ml_collections.ConfigDict, identities: np.ndarray):
    """The classifier gets one output per source identity (target rows are -1)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_classes = len(np.unique(identities[identities >= 0]))
    return config


def classifier_problems(config: ml_collections.ConfigDict) -> list[str]:
    if config.model.head not in ("fc", "bnneck"):
        return [
            f"model.head = {config.model.head!r}: method {config.method.name!r} trains the "
            "source classifier; choose head 'fc' or 'bnneck'"
        ]
    return []


def sal_settings() -> dict:
    return dict(
        label_smoothing=0.1,
        triplet_margin=0.3,
        triplet_weight=1.0,
        agent_temperature=1.0,
        consistency_weight=1.0,
        instance_temperature=0.05,
        instance_weight=0.5,
        instance_momentum=0.2,
    )


def sal_problems(config: ml_collections.ConfigDict) -> list[str]:
    return classifier_problems(config) + number_problems(
        config,
        ("method.label_smoothing", 0, 1, "[)", "0.1 is usual"),
        ("method.triplet_margin", 0, None, "[)", "0.3 is usual"),
        ("method.triplet_weight", 0, None, "[)"),
        ("method.agent_temperature", 0, None, "()", "1.0 = the logits as they are"),
        ("method.consistency_weight", 0, None, "[)"),
        ("method.instance_temperature", 0, None, "()", "0.05 is usual"),
        ("method.instance_weight", 0, None, "[)"),
        ("method.instance_momentum", 0, 1, "[)", "0.2 is usual"),
    )


@register("sal", settings=sal_settings)
def sal_method(config: ml_collections.ConfigDict) -> Method:
    m = config.method

    def init_memory(train: TrainSet) -> AgentMemory:
        # Every image's feature, once: the instance memory starts from the
        # source model, not from zeros (a random bank erases its features).
        features = l2_normalize(np.asarray(train.extract()["global"], np.float32))
        classes = len(np.unique(train.identities[train.source_rows]))
        return AgentMemory(
            labels=source_labels(train),
            instances=features,
            agent_logits=np.zeros((train.num_images, classes), np.float32),
            visited=np.zeros(train.num_images, bool),
        )

    def start_epoch(epoch: int, train: TrainSet, memory: AgentMemory, resumed: bool):
        # The source rows P x K by identity, the target a shuffle.
        return EpochPlan(sampler_labels=np.asarray(memory.labels))

    def loss(outputs, memory: AgentMemory, batch: Batch, rng, phase):
        is_source = batch.domains == SOURCE_DOMAIN
        labels = jnp.where(is_source, memory.labels[batch.indices], -1)
        supervised = masked_cross_entropy(outputs["logits"], labels, m.label_smoothing)
        triplet = cross_domain_triplet(outputs["pre_bn"], labels, batch.domains, m.triplet_margin)
        on_target = (batch.domains == TARGET_DOMAIN) & memory.visited[batch.indices]
        consistency = agent_consistency(
            outputs["logits"],
            memory.agent_logits[batch.indices],
            m.agent_temperature,
            on_target,
        )
        f = l2_normalize(outputs["global"].astype(jnp.float32))
        logits = f @ memory.instances.T / m.instance_temperature
        log_p = jax.nn.log_softmax(logits, axis=-1)
        instance = -jnp.mean(jnp.take_along_axis(log_p, batch.indices[:, None], axis=1))
        value = (
            supervised
            + m.triplet_weight * triplet
            + m.consistency_weight * consistency
            + m.instance_weight * instance
        )
        metrics = {
            "loss_source_id": supervised,
            "loss_triplet": triplet,
            "loss_consistency": consistency,
            "loss_instance": instance,
        }
        return value, None, metrics

    def update(memory: AgentMemory, outputs, batch: Batch, aux, phase):
        write = batch.indices >= 0
        instances = update_centroids(
            memory.instances, outputs["global"], batch.indices, m.instance_momentum, "mean"
        )
        # The agent record of the target rows: the first visit sets it, later
        # ones move it by momentum. Target rows come from a shuffle, so no
        # row is written twice in a batch (the scatter order never matters).
        write = write & (batch.domains == TARGET_DOMAIN)
        rows = jnp.where(write, batch.indices, 0)
        old = memory.agent_logits[rows]
        new = outputs["logits"].astype(jnp.float32)
        keep = m.instance_momentum
        mixed = jnp.where(memory.visited[rows][:, None], keep * old + (1 - keep) * new, new)
        target = jnp.where(write, batch.indices, memory.agent_logits.shape[0])
        agent_logits = memory.agent_logits.at[target].set(mixed, mode="drop")
        visited = memory.visited.at[target].set(True, mode="drop")
        return memory.replace(instances=instances, agent_logits=agent_logits, visited=visited)

    return Method(
        "sal",
        init_memory,
        start_epoch,
        loss,
        update,
        feature_keys=("global", "logits"),
        configure=configure_source_classifier,
        problems=sal_problems,
        two_domain=True,
    )
