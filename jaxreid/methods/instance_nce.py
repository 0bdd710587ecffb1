"""Instance discrimination (the worked example of docs/new_method.md): every
training image is its own class, contrasted with InfoNCE against a momentum
memory of all images' features.

    loss_i = -log softmax_i(f_i . M^T / temperature)       (f_i unit-norm)
    M[i]  <- normalize(m M[i] + (1 - m) f_i)               after the step
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from jaxreid.methods import Batch, Method, TrainSet, keep_memory, register
from jaxreid.methods.centroids import update_centroids
from jaxreid.utils import l2_normalize
from jaxreid.validate import number_problems


class InstanceMemory(struct.PyTreeNode):
    features: jax.Array  # (N, D) unit rows, one per training image


def instance_nce_settings() -> dict:
    return dict(temperature=0.1, instance_momentum=0.2)


@register("instance_nce", settings=instance_nce_settings)
def instance_nce_method(config: ml_collections.ConfigDict) -> Method:
    m = config.method

    def init_memory(train: TrainSet) -> InstanceMemory:
        features = train.extract()["global"]
        return InstanceMemory(features=l2_normalize(jnp.asarray(features, jnp.float32)))

    def loss(outputs, memory: InstanceMemory, batch: Batch, rng, phase):
        f = l2_normalize(outputs["global"].astype(jnp.float32))
        logits = f @ memory.features.T / m.temperature
        log_p = jax.nn.log_softmax(logits, axis=-1)
        value = -jnp.mean(jnp.take_along_axis(log_p, batch.indices[:, None], axis=1))
        return value, None, {}

    def update(memory: InstanceMemory, outputs, batch: Batch, aux, phase):
        # Negative indices (a non-finite step) write nothing; repeats are averaged.
        features = update_centroids(
            memory.features, outputs["global"], batch.indices, m.instance_momentum, "mean"
        )
        return memory.replace(features=features)

    return Method(
        "instance_nce",
        init_memory,
        keep_memory,
        loss,
        update,
        feature_keys=("global",),
        problems=instance_nce_problems,
    )


def instance_nce_problems(config: ml_collections.ConfigDict) -> list[str]:
    return number_problems(
        config,
        ("method.temperature", 0, None, "()", "0.1 is usual"),
        ("method.instance_momentum", 0, 1, "[]", "the old row's weight"),
    )
