"""Training methods as small pure pieces plugged into one train step.

A method is (init_memory, loss, update_memory):

  init_memory(features, cameras, config)            host, before training
  loss(outputs, memory, indices, cameras, rng, warmup) -> (loss, aux, metrics)
                                                    inside the compiled step
  update_memory(memory, outputs, indices, aux, warmup, after, enabled) -> memory
                                                    inside the compiled step

`after` is a pytree the memory writes must wait for (the step's gradients:
the backward pass reads the memory), which lets XLA update the donated
memory in place; `enabled` (traced bool) skips every write, e.g. when the
loss is not finite.

`outputs` are the model's outputs for the augmented batch; `aux` carries what
the update needs from the loss (e.g. SCL's candidate lists). The memory is a
pytree that the step returns updated; it never receives gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxreid import losses, memory, selection


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    init_memory: Callable[..., Any]
    loss: Callable[..., tuple[jax.Array, Any, dict[str, jax.Array]]]
    update_memory: Callable[..., Any]
    # Model outputs the memory is initialised from (extracted without augmentation).
    feature_keys: tuple[str, ...]


def scl_method(config: ml_collections.ConfigDict) -> Method:
    """Selective Contrastive Learning (scl-method.md)."""
    m = config.method

    def init_memory(features: dict[str, Any], cameras: Any) -> memory.SCLBanks:
        return memory.init_banks(features["global"], features["stripes"], cameras)

    def loss(outputs, banks: memory.SCLBanks, indices, cams, rng, warmup: bool):
        g, stripes = outputs["global"], outputs["stripes"]
        if warmup:
            candidates = selection.random_candidates(rng, indices, banks.num_rows, m.k, m.n)
        else:
            candidates = selection.select_candidates(
                jax.lax.stop_gradient(g),
                jax.lax.stop_gradient(stripes),
                indices,
                cams,
                banks,
                k=m.k,
                n=m.n,
                lam_g=m.lam_g,
                lam_c=m.lam_c,
                block_size=m.selection_block,
                use_approx=m.approx_topk,
                unit_rows=True,  # bank rows are unit norm: skip recomputing norms
            )
        value, metrics = losses.scl_loss_terms(
            g,
            stripes.reshape(stripes.shape[0], -1),
            banks.mixture_bank,
            candidates,
            k=m.k,
            lam_t=m.lam_t,
            lam_p=m.lam_p,
            alpha=m.alpha,
            temperature=m.temperature,
            warmup=warmup,
        )
        return value, candidates, metrics

    def update_memory(banks, outputs, indices, candidates, warmup: bool, after, enabled):
        return memory.update_banks(
            banks,
            indices,
            jax.lax.stop_gradient(outputs["global"]).astype(jnp.float32),
            jax.lax.stop_gradient(outputs["stripes"]).astype(jnp.float32),
            candidates,
            k=m.k,
            warmup=warmup,
            mode=m.mixture_update,
            after=after,
            enabled=enabled,
        )

    return Method("scl", init_memory, loss, update_memory, ("global", "stripes"))


METHODS: dict[str, Callable[[ml_collections.ConfigDict], Method]] = {"scl": scl_method}


def get_method(config: ml_collections.ConfigDict) -> Method:
    name = config.method.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](config)
