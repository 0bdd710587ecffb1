"""PISL (person intrinsic semantic learning with a diffusion model) on top of
cluster contrast.

The model's patch branch (`model.patches`, jaxreid/models/patch_branch.py)
cuts P patches from the backbone's map with affine thetas: a proposal network
(the spatial transformer) in training, a diffusion model over the thetas (the
Spatial Diffusion Model) at extraction. This method adds, to ClusterNCE on the
global feature, the paper's two losses as this library formulates them from
the paper and the authors' code (taoxuefong/Diffusion-reid):

  agreement  at each re-clustering, a_ip = |kNN_g(i) & kNN_p(i)| / k: how much
             image i's k nearest neighbours by its patch p agree with those by
             its global feature (the authors score the agreement of the two
             neighbourhoods' distance matrices by MMD; the overlap is the same
             question, cheaper and in [0, 1]).
  PSC        patch semantic consistency, two parts:
    LR       label refinement: ClusterNCE whose one-hot target becomes
             lambda onehot(y) + (1 - lambda) sum_p w_ip softmax(s_ip . A_p / tau)
             (held fixed), w_i = softmax_p(a_i): the patches that agree with the
             global structure vote for the image's cluster.
    LS       label smoothing: each patch's contrast with its own memory A_p is
             a_ip CE(s_ip . A_p / tau, y) + (1 - a_ip) KL(uniform || softmax):
             patches that disagree learn a flat assignment instead of a
             possibly wrong label (plain CE before `smooth_start_epoch`).
  SCD        semantic controlled diffusion, on the branch's training outputs:
             ||eps_hat - eps||^2 (the denoising objective, x0 = the proposal's
             thetas) + consistency_weight (mse(theta_hat, theta_p) + 0.1 (1 -
             cos(theta_hat, theta_p))) + semantic_weight sum_p v_p SupCon_p,
             SupCon_p the in-batch supervised contrast (pseudo-labels) of the
             patches cut at the denoised theta_hat, v = softmax(-SupCon)
             (held fixed): the denoising is pulled towards thetas whose patches
             tell the pseudo-identities apart. Only the denoiser learns from it.
  relabel    hard refinement of the pseudo-labels by the same patch vote:
             image i moves to cluster c when relabel_weight onehot(y) +
             (1 - relabel_weight) vote_i is largest at c != y (outliers stay).
             The number moved is logged per epoch ("pisl/labels_changed").

Total: PSC-LR(global) + patch_weight * PSC-LS(patches) + diffusion_weight * SCD.
Memory: the cluster-contrast memory, one (P, R, C) table of patch prototypes
(momentum means of each cluster's patch features), the (N, P) agreement.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from jaxreid.methods import Batch, EpochPlan, Method, TrainSet, register
from jaxreid.methods.centroids import update_centroids
from jaxreid.methods.cluster import (
    ClusterMemory,
    build_memory,
    check_neighbour_sizes,
    cluster_problems,
    recluster,
    same_camera_rows,
)
from jaxreid.methods.sdft import build_stripe_prototypes
from jaxreid.utils import l2_normalize
from jaxreid.validate import number_problems

_NEG = -1e9  # logit of an unused memory row (finite: keeps gradients clean)


class PatchMemory(struct.PyTreeNode):
    """clusters:  the global feature's cluster-contrast memory (R = N rows).
    patches:   (P, R, C) unit rows, row r of table p cluster r's patch-p prototype.
    agreement: (N, P) a_ip in [0, 1] (the PSC-LR vote weights).
    smoothing: (N, P) the PSC-LS CE weight: a_ip, or 1 before smooth_start_epoch."""

    clusters: ClusterMemory
    patches: jax.Array
    agreement: jax.Array
    smoothing: jax.Array


# ---------------------------------------------------------------- host side


def knn_rows(features: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """(N, k) indices of each unit row's k most similar other rows."""
    f = l2_normalize(np.asarray(features, np.float32))
    n = len(f)
    out = np.empty((n, k), np.int64)
    for start in range(0, n, block):
        sims = f[start : start + block] @ f.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[start : start + block] = top
    return out


def patch_agreement(global_features: np.ndarray, patches: np.ndarray, k: int) -> np.ndarray:
    """(N, P) share of image i's k nearest neighbours by the global feature
    that are also among its k nearest by patch p."""
    n, p = patches.shape[:2]
    k = min(k, n - 1)
    by_global = knn_rows(global_features, k)
    marks = np.zeros((n, n), bool)
    marks[np.arange(n)[:, None], by_global] = True
    out = np.empty((n, p), np.float32)
    for q in range(p):
        by_patch = knn_rows(patches[:, q], k)
        out[:, q] = marks[np.arange(n)[:, None], by_patch].sum(1) / k
    return out


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def patch_vote(
    patches: np.ndarray,
    prototypes: np.ndarray,
    num_rows: int,
    agreement: np.ndarray,
    temperature: float,
) -> np.ndarray:
    """(N, R') sum_p softmax_p(a_i)_p softmax(s_ip . A_p[:R'] / tau): each
    image's agreement-weighted patch assignment over the R' valid rows."""
    s = l2_normalize(np.asarray(patches, np.float32))
    logits = np.einsum("npc,prc->npr", s, prototypes[:, :num_rows]) / temperature
    weights = _softmax(agreement, axis=1)
    return np.einsum("np,npr->nr", weights, _softmax(logits, axis=-1))


def relabel(labels: np.ndarray, vote: np.ndarray, weight: float) -> np.ndarray:
    """Labels moved to argmax(weight onehot(y) + (1 - weight) vote) (vote over
    clusters 0 .. R'-1); outliers (-1) stay."""
    clustered = labels >= 0
    score = (1.0 - weight) * vote
    score[np.flatnonzero(clustered), labels[clustered]] += weight
    out = labels.copy()
    out[clustered] = np.argmax(score[clustered], axis=1)
    return out


def compact(labels: np.ndarray) -> np.ndarray:
    """Cluster ids renumbered 0 .. K-1 in order (a cluster emptied by the
    relabelling leaves no gap); -1 stays."""
    out = np.full_like(labels, -1)
    used = labels >= 0
    out[used] = np.unique(labels[used], return_inverse=True)[1]
    return out


# ---------------------------------------------------------------- losses


def _masked_logits(features, prototypes, valid, temperature):
    f = l2_normalize(features.astype(jnp.float32))
    logits = f @ jax.lax.stop_gradient(prototypes).T / temperature
    return jnp.where(valid, logits, _NEG)


def psc_refinement_loss(
    global_features: jax.Array,
    prototypes: jax.Array,
    patches: jax.Array,
    patch_prototypes: jax.Array,
    valid: jax.Array,
    targets: jax.Array,
    agreement: jax.Array,
    refine_weight: float,
    temperature: float,
) -> jax.Array:
    """PSC-LR: mean over samples with target >= 0 of -sum_r y_r log
    softmax(g . C / tau)_r, y = refine_weight onehot(target) + (1 -
    refine_weight) sum_p softmax_p(agreement)_p softmax(s_p . A_p / tau) (fixed).

    global_features (B, D); prototypes (R, D); patches (B, P, C);
    patch_prototypes (P, R, C); valid (R,) or (B, R); targets (B,); agreement (B, P)."""
    log_g = jax.nn.log_softmax(_masked_logits(global_features, prototypes, valid, temperature))
    patch_logits = jax.vmap(
        lambda s, a: _masked_logits(s, a, valid, temperature), in_axes=(1, 0), out_axes=1
    )(patches, patch_prototypes)  # (B, P, R)
    vote = jnp.einsum(
        "bp,bpr->br", jax.nn.softmax(agreement, axis=1), jax.nn.softmax(patch_logits, -1)
    )
    onehot = jax.nn.one_hot(jnp.maximum(targets, 0), prototypes.shape[0])
    target = jax.lax.stop_gradient(refine_weight * onehot + (1.0 - refine_weight) * vote)
    ce = -jnp.sum(jnp.where(jnp.broadcast_to(valid, log_g.shape), target * log_g, 0.0), -1)
    use = targets >= 0
    return jnp.sum(jnp.where(use, ce, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def psc_smoothing_loss(
    patches: jax.Array,
    patch_prototypes: jax.Array,
    valid: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    temperature: float,
) -> jax.Array:
    """PSC-LS: mean over samples with target >= 0 and patches p of
    w_ip CE(q_ip, target) + (1 - w_ip) KL(u || q_ip), q_ip = softmax(s_ip .
    A_p / tau) over the valid rows, u uniform over them; weights (B, P)."""
    b, p, _ = patches.shape
    r = patch_prototypes.shape[1]
    logits = jax.vmap(
        lambda s, a: _masked_logits(s, a, valid, temperature), in_axes=(1, 0), out_axes=1
    )(patches, patch_prototypes)  # (B, P, R)
    log_q = jax.nn.log_softmax(logits, -1)
    used = jnp.broadcast_to(valid, (b, r))[:, None, :]  # (B, 1, R)
    count = jnp.maximum(jnp.sum(used, -1), 1)  # (B, 1)
    ce = -jnp.take_along_axis(log_q, jnp.maximum(targets, 0)[:, None, None], -1)[..., 0]
    # KL(u || q) = sum_r u_r (log u_r - log q_r), u_r = 1 / count on the valid rows.
    kl = -jnp.log(count) - jnp.sum(jnp.where(used, log_q, 0.0), -1) / count
    terms = weights * ce + (1.0 - weights) * kl  # (B, P)
    use = targets >= 0
    return jnp.sum(jnp.where(use[:, None], terms, 0.0)) / jnp.maximum(jnp.sum(use) * p, 1)


def supervised_contrast(features: jax.Array, labels: jax.Array, temperature: float) -> jax.Array:
    """In-batch supervised contrast: mean over anchors with label >= 0 and at
    least one positive of -mean_{j in pos(i)} log softmax_{k != i}(f_i . f_j / tau)."""
    f = l2_normalize(features.astype(jnp.float32))
    b = f.shape[0]
    eye = jnp.eye(b, dtype=bool)
    logits = jnp.where(eye, _NEG, f @ f.T / temperature)
    log_p = jax.nn.log_softmax(logits, -1)
    positive = (labels[:, None] == labels[None, :]) & ~eye & (labels[:, None] >= 0)
    count = jnp.sum(positive, -1)
    per_anchor = -jnp.sum(jnp.where(positive, log_p, 0.0), -1) / jnp.maximum(count, 1)
    use = count > 0
    return jnp.sum(jnp.where(use, per_anchor, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def scd_loss(
    noise: jax.Array,
    noise_pred: jax.Array,
    theta_denoised: jax.Array,
    theta_proposal: jax.Array,
    patches_denoised: jax.Array,
    labels: jax.Array,
    *,
    consistency_weight: float,
    semantic_weight: float,
    temperature: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SCD (module docstring): noise (B, 6P), noise_pred (B, 6P), thetas (B, P, 2, 3),
    patches_denoised (B, P, C), labels (B,) pseudo-labels (-1: none)."""
    denoise = jnp.mean((noise_pred - noise) ** 2)
    b = theta_denoised.shape[0]
    hat = theta_denoised.reshape(b, -1)
    target = jax.lax.stop_gradient(theta_proposal).reshape(b, -1)
    cos = jnp.sum(l2_normalize(hat) * l2_normalize(target), -1)
    consistency = jnp.mean((hat - target) ** 2) + 0.1 * (1.0 - jnp.mean(cos))
    per_patch = jax.vmap(lambda f: supervised_contrast(f, labels, temperature), in_axes=1)(
        patches_denoised
    )  # (P,)
    weights = jax.lax.stop_gradient(jax.nn.softmax(-per_patch))
    semantic = jnp.sum(weights * per_patch)
    total = denoise + consistency_weight * consistency + semantic_weight * semantic
    return total, {"scd_denoise": denoise, "scd_consistency": consistency, "scd_semantic": semantic}


# ---------------------------------------------------------------- method


@dataclasses.dataclass(frozen=True)
class PISLSettings:
    temperature: float
    refine_weight: float
    patch_weight: float
    diffusion_weight: float
    consistency_weight: float
    semantic_weight: float
    semantic_temperature: float
    # As the cluster family's setting: the memory contrasts take their
    # negatives from the rows with a member in the sample's camera.
    camera_negatives: bool = False


def pisl_loss(
    outputs: dict[str, jax.Array], memory: PatchMemory, batch: Batch, s: PISLSettings
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of a batch (pure; the memory is constant)."""
    clusters = memory.clusters
    targets = clusters.rows[batch.indices]
    valid = clusters.valid
    if s.camera_negatives:
        valid = clusters.valid[None, :] & same_camera_rows(clusters, batch.cameras)
    refine = psc_refinement_loss(
        outputs["global"],
        clusters.prototypes,
        outputs["patches"],
        memory.patches,
        valid,
        targets,
        memory.agreement[batch.indices],
        s.refine_weight,
        s.temperature,
    )
    smooth = psc_smoothing_loss(
        outputs["patches"],
        memory.patches,
        valid,
        targets,
        memory.smoothing[batch.indices],
        s.temperature,
    )
    scd, scd_metrics = scd_loss(
        outputs["noise"],
        outputs["noise_pred"],
        outputs["theta_denoised"],
        outputs["theta"],
        outputs["patches_denoised"],
        targets,
        consistency_weight=s.consistency_weight,
        semantic_weight=s.semantic_weight,
        temperature=s.semantic_temperature,
    )
    total = refine + s.patch_weight * smooth + s.diffusion_weight * scd
    offset = jnp.mean(jnp.abs(outputs["theta"] - outputs["theta"].mean(0)))
    metrics = {
        "loss_psc_lr": refine,
        "loss_psc_ls": smooth,
        "loss_scd": scd,
        **scd_metrics,
        "theta_spread": offset,  # how much the thetas differ between images
    }
    return total, metrics


def update_patch_memory(
    memory: PatchMemory,
    global_features: jax.Array,
    patches: jax.Array,
    indices: jax.Array,
    *,
    momentum: float,
    mode: str,
) -> PatchMemory:
    """Momentum updates of the global and every patch table by the batch;
    indices of -1 write nothing."""
    clusters = memory.clusters
    targets = jnp.where(indices >= 0, clusters.rows[indices], -1)
    prototypes = update_centroids(
        clusters.prototypes, jax.lax.stop_gradient(global_features), targets, momentum, mode
    )
    tables = jax.vmap(
        lambda table, f: update_centroids(table, f, targets, momentum, mode), in_axes=(0, 1)
    )(memory.patches, jax.lax.stop_gradient(patches).astype(jnp.float32))
    return memory.replace(clusters=clusters.replace(prototypes=prototypes), patches=tables)


def build_patch_memory(
    features: dict[str, np.ndarray],
    cameras: np.ndarray,
    labels: np.ndarray,
    agreement: np.ndarray,
    smoothing: np.ndarray,
) -> PatchMemory:
    clusters = build_memory("cluster_contrast", features["global"], cameras, labels)
    num_rows = int(np.sum(clusters.valid))
    tables = build_stripe_prototypes(features["patches"], np.asarray(clusters.rows), num_rows)
    return PatchMemory(
        clusters=clusters,
        patches=tables,
        agreement=np.asarray(agreement, np.float32),
        smoothing=np.asarray(smoothing, np.float32),
    )


def pisl_settings() -> dict:
    """Cluster contrast's values and PISL's weights (the authors' defaults:
    refine 0.5 = Wref, smoothing from epoch 5 = se, diffusion 0.1 = Wdiff,
    SCD's 0.5 / 0.3 / 0.07, agreement over 20 neighbours = knn)."""
    return dict(
        temperature=0.05,
        momentum=0.1,
        memory_update="mean",  # mean | hard | sequential (methods/centroids.py)
        refine_weight=0.5,
        patch_weight=1.0,
        smooth_start_epoch=5,
        diffusion_weight=0.1,
        consistency_weight=0.5,
        semantic_weight=0.3,
        semantic_temperature=0.07,
        agreement_k=20,
        # The cluster label's weight in the hard relabelling; 0.5 or more never
        # moves a label (the vote is at most 1). 1 = off.
        relabel_weight=0.3,
        # Contrast each sample only with memory rows of its own camera (besides
        # its positives), as the cluster family's camera_negatives.
        camera_negatives=False,
    )


def pisl_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = cluster_problems(config)
    problems += number_problems(
        config,
        ("method.refine_weight", 0, 1, "[]", "the cluster label's share; PISL: 0.5"),
        ("method.relabel_weight", 0, 1, "[]", "1 = no relabelling"),
        ("method.semantic_temperature", 0, None, "()", "0.07"),
        ("method.agreement_k", 1, None, "[)", "PISL: 20"),
        ("method.smooth_start_epoch", 0, None, "[)", "PISL: 5"),
        *[
            (f"method.{key}", 0, None, "[)")
            for key in ("patch_weight", "diffusion_weight", "consistency_weight", "semantic_weight")
        ],
    )
    patches = config.model.get("patches")
    if patches is None or int(patches.num) < 1:
        problems.append(
            "model.patches.num = 0: method pisl needs the patch branch; set "
            "--config.model.patches.num=3 (PISL's 3 patches)"
        )
    return problems


@register("pisl", settings=pisl_settings)
def pisl_method(config: ml_collections.ConfigDict) -> Method:
    """Cluster contrast + PSC + SCD + relabelling by patch agreement (module docstring)."""
    m = config.method
    settings = PISLSettings(
        temperature=m.temperature,
        refine_weight=m.refine_weight,
        patch_weight=m.patch_weight,
        diffusion_weight=m.diffusion_weight,
        consistency_weight=m.consistency_weight,
        semantic_weight=m.semantic_weight,
        semantic_temperature=m.semantic_temperature,
        camera_negatives=bool(m.camera_negatives),
    )

    def init_memory(train: TrainSet) -> PatchMemory:
        check_neighbour_sizes(config, train.num_images)
        n, p = train.num_images, train.output_shapes["patches"][0]
        return build_patch_memory(
            train.zero_outputs(), train.cameras, np.full(n, -1), np.zeros((n, p)), np.ones((n, p))
        )

    def start_epoch(epoch: int, train: TrainSet, memory, resumed: bool) -> EpochPlan:
        if resumed:
            return EpochPlan(sampler_labels=np.asarray(memory.clusters.pseudo_labels))
        extracted: dict[str, np.ndarray] = {}

        def extract_once() -> dict[str, np.ndarray]:
            extracted.update(train.extract())  # keep the patches of recluster's extraction
            return extracted

        clusters, labels, stats = recluster(
            "cluster_contrast", config, dataclasses.replace(train, extract=extract_once), epoch
        )
        start = time.perf_counter()
        agreement = patch_agreement(extracted["global"], extracted["patches"], m.agreement_k)
        changed = 0
        if m.relabel_weight < 1 and np.any(labels >= 0):
            num_rows = int(np.sum(clusters.valid))
            tables = build_stripe_prototypes(
                extracted["patches"], np.asarray(clusters.rows), num_rows
            )
            vote = patch_vote(extracted["patches"], tables, num_rows, agreement, m.temperature)
            moved = relabel(labels, vote, m.relabel_weight)
            changed = int(np.sum(moved != labels))
            labels = compact(moved)
        smoothing = agreement if epoch >= m.smooth_start_epoch else np.ones_like(agreement)
        memory = build_patch_memory(extracted, train.cameras, labels, agreement, smoothing)
        stats = {f"cluster/{k}": v for k, v in stats.items()}
        stats.update(
            {
                "pisl/labels_changed": changed,
                "pisl/agreement_mean": float(agreement.mean()),
                "pisl/refine_s": time.perf_counter() - start,
            }
        )
        return EpochPlan(
            memory=memory,
            sampler_labels=labels,
            stats=stats,
            summary=(
                f"epoch {epoch + 1}: eps {stats['cluster/eps']:.3f}, "
                f"{stats['cluster/num_clusters']} clusters, "
                f"{100 * stats['cluster/outlier_fraction']:.1f}% outliers; patch agreement "
                f"{agreement.mean():.3f}, {changed} labels moved by the patch vote "
                f"({stats['pisl/refine_s']:.1f}s)"
            ),
            arrays={"pseudo_labels": labels, "patch_agreement": agreement},
        )

    def loss(outputs, memory: PatchMemory, batch: Batch, rng, phase):
        value, metrics = pisl_loss(outputs, memory, batch, settings)
        return value, None, metrics

    def update(memory: PatchMemory, outputs, batch: Batch, aux, phase):
        return update_patch_memory(
            memory,
            outputs["global"],
            outputs["patches"],
            batch.indices,
            momentum=m.momentum,
            mode=m.memory_update,
        )

    return Method(
        "pisl",
        init_memory,
        start_epoch,
        loss,
        update,
        feature_keys=("global", "patches"),
        problems=pisl_problems,
    )
