"""Multiple camera styles learning (MCSL) for any method: the loss on the
re-styled copies and a style-invariance term (the re-styling itself:
jaxreid/models/camera_style.py, switched on by `model.camera_style.styles`).

With K target styles per image the model returns, in training, every output
k of the originals and "styled/k" (K, B, ...) of the copies. The wrapped loss:

    loss = L(outputs) + styled_weight * mean_k L(styled outputs k)
           + invariance_weight * mean_k mean_i (1 - cos(g^k_i, stop_grad(g_i)))

L the method's own loss (its memory, batch and phase unchanged; its aux and
memory update from the originals only), g the global features. The method
learns a copy in another camera's style as the same pseudo-identity, and the
invariance term pulls each copy's feature to its original's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxreid.methods import Batch, Method, TrainSet
from jaxreid.models.camera_style import STYLED
from jaxreid.utils import UserError, l2_normalize


def invariance_loss(original: jax.Array, styled: jax.Array) -> jax.Array:
    """mean over (K, B) of 1 - cos(styled[k, i], original[i]), the original a
    constant (the copy moves towards it, not the other way)."""
    target = jax.lax.stop_gradient(l2_normalize(original.astype(jnp.float32)))
    copies = l2_normalize(styled.astype(jnp.float32))
    return jnp.mean(1.0 - jnp.sum(copies * target[None], axis=-1))


def with_camera_style(method: Method, config: ml_collections.ConfigDict) -> Method:
    """`method` trained on the original and re-styled copies (module doc)."""
    style = config.model.camera_style
    styles = int(style.styles)

    def init_memory(train: TrainSet):
        largest = int(np.max(train.cameras, initial=0))
        if largest >= style.num_cameras:
            raise UserError(
                f"model.camera_style.num_cameras = {style.num_cameras}: the training set has "
                f"camera ids up to {largest}; set it to at least {largest + 1}"
            )
        return method.init_memory(train)

    def loss(outputs, memory, batch: Batch, rng, phase):
        original = {k: v for k, v in outputs.items() if not k.startswith(STYLED)}
        value, aux, metrics = method.loss(original, memory, batch, rng, phase)
        styled = {k[len(STYLED) :]: v for k, v in outputs.items() if k.startswith(STYLED)}
        copy_losses = [
            method.loss({k: v[i] for k, v in styled.items()}, memory, batch, rng, phase)[0]
            for i in range(styles)
        ]
        styled_loss = sum(copy_losses) / styles
        invariance = invariance_loss(original["global"], styled["global"])
        total = value + style.styled_weight * styled_loss + style.invariance_weight * invariance
        metrics = {**metrics, "loss_styled": styled_loss, "loss_invariance": invariance}
        return total, aux, metrics

    return dataclasses.replace(method, init_memory=init_memory, loss=loss)
