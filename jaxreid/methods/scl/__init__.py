"""Selective Contrastive Learning (scl-method.md): banks, selection, loss.

Memory: the global, local and mixture banks (`banks.SCLBanks`), built once
from the initial model's features. Phases: "warmup" (random candidates, the
sample itself the only positive) for `method.warmup_epochs` epochs, then
"select" (k positives and n negatives selected against the banks). Batches
are a plain shuffle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxreid.methods import Batch, EpochPlan, Method, TrainSet, register
from jaxreid.methods.scl import banks, loss, selection

WARMUP, SELECT = "warmup", "select"


@register("scl")
def scl_method(config: ml_collections.ConfigDict) -> Method:
    m = config.method

    def init_memory(train: TrainSet) -> banks.SCLBanks:
        features = train.extract()
        return banks.init_banks(features["global"], features["stripes"], train.cameras)

    def start_epoch(epoch: int, train: TrainSet, memory: banks.SCLBanks, resumed: bool):
        return EpochPlan(phase=WARMUP if epoch < m.warmup_epochs else SELECT)

    def scl_loss(outputs, memory: banks.SCLBanks, batch: Batch, rng, phase):
        g, stripes = outputs["global"], outputs["stripes"]
        if phase == WARMUP:
            candidates = selection.random_candidates(rng, batch.indices, memory.num_rows, m.k, m.n)
        else:
            candidates = selection.select_candidates(
                jax.lax.stop_gradient(g),
                jax.lax.stop_gradient(stripes),
                batch.indices,
                batch.cameras,
                memory,
                k=m.k,
                n=m.n,
                lam_g=m.lam_g,
                lam_c=m.lam_c,
                block_size=m.selection_block,
                use_approx=m.approx_topk,
                unit_rows=True,  # bank rows are unit norm: skip recomputing norms
            )
        value, metrics = loss.scl_loss_terms(
            g,
            stripes.reshape(stripes.shape[0], -1),
            memory.mixture_bank,
            candidates,
            k=m.k,
            lam_t=m.lam_t,
            lam_p=m.lam_p,
            alpha=m.alpha,
            temperature=m.temperature,
            warmup=phase == WARMUP,
        )
        return value, candidates, metrics

    def update(memory: banks.SCLBanks, outputs, batch: Batch, candidates, phase):
        return banks.update_banks(
            memory,
            batch.indices,
            outputs["global"].astype(jnp.float32),
            outputs["stripes"].astype(jnp.float32),
            candidates,
            k=m.k,
            warmup=phase == WARMUP,
            mode=m.mixture_update,
        )

    return Method(
        "scl", init_memory, start_epoch, scl_loss, update, feature_keys=("global", "stripes")
    )
