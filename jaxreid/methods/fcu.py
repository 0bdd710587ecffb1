"""FCU: fine- and coarse-grained unsupervised learning, a patch branch with a
patch memory beside a global branch trained on bottom-up merged clusters.

As this library builds it from the issue's description and the two systems
it combines (PAUL, Yang et al. CVPR 2019, QizeYang/PAUL; BUC, Lin et al.
AAAI 2019, vana77/Bottom-up-Clustering-Person-Re-identification):

  fine    the model's fixed grid of patch features (`model.patch_grid`,
          jaxreid/models/patch_grid.py: PAUL's PatchNet with its patch
          generator frozen, as PAUL's unsupervised training keeps it) and a
          patch memory M (P, N, d), one momentum-updated entry per image and
          patch. PAUL's patch loss (PEDAL), per patch p of image i:
              -log sum_{j in top-k(i, p)} exp(s_ij / tau_p)
                   / sum_{j != i} exp(s_ij / tau_p),   s_ij = <x_ip, M_p[j]>
          top-k(i, p) the k entries of M_p most similar to x_ip, own entry
          excluded: a patch is pulled towards its nearest patches at the same
          position and pushed from the rest. PAUL writes the same softmax
          with exp(-scale ||x - m||^2) on unit rows, i.e. tau_p = 1 / (2
          scale) (its scale 10, k 10: tau_p 0.05). The memory is written
          after the step (PAUL writes it before the loss; its loss excludes
          the own entry, so the difference is one step's staleness of the
          other images' entries) and refreshed from the extraction at every
          epoch start.
  coarse  the global feature's classes come from bottom-up merging
          (`cluster.algorithm = "bottom_up"`, jaxreid/pseudo_labels/bottom_up.py),
          continued from the last epoch's clusters at every epoch start.
          repelled  BUC's loss: each image against a memory of cluster
                    centroids, softmax over all clusters at temperature tau
                    (BUC's t = 10: tau 0.1), the centroids updated as BUC's
                    exclusive memory ((V + x) / 2 renormalised: momentum 0.5).
          attracted the issue's within-class similarity, which BUC has no
                    term for: in the P x K batch, the mean over ordered pairs
                    of different batch rows with the same pseudo-label of
                    1 - cos(f_i, f_j), gradients through both.
  total   repelled + attract_weight * attracted + patch_weight * patch.

The method runs with either clustering (`cluster.algorithm`): configs/
cuhk03_fcu.py chooses "bottom_up". Where this differs from the papers:
PAUL's image-level term (its IPFL) is not used (the global branch plays that
part), and the patch memory starts from the eval-mode extraction, not from a
training-mode pass.

Memory: the cluster-contrast memory (its `pseudo_labels` are the merged
clusters the next epoch continues from) and the patch memory.
"""

from __future__ import annotations

import dataclasses

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
    cluster_training_set,
    clustering_summary,
    masked_nce,
    same_camera_rows,
    update_cluster_memory,
)
from jaxreid.utils import l2_normalize
from jaxreid.validate import number_problems

_NEG = -1e9  # logit of an excluded memory entry (finite: keeps gradients clean)


class FCUMemory(struct.PyTreeNode):
    """clusters: the global feature's cluster memory (R = N rows, the centroids).
    patches:  (P, N, d) unit rows, row n of table p image n's patch p."""

    clusters: ClusterMemory
    patches: jax.Array


# ---------------------------------------------------------------- losses


def repelled_loss(
    features: jax.Array,
    prototypes: jax.Array,
    valid: jax.Array,
    targets: jax.Array,
    temperature: float,
) -> jax.Array:
    """Mean over samples with target >= 0 of -log softmax(f . C^T / tau)[target]
    over the `valid` ((R,) or (B, R)) centroid rows; f unit, C held fixed."""
    return masked_nce(features, prototypes, valid, targets, temperature)


def attracted_loss(features: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean of 1 - cos(f_i, f_j) over ordered pairs i != j of batch rows with
    the same label >= 0 (0 when the batch has no such pair)."""
    f = l2_normalize(features.astype(jnp.float32))
    b = f.shape[0]
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0) & ~jnp.eye(b, dtype=bool)
    distance = 1.0 - f @ f.T
    return jnp.sum(jnp.where(same, distance, 0.0)) / jnp.maximum(jnp.sum(same), 1)


def patch_loss(
    patches: jax.Array,
    memory: jax.Array,
    indices: jax.Array,
    k: int,
    temperature: float,
) -> jax.Array:
    """PAUL's patch loss (module docstring): patches (B, P, d), memory (P, N, d)
    held fixed, indices (B,) the images' own rows (excluded; -1: none). Mean
    over samples and patches of logsumexp(all others) - logsumexp(top k)."""
    s = l2_normalize(patches.astype(jnp.float32))
    logits = jnp.einsum("bpd,pnd->bpn", s, jax.lax.stop_gradient(memory)) / temperature
    own = jnp.arange(memory.shape[1])[None, None, :] == indices[:, None, None]
    logits = jnp.where(own, _NEG, logits)
    k = min(k, memory.shape[1] - 1)
    nearest, _ = jax.lax.top_k(logits, k)  # (B, P, k)
    per_patch = jax.nn.logsumexp(logits, -1) - jax.nn.logsumexp(nearest, -1)
    return jnp.mean(per_patch)


# ---------------------------------------------------------------- method


@dataclasses.dataclass(frozen=True)
class FCUSettings:
    temperature: float
    attract_weight: float
    patch_weight: float
    patch_k: int
    patch_temperature: float
    camera_negatives: bool = False


def fcu_loss(
    outputs: dict[str, jax.Array], memory: FCUMemory, batch: Batch, s: FCUSettings
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of a batch (pure; the memory is constant)."""
    clusters = memory.clusters
    valid = clusters.valid
    if s.camera_negatives:
        valid = clusters.valid[None, :] & same_camera_rows(clusters, batch.cameras)
    targets = clusters.rows[batch.indices]
    repelled = repelled_loss(outputs["global"], clusters.prototypes, valid, targets, s.temperature)
    attracted = attracted_loss(outputs["global"], clusters.pseudo_labels[batch.indices])
    fine = patch_loss(
        outputs["grid_patches"], memory.patches, batch.indices, s.patch_k, s.patch_temperature
    )
    total = repelled + s.attract_weight * attracted + s.patch_weight * fine
    return total, {"loss_repelled": repelled, "loss_attracted": attracted, "loss_patch": fine}


def update_fcu_memory(
    memory: FCUMemory,
    global_features: jax.Array,
    patches: jax.Array,
    indices: jax.Array,
    *,
    momentum: float,
    mode: str,
    patch_momentum: float,
) -> FCUMemory:
    """Centroids by the batch (`mode`, old-row weight `momentum`); each image's
    patch entries by its patches (old-entry weight `patch_momentum`, a mean
    over repeats); indices of -1 write nothing."""
    clusters = update_cluster_memory(
        "cluster_contrast",
        memory.clusters,
        global_features,
        indices,
        momentum=momentum,
        mode=mode,
        instance_momentum=0.0,
    )
    rows = jnp.where(indices >= 0, indices, -1)
    tables = jax.vmap(
        lambda table, f: update_centroids(table, f, rows, patch_momentum, "mean"),
        in_axes=(0, 1),
    )(memory.patches, jax.lax.stop_gradient(patches).astype(jnp.float32))
    return memory.replace(clusters=clusters, patches=tables)


def build_fcu_memory(
    features: dict[str, np.ndarray], cameras: np.ndarray, labels: np.ndarray
) -> FCUMemory:
    clusters = build_memory("cluster_contrast", features["global"], cameras, labels)
    patches = l2_normalize(np.asarray(features["grid_patches"], np.float32))
    return FCUMemory(clusters=clusters, patches=np.ascontiguousarray(patches.transpose(1, 0, 2)))


def fcu_settings() -> dict:
    """BUC's temperature (t = 10) and memory rate ((V + x) / 2), PAUL's patch
    loss (k = 10, scale 10 on squared distances = temperature 0.05, memory
    rate 0.1: old-entry weight 0.9) at PAUL's weight 2 against its image term."""
    return dict(
        temperature=0.1,
        momentum=0.5,
        memory_update="mean",  # mean | hard | sequential (methods/centroids.py)
        attract_weight=1.0,
        patch_weight=2.0,
        patch_k=10,
        patch_temperature=0.05,
        patch_momentum=0.9,
        # Contrast each sample only with centroids of its own camera (besides
        # its positive), as the cluster family's camera_negatives.
        camera_negatives=False,
    )


def fcu_problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = cluster_problems(config)
    problems += number_problems(
        config,
        ("method.attract_weight", 0, None, "[)", "0 = no attracted term"),
        ("method.patch_weight", 0, None, "[)", "PAUL: 2; 0 = no patch term"),
        ("method.patch_temperature", 0, None, "()", "PAUL's scale 10: 0.05"),
        ("method.patch_momentum", 0, 1, "[]", "the old entry's weight; PAUL: 0.9"),
    )
    k = config.method.patch_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        problems.append(f"method.patch_k = {k!r}: must be a whole number >= 1 (PAUL: 10)")
    grid = config.model.get("patch_grid")
    if grid is None or int(grid.rows) < 1:
        problems.append(
            "model.patch_grid.rows = 0: method fcu needs the patch grid; set "
            "--config.model.patch_grid.rows=6 (PAUL's 6 horizontal bands)"
        )
    return problems


@register("fcu", settings=fcu_settings)
def fcu_method(config: ml_collections.ConfigDict) -> Method:
    """Repelled + attracted losses on merged clusters + the patch loss (module docstring)."""
    m = config.method
    settings = FCUSettings(
        temperature=m.temperature,
        attract_weight=m.attract_weight,
        patch_weight=m.patch_weight,
        patch_k=int(m.patch_k),
        patch_temperature=m.patch_temperature,
        camera_negatives=bool(m.camera_negatives),
    )

    def init_memory(train: TrainSet) -> FCUMemory:
        check_neighbour_sizes(config, train.num_images)
        return build_fcu_memory(train.zero_outputs(), train.cameras, np.full(train.num_images, -1))

    def start_epoch(epoch: int, train: TrainSet, memory: FCUMemory, resumed: bool) -> EpochPlan:
        if resumed:  # the checkpoint's memory holds this epoch's clusters
            return EpochPlan(sampler_labels=np.asarray(memory.clusters.pseudo_labels))
        extracted: dict[str, np.ndarray] = {}

        def extract_once() -> dict[str, np.ndarray]:
            extracted.update(train.extract())  # keep the patches of the clustering's pass
            return extracted

        result = cluster_training_set(
            config,
            dataclasses.replace(train, extract=extract_once),
            epoch,
            previous_labels=np.asarray(memory.clusters.pseudo_labels),
        )
        memory = build_fcu_memory(extracted, train.cameras, result.labels)
        stats = {f"cluster/{k}": v for k, v in result.stats.items()}
        return EpochPlan(
            memory=memory,
            sampler_labels=result.labels,
            stats=stats,
            summary=clustering_summary(epoch, result.stats),
            arrays={"pseudo_labels": result.labels},
        )

    def loss(outputs, memory: FCUMemory, batch: Batch, rng, phase):
        value, metrics = fcu_loss(outputs, memory, batch, settings)
        return value, None, metrics

    def update(memory: FCUMemory, outputs, batch: Batch, aux, phase):
        return update_fcu_memory(
            memory,
            outputs["global"],
            outputs["grid_patches"],
            batch.indices,
            momentum=m.momentum,
            mode=m.memory_update,
            patch_momentum=m.patch_momentum,
        )

    return Method(
        "fcu",
        init_memory,
        start_epoch,
        loss,
        update,
        feature_keys=("global", "grid_patches"),
        problems=fcu_problems,
    )
