"""Selective Contrastive Learning (scl-method.md): banks, selection, loss.

Memory: the global, local and mixture banks (`banks.SCLBanks`), built once
from the initial model's features. Phases: "warmup" (random candidates, the
sample itself the only positive) for `method.warmup_epochs` epochs, then
"select" (k positives and n negatives selected against the banks). Batches
are a plain shuffle.

Three switches choose between the authors' release and the clean definition
(release.py; README "Fidelity to the release"): `method.mixture_update`
("release": M updated in the release's order; "sequential" / "vectorized":
global then local, two exact implementations), `method.gradient` ("release":
each CE term's gradient from M as the earlier backward calls left it;
"clean": from the step's initial M), `method.warmup_sampling` ("release": one
shared shuffle per batch, position removal; "clean": per row, with
replacement, never the sample itself). n is capped at N - k - 1 (a warning).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxreid.methods import Batch, EpochPlan, Method, TrainSet, register
from jaxreid.methods.scl import banks, loss, release, selection
from jaxreid.utils import UserError
from jaxreid.validate import choice_problems, number_problems

WARMUP, SELECT = "warmup", "select"
MIXTURE_UPDATES = ("release", "sequential", "vectorized")
MIXTURE_INITS = ("zeros", "features")
RELEASE_OR_CLEAN = ("release", "clean")


def scl_settings() -> dict:
    """SCL's settings: the released configuration (scl-method.md), with the
    clean definition where the release departs from it."""
    return dict(
        k=7,  # positives selected per sample
        n=500,  # negatives selected per sample
        lam_t=0.5,
        lam_p=0.5,
        lam_g=0.5,
        lam_c=0.05,
        alpha=1.75,
        temperature=0.1,  # logits are <x, M_j> / temperature (the spec's t = 10)
        warmup_epochs=3,
        # The release's behaviour where it departs from the clean definition
        # (release.py, docs/results/fidelity.md): "release" | the clean forms.
        mixture_update="sequential",  # release | sequential | vectorized
        gradient="clean",  # release | clean
        warmup_sampling="clean",  # release | clean
        # Mixture bank M at the start: "zeros" (the release) or "features": each
        # row as one update of an empty row with the sample's own initial
        # features leaves it, normalize(g + concat(l) / sqrt(P)) (adaptation from
        # a source model, which needs no warm-up to fill M).
        mixture_init="zeros",
        selection_block=65536,  # bank rows per block of the selection scan
        approx_topk=False,
        # Negatives: the n nearest rows of the sample's own camera.
        camera_negatives=False,
    )


def scl_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = choice_problems(
        config,
        ("method.mixture_update", MIXTURE_UPDATES),
        ("method.gradient", RELEASE_OR_CLEAN),
        ("method.warmup_sampling", RELEASE_OR_CLEAN),
        ("method.mixture_init", MIXTURE_INITS),
    )
    problems += number_problems(
        config,
        ("method.temperature", 0, None, "()", "0.1 is the paper's"),
        ("method.alpha", 0, None, "[)"),
        *[(f"method.{key}", 0, None, "[)") for key in ("lam_t", "lam_p", "lam_g", "lam_c")],
    )
    if config.train.camera_groups:
        problems.append(
            "train.camera_groups = True: SCL samples a plain shuffle, not P x K "
            "by (pseudo-)label; set it False"
        )
    return problems


@register("scl", settings=scl_settings)
def scl_method(config: ml_collections.ConfigDict) -> Method:
    m = config.method

    def negatives(num_rows: int) -> int:
        return min(m.n, num_rows - m.k - 1)

    def init_memory(train: TrainSet) -> banks.SCLBanks:
        if m.k >= train.num_images - 1:
            raise UserError(
                f"method.k = {m.k}: the training set has {train.num_images} images, and k "
                f"positives plus one negative per sample need k <= {train.num_images - 2}; "
                "lower method.k (7 is the paper's) or train on more images"
            )
        release.capped_negatives(m.n, m.k, train.num_images)  # warns when it caps
        features = train.extract()
        return banks.init_banks(
            features["global"], features["stripes"], train.cameras, mixture_init=m.mixture_init
        )

    def start_epoch(epoch: int, train: TrainSet, memory: banks.SCLBanks, resumed: bool):
        return EpochPlan(phase=WARMUP if epoch < m.warmup_epochs else SELECT)

    def scl_loss(outputs, memory: banks.SCLBanks, batch: Batch, rng, phase):
        g, stripes = outputs["global"], outputs["stripes"]
        n = negatives(memory.num_rows)
        warmup = phase == WARMUP
        if warmup and m.warmup_sampling == "release":
            candidates = release.release_warmup_candidates(
                rng, batch.indices, memory.num_rows, m.k, n
            )
        elif warmup:
            candidates = selection.random_candidates(rng, batch.indices, memory.num_rows, m.k, n)
        else:
            candidates = selection.select_candidates(
                jax.lax.stop_gradient(g),
                jax.lax.stop_gradient(stripes),
                batch.indices,
                batch.cameras,
                memory,
                k=m.k,
                n=n,
                lam_g=m.lam_g,
                lam_c=m.lam_c,
                block_size=m.selection_block,
                use_approx=m.approx_topk,
                unit_rows=True,  # bank rows are unit norm: skip recomputing norms
                own_camera_negatives=bool(m.camera_negatives),
            )
        l_concat = stripes.reshape(stripes.shape[0], -1)
        value, metrics = loss.scl_loss_terms(
            g,
            l_concat,
            memory.mixture_bank,
            candidates,
            k=m.k,
            lam_t=m.lam_t,
            lam_p=m.lam_p,
            alpha=m.alpha,
            temperature=m.temperature,
            warmup=warmup,
        )
        if m.gradient == "release":
            # Same value; the gradient of the release's sequential backward.
            value = release.release_gradient_loss(
                g,
                l_concat,
                memory.mixture_bank,
                candidates,
                m.k,
                m.lam_t,
                m.lam_p,
                m.alpha,
                m.temperature,
                warmup,
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
            # "release": the release's order (exact "vectorized" arithmetic).
            mode="vectorized" if m.mixture_update == "release" else m.mixture_update,
            order="release" if m.mixture_update == "release" else "global_then_local",
        )

    return Method(
        "scl",
        init_memory,
        start_epoch,
        scl_loss,
        update,
        feature_keys=("global", "stripes"),
        phases=(WARMUP, SELECT),
        problems=scl_problems,
    )
