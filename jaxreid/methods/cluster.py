"""Memories, losses and updates of the clustering family (cluster-family.md).

Every method shares one memory pytree, `ClusterMemory`, rebuilt on the host
from the pseudo-labels after each re-clustering and carried through the
compiled step. Its prototype table has R rows (clusters, (cluster, camera)
proxies, or clusters + outliers), of which `valid` marks those in use; R is
`method.prototype_table`'s `table_rows`:

  buckets  the power of two at or above the rows in use, at most N: the step
           compiles once per bucket the run reaches (the cluster count
           rarely spans more than two), and the unused rows cost at most as
           many as those in use. At 10^6 images in clusters of 17, an N-row
           table is 94% padding and makes cluster contrast's step 23x dearer
           (docs/results/training_speed.md).
  images   N rows, an upper bound on any count: one compile per run.

Unused rows are masked out of every softmax, so both layouts give the same
loss. A checkpoint restores the memory in the shapes it was saved with.

Methods (each: build the memory, a pure loss, a pure update):

  cluster_contrast  rows = clusters; ClusterNCE; momentum update
                    (`mean` | `hard` | `sequential`, see centroids).
  self_paced        rows = clusters + one row per outlier (its own feature);
                    NCE over all of them (outliers are their own classes,
                    negatives to every sample; the sampler draws clusters
                    only, so outlier rows stay as clustered until the next
                    re-clustering).
  cap               rows = one proxy per (cluster, camera); intra-camera NCE
                    against the proxies of the sample's camera + inter-camera
                    loss: all proxies of its cluster as positives against the
                    hardest proxies of other clusters.
  hhcl              centroids + instance bank; ClusterNCE + a cluster-level
                    CE whose logits are the hardest positive instance of the
                    sample's cluster and the hardest instance of every other
                    cluster (the release's CMhybrid_v2).
  joint             centroids + instance bank; ClusterNCE + multi-positive
                    instance NCE (all instances of the sample's cluster).

The instance bank update is a momentum update per image row, done with the
same segment mean as the centroids so that an image drawn twice in a batch
gives one deterministic update.

Every member (and jaxreid.methods.mgce, sdft) re-clusters through
`cluster_training_set`: with `cluster.min_cameras` > 1 the clusters seen by
fewer cameras become outliers before the memory is built (JCL's filter).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from jaxreid import parallel
from jaxreid.methods import (
    Batch,
    EpochPlan,
    Method,
    TrainSet,
    pk_sampler_problems,
    register,
)
from jaxreid.methods.centroids import UPDATE_MODES, update_centroids
from jaxreid.utils import UserError, l2_normalize
from jaxreid.validate import choice_problems, number_problems

_NEG = -1e9  # logit of an unused memory row (finite: keeps gradients clean)


class ClusterMemory(struct.PyTreeNode):
    """prototypes:    (R, D) unit rows, float32 (or bfloat16: method.memory_dtype);
                   R = `table_rows` (module doc).
    valid:         (R,) bool, rows in use.
    row_cluster:   (R,) int32 cluster id of each row (-1 unused; self_paced:
                   outlier rows get ids after the clusters).
    row_camera:    (R,) int32 camera of each row (cap), else -1.
    rows:          (N,) int32 the row each image is pulled towards (-1: none).
    pseudo_labels: (N,) int32 DBSCAN cluster of each image (-1 outlier).
    cameras:       (N,) int32 camera of each image.
    instances:     (N, D) instance bank (hhcl, joint; prototypes' dtype), else a (1, D)
                   unused placeholder (orbax cannot save empty arrays). With
                   method.instance_shards = K > 0, (K ceil(N / K), D): zero rows
                   pad it to K equal chunks, and its rows are sharded over the
                   devices (`memory_specs`).
    """

    prototypes: jax.Array
    valid: jax.Array
    row_cluster: jax.Array
    row_camera: jax.Array
    rows: jax.Array
    pseudo_labels: jax.Array
    cameras: jax.Array
    instances: jax.Array


def _segment_mean_rows(features: np.ndarray, segment: np.ndarray, num: int) -> np.ndarray:
    sums = np.zeros((num, features.shape[1]), np.float64)
    np.add.at(sums, segment, features)
    counts = np.bincount(segment, minlength=num)
    return l2_normalize(sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def cluster_rows(labels: np.ndarray, cameras: np.ndarray):
    """One row per cluster: (rows of the images, number of rows, cluster of each row,
    camera of each row or None)."""
    num_clusters = int(labels.max(initial=-1)) + 1
    return np.where(labels >= 0, labels, -1), num_clusters, np.arange(num_clusters), None


def outlier_rows(labels: np.ndarray, cameras: np.ndarray):
    """self_paced: one row per cluster, then one per outlier (its own class)."""
    num_clusters = int(labels.max(initial=-1)) + 1
    outliers = np.flatnonzero(labels < 0)
    rows = labels.copy()
    rows[outliers] = num_clusters + np.arange(len(outliers))
    num_rows = num_clusters + len(outliers)
    return rows, num_rows, np.arange(num_rows), None


def camera_proxy_rows(labels: np.ndarray, cameras: np.ndarray):
    """cap: one proxy per (cluster, camera) pair present, numbered cluster-major."""
    clustered = labels >= 0
    stride = int(cameras.max(initial=0)) + 1
    keys = labels[clustered] * stride + cameras[clustered]
    unique, proxy = np.unique(keys, return_inverse=True)
    rows = np.full(len(labels), -1, np.int64)
    rows[clustered] = proxy
    return rows, len(unique), unique // stride, unique % stride


TABLE_LAYOUTS = ("buckets", "images")
# Storage of the prototypes and the instance bank (method.memory_dtype). The
# losses read a bfloat16 table as stored, summing in float32
# (memory_similarities); the updates compute in float32 and round once, when
# they write (centroids.update_centroids).
MEMORY_DTYPES = ("float32", "bfloat16")


def table_rows(num_rows: int, num_images: int, layout: str) -> int:
    """Rows of the prototype table holding `num_rows` rows in use for a
    training set of `num_images` (the module doc's layouts)."""
    if layout == "images":
        return num_images
    if layout != "buckets":
        raise ValueError(f"unknown prototype table layout {layout!r}; one of {TABLE_LAYOUTS}")
    return min(num_images, 1 << max(num_rows - 1, 0).bit_length())


def build_memory(
    kind: str,
    features: np.ndarray,
    cameras: np.ndarray,
    labels: np.ndarray,
    layout: str = "images",
    dtype: str = "float32",
    instance_shards: int = 0,
) -> ClusterMemory:
    """Host-side memory for `kind` from (N, D) features and DBSCAN labels,
    its prototype table laid out as `layout` (`table_rows`), its prototypes
    and instances stored in `dtype` (MEMORY_DTYPES), its instance bank padded
    to `instance_shards` equal chunks (0: not padded).

    `labels` all -1 gives a memory with nothing valid (self_paced: one row
    per image, every image its own class); the training loop uses it as the
    placeholder before the first clustering.
    """
    record = _kind(kind)
    if dtype not in MEMORY_DTYPES:
        raise ValueError(f"unknown memory dtype {dtype!r}; one of {MEMORY_DTYPES}")
    f = l2_normalize(np.asarray(features, np.float32))
    n, d = f.shape
    cameras = np.asarray(cameras, np.int32)
    labels = np.asarray(labels, np.int64)
    rows, num_rows, row_cluster_used, row_camera_used = record.rows(labels, cameras)
    r = table_rows(num_rows, n, layout)
    row_camera = np.full(r, -1, np.int32)
    if row_camera_used is not None:
        row_camera[:num_rows] = row_camera_used
    prototypes = np.zeros((r, d), np.float32)
    has_row = rows >= 0
    if num_rows:
        prototypes[:num_rows] = _segment_mean_rows(f[has_row], rows[has_row], num_rows)
    valid = np.arange(r) < num_rows
    row_cluster = np.full(r, -1, np.int32)
    row_cluster[:num_rows] = row_cluster_used
    stored = jnp.dtype(dtype)
    instances = f if record.instance_bank else np.zeros((1, d), np.float32)
    if record.instance_bank and instance_shards:
        padding = parallel.padded_rows(n, instance_shards) - n
        instances = np.concatenate([f, np.zeros((padding, d), np.float32)])
    return ClusterMemory(
        prototypes=prototypes.astype(stored),
        valid=valid,
        row_cluster=row_cluster,
        row_camera=row_camera,
        rows=rows.astype(np.int32),
        pseudo_labels=labels.astype(np.int32),
        cameras=cameras,
        instances=np.asarray(instances, stored),
    )


# ---------------------------------------------------------------- losses


def memory_similarities(features: jax.Array, table: jax.Array) -> jax.Array:
    """(B, R) float32 similarities of float32 features to the rows of a memory
    table (a constant): bfloat16 products with float32 sums for a bfloat16
    table. How the backend runs them is its own: XLA:CPU widens the table to
    float32 for each product (warn_cpu_bfloat16)."""
    table = jax.lax.stop_gradient(table)
    return jnp.dot(features.astype(table.dtype), table.T, preferred_element_type=jnp.float32)


def instance_similarities(
    features: jax.Array, instances: jax.Array, num_images: int, shards: int
) -> jax.Array:
    """(B, N) float32 similarities of features to the instance bank: one
    product over the whole bank, or with `shards` > 0 (method.instance_shards;
    inside the step's shard_map, `instances` this device's rows)
    parallel.row_sharded_similarities."""
    if not shards:
        return memory_similarities(features, instances)
    return parallel.row_sharded_similarities(features, instances, shards, num_images)


def _mean_over(values: jax.Array, use: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(use, values, 0.0)) / jnp.maximum(jnp.sum(use), 1)


def same_camera_rows(memory: ClusterMemory, cams: jax.Array) -> jax.Array:
    """(B, R) bool: rows with at least one member image from sample i's camera."""
    num_rows = memory.prototypes.shape[0]
    members = memory.cameras[:, None] == cams[None, :]  # (N, B)
    rows = jnp.where(memory.rows >= 0, memory.rows, num_rows)  # images in no row: dropped
    present = jax.ops.segment_max(members.astype(jnp.int32), rows, num_segments=num_rows + 1)
    return present[:num_rows].T > 0


def masked_nce(
    features: jax.Array,
    prototypes: jax.Array,
    row_mask: jax.Array,
    targets: jax.Array,
    temperature: float,
) -> jax.Array:
    """Mean over samples with target >= 0 of CE(f . P^T / tau, target), rows
    outside `row_mask` ((R,) or (B, R)) excluded from the softmax."""
    f = l2_normalize(features.astype(jnp.float32))
    logits = memory_similarities(f, prototypes) / temperature
    logits = jnp.where(row_mask, logits, _NEG)
    use = targets >= 0
    t = jnp.maximum(targets, 0)
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[:, None], -1)[:, 0]
    return _mean_over(ce, use)


def cap_inter_camera_loss(
    features: jax.Array,
    memory: ClusterMemory,
    clusters: jax.Array,
    temperature: float,
    num_hard_negatives: int,
    negatives_used: jax.Array | None = None,
) -> jax.Array:
    """Inter-camera term of camera-aware proxies: for sample i of cluster y,
    -1/|P_y| sum_{p in P_y} log(exp(s_p) / (sum_{P_y} exp(s) + sum_{H_i} exp(s)))
    with s = f . proxy / tau, P_y all proxies of y, H_i the `num_hard_negatives`
    most similar proxies of other clusters (among those `negatives_used` (B, R)
    marks, when given)."""
    f = l2_normalize(features.astype(jnp.float32))
    s = memory_similarities(f, memory.prototypes) / temperature
    positive = memory.valid[None, :] & (memory.row_cluster[None, :] == clusters[:, None])
    negative = memory.valid[None, :] & ~positive
    if negatives_used is not None:
        negative = negative & negatives_used
    k = min(num_hard_negatives, s.shape[1])
    hard, _ = jax.lax.top_k(jnp.where(negative, s, _NEG), k)
    hard = jnp.where(hard > _NEG / 2, hard, -jnp.inf)  # fewer negatives than k
    num_pos = jnp.sum(positive, axis=1)
    # A sample without positives gets a finite dummy column (masked below):
    # keeps the logsumexp and its gradient finite.
    dummy = jnp.where(num_pos > 0, -jnp.inf, 0.0)[:, None]
    denominator = jax.nn.logsumexp(
        jnp.concatenate([jnp.where(positive, s, -jnp.inf), hard, dummy], axis=1), axis=1
    )
    per_sample = -(jnp.sum(jnp.where(positive, s, 0.0), 1) - num_pos * denominator)
    per_sample = per_sample / jnp.maximum(num_pos, 1)
    return _mean_over(per_sample, (clusters >= 0) & (num_pos > 0))


def hard_instance_loss(
    features: jax.Array,
    instances: jax.Array,
    labels: jax.Array,
    instance_labels: jax.Array,
    temperature: float,
    negatives_used: jax.Array | None = None,
    shards: int = 0,
) -> jax.Array:
    """HHCL's instance term (the release's `CMhybrid_v2`): a softmax over the
    clusters whose logit for the sample's own cluster is its hardest positive
    (the least similar instance of that cluster) and for every other cluster
    its hardest negative (the most similar instance of it). Outlier instances
    belong to no cluster and take no part; with `negatives_used` (B, N) only
    the marked instances give negatives. Samples with label < 0 are skipped.
    `shards`: instance_similarities."""
    f = l2_normalize(features.astype(jnp.float32))
    n = instance_labels.shape[0]
    s = instance_similarities(f, instances, n, shards) / temperature  # (B, N)
    # Cluster ids are < N; outlier instances go to a dropped segment.
    segment = jnp.where(instance_labels >= 0, instance_labels, n)
    usable = s if negatives_used is None else jnp.where(negatives_used, s, -jnp.inf)
    hardest_neg = jax.ops.segment_max(usable.T, segment, num_segments=n + 1)[:n].T  # (B, C)
    hardest_pos = jax.ops.segment_min(s.T, segment, num_segments=n + 1)[:n].T
    own = jnp.arange(n)[None, :] == labels[:, None]
    logits = jnp.where(own, hardest_pos, hardest_neg)
    # Clusters without a usable instance (and the padding up to N) drop out.
    logits = jnp.where(jnp.isfinite(logits), logits, _NEG)
    use = labels >= 0
    target = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=1)[:, 0]
    ce = jax.nn.logsumexp(logits, axis=1) - target
    return _mean_over(ce, use)


def multi_positive_instance_loss(
    features: jax.Array,
    instances: jax.Array,
    labels: jax.Array,
    instance_labels: jax.Array,
    indices: jax.Array,
    temperature: float,
    negatives_used: jax.Array | None = None,
    shards: int = 0,
) -> jax.Array:
    """Joint memory's instance term: -mean_{j in Pos(i)} log softmax_j(f . I^T / tau)
    over the whole instance bank (or, with `negatives_used` (B, N), over Pos(i)
    and the instances it marks), Pos(i) = the instances of i's cluster (or i
    itself when i is an outlier). `shards`: instance_similarities."""
    f = l2_normalize(features.astype(jnp.float32))
    n = instance_labels.shape[0]
    s = instance_similarities(f, instances, n, shards) / temperature
    columns = jnp.arange(n)[None, :]
    positive = jnp.where(
        labels[:, None] >= 0,
        instance_labels[None, :] == labels[:, None],
        columns == indices[:, None],
    )
    if negatives_used is not None:
        s = jnp.where(positive | negatives_used, s, _NEG)
    log_p = s - jax.nn.logsumexp(s, axis=1, keepdims=True)
    per_sample = -jnp.sum(jnp.where(positive, log_p, 0.0), 1) / jnp.maximum(jnp.sum(positive, 1), 1)
    return jnp.mean(per_sample)


def cross_camera_loss(
    features: jax.Array,
    memory: ClusterMemory,
    indices: jax.Array,
    cams: jax.Array,
    rows_used: jax.Array,
    temperature: float,
) -> jax.Array:
    """ClusterNCE whose positive is the sample's cluster seen from the other
    cameras: the normalised mean of the instance-bank rows of its cluster from
    cameras other than its own, against the other `rows_used` ((R,) or (B, R))
    prototypes. Samples whose cluster has no member in another camera (and
    outliers) are skipped."""
    f = l2_normalize(features.astype(jnp.float32))
    labels = memory.pseudo_labels[indices]
    others = (
        (memory.pseudo_labels[None, :] == labels[:, None])
        & (memory.cameras[None, :] != cams[:, None])
        & (labels[:, None] >= 0)
    )  # (B, N)
    bank = jax.lax.stop_gradient(memory.instances)
    centre = l2_normalize(
        jnp.dot(others.astype(bank.dtype), bank, preferred_element_type=jnp.float32)
    )
    positive = jnp.sum(f * centre, axis=1) / temperature
    negatives = memory_similarities(f, memory.prototypes) / temperature
    target_row = memory.rows[indices]
    row_ids = jnp.arange(negatives.shape[1])[None, :]
    negatives = jnp.where(rows_used & (row_ids != target_row[:, None]), negatives, _NEG)
    logits = jnp.concatenate([positive[:, None], negatives], axis=1)
    ce = jax.nn.logsumexp(logits, axis=1) - positive
    return _mean_over(ce, jnp.any(others, axis=1))


@dataclasses.dataclass(frozen=True)
class LossSettings:
    temperature: float
    instance_weight: float = 1.0
    inter_camera_weight: float = 0.5
    num_hard_negatives: int = 50
    # The softmaxes of cluster_contrast / self_paced / hhcl / joint contrast a
    # sample only with rows (and instances) of its own camera, besides its
    # positives, as cap's intra-camera term does; cap's inter-camera term takes
    # its hard negatives from the sample's camera only. On a target whose
    # clusters rarely span cameras, the other rows of other cameras are mostly
    # the sample's own identity seen elsewhere.
    camera_negatives: bool = False
    # hhcl: weight of `cross_camera_loss` (0 = off).
    cross_camera_weight: float = 0.0
    # hhcl / joint: the instance bank in this many row chunks sharded over the
    # devices (instance_similarities; 0 = the whole bank on every device).
    instance_shards: int = 0


def _cluster_term(f, memory: ClusterMemory, indices, cams, s: LossSettings):
    """ClusterNCE against the valid rows (own-camera ones with camera_negatives),
    those rows, and the instances the instance terms may use as negatives
    (None: all)."""
    rows_used = memory.valid
    instances_used = None
    if s.camera_negatives:
        rows_used = memory.valid[None, :] & same_camera_rows(memory, cams)
        instances_used = memory.cameras[None, :] == cams[:, None]
    targets = memory.rows[indices]
    cluster = masked_nce(f, memory.prototypes, rows_used, targets, s.temperature)
    return cluster, rows_used, instances_used


def cluster_nce_loss(f, memory: ClusterMemory, indices, cams, s: LossSettings):
    """cluster_contrast and self_paced: ClusterNCE only."""
    cluster, _, _ = _cluster_term(f, memory, indices, cams, s)
    return cluster, {"loss_cluster": cluster}


def hhcl_loss(f, memory: ClusterMemory, indices, cams, s: LossSettings):
    """ClusterNCE + the hard instance term."""
    cluster, rows_used, instances_used = _cluster_term(f, memory, indices, cams, s)
    instance = hard_instance_loss(
        f,
        memory.instances,
        memory.pseudo_labels[indices],
        memory.pseudo_labels,
        s.temperature,
        negatives_used=instances_used,
        shards=s.instance_shards,
    )
    total = cluster + s.instance_weight * instance
    metrics = {"loss_cluster": cluster, "loss_instance": instance}
    if s.cross_camera_weight:
        cross = cross_camera_loss(f, memory, indices, cams, rows_used, s.temperature)
        total = total + s.cross_camera_weight * cross
        metrics["loss_cross_camera"] = cross
    return total, metrics


def joint_loss(f, memory: ClusterMemory, indices, cams, s: LossSettings):
    """ClusterNCE + the multi-positive instance term."""
    cluster, _, instances_used = _cluster_term(f, memory, indices, cams, s)
    instance = multi_positive_instance_loss(
        f,
        memory.instances,
        memory.pseudo_labels[indices],
        memory.pseudo_labels,
        indices,
        s.temperature,
        negatives_used=instances_used,
        shards=s.instance_shards,
    )
    total = cluster + s.instance_weight * instance
    return total, {"loss_cluster": cluster, "loss_instance": instance}


def cap_loss(f, memory: ClusterMemory, indices, cams, s: LossSettings):
    """Intra-camera NCE over the sample's camera's proxies + inter-camera term."""
    targets = memory.rows[indices]
    same_camera = memory.valid[None, :] & (memory.row_camera[None, :] == cams[:, None])
    intra = masked_nce(f, memory.prototypes, same_camera, targets, s.temperature)
    inter = cap_inter_camera_loss(
        f,
        memory,
        memory.pseudo_labels[indices],
        s.temperature,
        s.num_hard_negatives,
        # Own-camera proxies only: the other cameras' proxies of other
        # clusters are mostly the sample's identity seen elsewhere.
        negatives_used=same_camera if s.camera_negatives else None,
    )
    return intra + s.inter_camera_weight * inter, {"loss_intra": intra, "loss_inter": inter}


@dataclasses.dataclass(frozen=True)
class Kind:
    """One member of the family: its memory rows, its loss, whether it keeps
    an instance bank (updated with `method.instance_momentum`)."""

    rows: Callable
    loss: Callable
    instance_bank: bool = False


KIND_RECORDS: dict[str, Kind] = {
    "cluster_contrast": Kind(cluster_rows, cluster_nce_loss),
    "self_paced": Kind(outlier_rows, cluster_nce_loss),
    "cap": Kind(camera_proxy_rows, cap_loss),
    "hhcl": Kind(cluster_rows, hhcl_loss, instance_bank=True),
    "joint": Kind(cluster_rows, joint_loss, instance_bank=True),
}
KINDS = tuple(KIND_RECORDS)


def _kind(kind: str) -> Kind:
    if kind not in KIND_RECORDS:
        raise ValueError(f"unknown cluster method {kind!r}; one of {KINDS}")
    return KIND_RECORDS[kind]


def cluster_loss(
    kind: str,
    outputs: dict[str, jax.Array],
    memory: ClusterMemory,
    indices: jax.Array,
    cams: jax.Array,
    **settings,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of method `kind` for a batch (pure; memory is constant).
    `settings`: the fields of LossSettings."""
    return _kind(kind).loss(outputs["global"], memory, indices, cams, LossSettings(**settings))


def update_cluster_memory(
    kind: str,
    memory: ClusterMemory,
    features: jax.Array,
    indices: jax.Array,
    *,
    momentum: float,
    mode: str,
    instance_momentum: float,
) -> ClusterMemory:
    """Momentum updates after a step: each row pulled by its batch samples
    (`centroids.update_centroids` with `mode`), and for hhcl / joint the
    instance rows of the batch images (segment mean over repeats). Samples
    with a negative index write nothing."""
    f = jax.lax.stop_gradient(features).astype(jnp.float32)
    write = indices >= 0
    targets = jnp.where(write, memory.rows[indices], -1)
    prototypes = update_centroids(memory.prototypes, f, targets, momentum, mode)
    instances = memory.instances
    if _kind(kind).instance_bank:
        rows = jnp.where(write, indices, -1)
        instances = update_centroids(instances, f, rows, instance_momentum, "mean")
    return memory.replace(prototypes=prototypes, instances=instances)


# ---------------------------------------------------------------- the method


class ClusteringError(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class EpochClustering:
    """One epoch's clustering of the training set (`cluster_training_set`)."""

    features: np.ndarray  # (N, D) eval-mode global features it clustered
    labels: np.ndarray  # (N,) the labels that train (camera filter applied), -1 outlier
    # (G, N) DBSCAN labels at each of `eps_values` (row 0: the training eps),
    # before the camera filter.
    granularities: np.ndarray
    eps_values: tuple[float, ...]
    stats: dict[str, float]


def cluster_training_set(
    config: ml_collections.ConfigDict,
    train: TrainSet,
    epoch: int,
    eps_offsets: tuple[float, ...] = (),
    previous_labels: np.ndarray | None = None,
) -> EpochClustering:
    """Extracts the training set (eval mode, no augmentation) and clusters it
    at the epoch's eps (and at eps + each of `eps_offsets`, on the same
    Jaccard distance); the camera filter (`cluster.min_cameras`) applies to
    the training labels. A ClusteringError when they are degenerate
    (`degenerate_clustering`) or cannot fill a batch. With
    `cluster.algorithm = "bottom_up"` the labels come from merging
    (jaxreid.pseudo_labels.bottom_up), continuing from `previous_labels`
    (the last epoch's) when given."""
    from jaxreid.pseudo_labels import bottom_up, clustering

    start = time.time()
    features = train.extract()
    extracted = time.time()
    cluster = ml_collections.ConfigDict(config.cluster.to_dict())
    cluster.eps = clustering.epoch_eps(
        cluster.eps, cluster.get("final_eps", 0.0), epoch, config.train.epochs
    )
    eps_values = (float(cluster.eps), *(float(cluster.eps + o) for o in eps_offsets))
    merge_stats = {}
    if cluster.get("algorithm", "dbscan") == "bottom_up":
        if eps_offsets:
            raise ClusteringError(
                "cluster.algorithm = 'bottom_up' gives one granularity; this method clusters "
                "at several eps values: set cluster.algorithm = 'dbscan'"
            )
        merged = features["global"]
        if cluster.camera_centering:
            merged = clustering.camera_centered(merged, train.cameras)
        labels, merge_stats = bottom_up.epoch_labels(merged, previous_labels, epoch, cluster)
        granularities = labels[None]
    else:
        granularities = clustering.multi_eps_labels(
            features["global"], list(eps_values), cluster, cameras=train.cameras
        )
    min_cameras = int(cluster.get("min_cameras", 1))
    labels, removed = clustering.camera_filter(granularities[0], train.cameras, min_cameras)
    stats = clustering.pseudo_label_stats(labels)
    needed = config.train.batch_size // config.train.num_instances
    problem = degenerate_clustering(stats, needed, cluster.giant_cluster_fraction)
    if problem:
        if merge_stats:
            # Merged too far (outliers come only from the camera filter).
            advice = (
                f"Merge less: lower cluster.merge_percent (now {cluster.merge_percent:g}), "
                f"cluster.merge_rounds (now {cluster.merge_rounds}) or "
                f"cluster.merge_first_rounds (now {cluster.merge_first_rounds}), or raise "
                f"cluster.merge_lambda (now {cluster.merge_lambda:g}) against giant clusters"
            )
        elif stats["num_outliers"] > stats["num_samples"] / 2:
            # Mostly outliers: the neighbourhoods are too tight.
            advice = (
                f"Raise cluster.eps (now {cluster.eps:g}) or lower cluster.min_samples "
                f"(now {cluster.min_samples})"
            )
        else:
            # Few, large clusters: neighbourhoods merge different people.
            advice = (
                f"Lower cluster.eps (now {cluster.eps:g}; 0.5-0.6 is usual) or raise "
                f"cluster.min_samples (now {cluster.min_samples})"
            )
        if removed["removed_clusters"]:
            advice += (
                f"; the camera filter made {removed['removed_clusters']} single-camera "
                f"clusters outliers: lower cluster.min_cameras (now {min_cameras}; 1 = off)"
            )
        raise ClusteringError(
            f"epoch {epoch + 1}: clustering gave {stats['num_clusters']} clusters (largest "
            f"{stats['largest_cluster']}) and {stats['num_outliers']} outliers of "
            f"{stats['num_samples']} images: {problem}; training on it would learn nothing. "
            + advice
        )
    stats = {
        "eps": cluster.eps,
        "num_clusters": stats["num_clusters"],
        "outlier_fraction": stats["outlier_fraction"],
        "largest_cluster": stats["largest_cluster"],
        "extract_s": extracted - start,
        "cluster_s": time.time() - extracted,
    }
    if merge_stats:
        stats["merges"] = merge_stats["merges"]
        stats["merges_wanted"] = merge_stats["merges_wanted"]
    if min_cameras > 1:
        stats["camera_filter_clusters"] = removed["removed_clusters"]
        stats["camera_filter_images"] = removed["removed_images"]
    return EpochClustering(features["global"], labels, granularities, eps_values, stats)


def clustering_summary(epoch: int, stats: dict[str, float]) -> str:
    """The epoch's log line of `cluster_training_set`'s stats."""
    grouping = (
        f"bottom-up {stats['merges']} merges" if "merges" in stats else f"eps {stats['eps']:.3f}"
    )
    line = (
        f"epoch {epoch + 1}: {grouping}, {stats['num_clusters']} clusters, "
        f"{100 * stats['outlier_fraction']:.1f}% outliers, largest "
        f"{stats['largest_cluster']} (extract {stats['extract_s']:.1f}s, "
        f"cluster {stats['cluster_s']:.1f}s)"
    )
    if "camera_filter_clusters" in stats:
        line += (
            f"; camera filter: {stats['camera_filter_clusters']} single-camera clusters "
            f"({stats['camera_filter_images']} images) made outliers"
        )
    return line


def partial_extraction(
    train: TrainSet, memory: ClusterMemory, fraction: float, *, seed: int, epoch: int
) -> tuple[TrainSet, dict[str, float]]:
    """(training set, stats) that epoch `epoch` clusters, for
    method.extract_fraction = `fraction`. Below 1, from epoch 1 on (at epoch 0
    the bank is still a placeholder), `train` whose extraction runs the model
    on round(fraction N) images only, a random subset drawn from (seed, epoch),
    and takes every other image's feature from the instance bank (its latest
    training feature, or its last extracted one); the stats record the
    fraction extracted. At 10^6 images a full extraction is most of an epoch's
    host time; the bank is part of the checkpoint, so a resumed run draws and
    mixes the same features. At 1: `train` and no stats."""
    if fraction >= 1.0:
        return train, {}
    if epoch == 0:
        return train, {"extracted_fraction": 1.0}
    n = train.num_images
    rows = np.random.default_rng([seed, epoch]).choice(n, max(1, round(fraction * n)), False)
    rows.sort()

    def extract(subset: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if subset is not None:
            raise ValueError("partial_extraction: a subset of a partial extraction")
        features = np.array(memory.instances[:n], np.float32)  # without padding rows
        features[rows] = train.extract(rows)["global"]
        return {"global": features}

    return dataclasses.replace(train, extract=extract), {"extracted_fraction": fraction}


def recluster(
    kind: str,
    config: ml_collections.ConfigDict,
    train: TrainSet,
    epoch: int,
    previous_labels: np.ndarray | None = None,
    layout: str = "images",
    dtype: str = "float32",
    instance_shards: int = 0,
) -> tuple[ClusterMemory, np.ndarray, dict[str, float]]:
    """`cluster_training_set` and the memory of `kind` built from its labels
    (`build_memory`'s `layout`, `dtype` and `instance_shards`): (memory,
    labels, stats)."""
    result = cluster_training_set(config, train, epoch, previous_labels=previous_labels)
    memory = build_memory(
        kind, result.features, train.cameras, result.labels, layout, dtype, instance_shards
    )
    return memory, result.labels, result.stats


def check_neighbour_sizes(config: ml_collections.ConfigDict, num_images: int) -> None:
    """A ClusteringError when a k-reciprocal list size is not below the number
    of training images (known once the data is read)."""
    keys = ("k1_intra", "k1_inter") if config.cluster.camera_aware_jaccard else ("k1",)
    if config.cluster.get("algorithm", "dbscan") == "bottom_up":
        keys = ()  # no k-reciprocal lists; merge_k is clipped to the set
    for key in keys:
        if config.cluster[key] >= num_images:
            raise ClusteringError(
                f"cluster.{key} = {config.cluster[key]}: the training set has {num_images} "
                f"images; a neighbour list must be shorter: lower cluster.{key} (below "
                f"{num_images}; 30 suits thousands of images)"
            )


def degenerate_clustering(stats: dict, needed: int, giant_fraction: float) -> str:
    """Why a clustering (pseudo_label_stats) must not be trained on, or "": no
    cluster, one cluster holding more than `giant_fraction` of the images
    (cluster.giant_cluster_fraction), or fewer clusters than the `needed`
    pseudo-identities of a batch."""
    if stats["num_clusters"] == 0:
        return "every image is an outlier"
    if stats["largest_cluster"] > giant_fraction * stats["num_samples"]:
        return (
            f"one cluster holds {stats['largest_cluster']} images, more than "
            f"cluster.giant_cluster_fraction = {giant_fraction:g} of them"
        )
    if stats["num_clusters"] < needed:
        return f"a batch needs {needed} pseudo-identities (train.batch_size / train.num_instances)"
    return ""


def cluster_settings(kind: str) -> dict:
    """The settings of family member `kind`, at the published implementations'
    values (cluster-family.md): ClusterNCE at temperature 0.05, prototypes
    updated with momentum 0.1 (the weight of the old prototype) by the batch
    mean. The instance-bank members (hhcl, joint) also have extract_fraction:
    at each re-clustering after the first, extract only this fraction of the
    training images (`partial_extraction`) and take the rest from the bank;
    1.0 (the published recipe) extracts every image every epoch. And
    instance_shards: 0 keeps the whole bank on every device; K > 0 stores it
    in K equal row chunks spread over the devices (K a multiple of the device
    count), each device holding N / devices rows instead of N; the run's bits
    are then the same on any device count dividing K, and differ in the last
    bits from K = 0's (parallel.row_sharded_similarities)."""
    settings = dict(
        temperature=0.05,
        momentum=0.1,
        memory_update="mean",  # mean | hard | sequential (methods/centroids.py)
        # Contrast each sample only with memory rows of its own camera (besides
        # its positives); cap's inter-camera term takes its hard negatives there.
        camera_negatives=False,
        # Prototype table rows: buckets | images (table_rows; same loss).
        prototype_table="buckets",
        # Storage of prototypes and instance bank: float32 | bfloat16 (half the
        # memory; the rows are rounded to bfloat16).
        memory_dtype="float32",
    )
    settings.update(
        {
            "cluster_contrast": dict(),
            "self_paced": dict(momentum=0.2),
            "cap": dict(
                temperature=0.07, momentum=0.2, inter_camera_weight=0.5, num_hard_negatives=50
            ),
            # The release's instance-level form (CMhybrid_v2; its run.sh trains
            # the centroid-only CMhybrid): the hard cluster-level instance term
            # at equal weight, instance rows replaced by their latest feature.
            "hhcl": dict(
                instance_weight=1.0,
                instance_momentum=0.0,
                # Weight of a ClusterNCE whose positive is the mean of the sample's
                # cluster's instances from the other cameras (cross_camera_loss).
                cross_camera_weight=0.0,
                extract_fraction=1.0,
                instance_shards=0,
            ),
            "joint": dict(
                instance_weight=0.5, instance_momentum=0.2, extract_fraction=1.0, instance_shards=0
            ),
        }[kind]
    )
    return settings


def cluster_problems(config: ml_collections.ConfigDict) -> list[str]:
    m = config.method
    problems = pk_sampler_problems(config)
    problems += number_problems(
        config,
        ("method.temperature", 0, None, "()", "0.05 is usual"),
        ("method.momentum", 0, 1, "[]", "the old prototype's weight; 0.1 is usual"),
        *[("method.instance_momentum", 0, 1, "[]")] * ("instance_momentum" in m),
        *[("method.extract_fraction", 0, 1, "(]", "1.0 extracts every image")]
        * ("extract_fraction" in m),
        *[
            (f"method.{key}", 0, None, "[)")
            for key in ("instance_weight", "inter_camera_weight", "cross_camera_weight")
            if key in m
        ],
    )
    problems += choice_problems(config, ("method.memory_update", UPDATE_MODES))
    if "prototype_table" in m:
        problems += choice_problems(config, ("method.prototype_table", TABLE_LAYOUTS))
    if "memory_dtype" in m:
        problems += choice_problems(config, ("method.memory_dtype", MEMORY_DTYPES))
    shards = m.get("instance_shards", 0)
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 0:
        problems.append(
            f"method.instance_shards = {shards!r}: must be a whole number >= 0 (0 = the whole "
            "instance bank on every device; K = K row chunks shared by the devices)"
        )
    elif shards and m.get("cross_camera_weight", 0.0):
        problems.append(
            f"method.instance_shards = {shards}: the cross-camera term (method."
            "cross_camera_weight) reads the whole bank on every device; set "
            "method.instance_shards = 0 or method.cross_camera_weight = 0"
        )
    min_cameras = config.cluster.get("min_cameras", 1)
    if isinstance(min_cameras, bool) or not isinstance(min_cameras, int) or min_cameras < 1:
        problems.append(
            f"cluster.min_cameras = {min_cameras!r}: must be a whole number >= 1 (1 = keep "
            "every cluster; 2 = clusters seen by one camera become outliers)"
        )
    return problems


def warn_cpu_bfloat16(dtype: str) -> None:
    """A warning when a bfloat16 memory trains on the CPU: XLA's CPU backend
    widens the table to float32 for every product, so the step is slower
    (1.1-1.4x) and its peak memory higher than with a float32 memory
    (training_speed.md); bfloat16 memories are for accelerators."""
    if dtype == "bfloat16" and jax.default_backend() == "cpu":
        logging.warning(
            "method.memory_dtype = bfloat16 on the CPU: XLA widens the memory to float32 for "
            "each product, so steps are slower and peak memory higher than with float32; "
            "use method.memory_dtype = float32 here (bfloat16 is for GPUs / TPUs)"
        )


def cluster_method(config: ml_collections.ConfigDict) -> Method:
    """The clustering family (cluster-family.md): re-cluster at every epoch
    start, P x K batches over the pseudo-labels, `config.method.name` one of
    KINDS."""
    m = config.method
    kind = m.name
    fields = {f.name for f in dataclasses.fields(LossSettings)}
    settings = LossSettings(**{k: v for k, v in m.items() if k in fields})
    shards = m.get("instance_shards", 0)  # hhcl / joint only

    def memory_specs(memory: ClusterMemory) -> ClusterMemory:
        # The instance bank's rows spread over the devices; the rest on each.
        specs = jax.tree.map(lambda _: P(), memory)
        return specs.replace(instances=P(parallel.AXIS)) if shards else specs

    def init_memory(train: TrainSet) -> ClusterMemory:
        check_neighbour_sizes(config, train.num_images)  # before any work
        warn_cpu_bfloat16(m.memory_dtype)
        # A placeholder of the right shapes; the first epoch's clustering fills it.
        dim = train.output_shapes["global"]
        placeholder = np.zeros((train.num_images, *dim), np.float32)
        unlabelled = np.full(train.num_images, -1)
        return build_memory(
            kind, placeholder, train.cameras, unlabelled, m.prototype_table, m.memory_dtype, shards
        )

    def start_epoch(epoch: int, train: TrainSet, memory, resumed: bool) -> EpochPlan:
        if resumed:  # the checkpoint's memory holds this epoch's clustering
            return EpochPlan(sampler_labels=np.asarray(memory.pseudo_labels))
        # Bottom-up merging continues from the last epoch's clusters.
        previous = np.asarray(memory.pseudo_labels)
        fraction = float(m.get("extract_fraction", 1.0))
        train, extraction = partial_extraction(
            train, memory, fraction, seed=config.seed, epoch=epoch
        )
        memory, labels, stats = recluster(
            kind, config, train, epoch, previous, m.prototype_table, m.memory_dtype, shards
        )
        stats.update(extraction)
        return EpochPlan(
            memory=memory,
            # Outliers are never drawn. self_paced keeps them in its memory as
            # one-image classes (negatives for every sample), refreshed at each
            # re-clustering: drawing them made batches of K copies of one image
            # (mAP 7.6 vs 9.5 after 40 steps on the synthetic test set).
            sampler_labels=np.asarray(memory.pseudo_labels),
            stats={f"cluster/{k}": v for k, v in stats.items()},
            summary=clustering_summary(epoch, stats),
            # For benchmarks/pseudo_label_quality.py.
            arrays={"pseudo_labels": labels},
        )

    def loss(outputs, memory: ClusterMemory, batch: Batch, rng, phase):
        record = KIND_RECORDS[kind]
        value, metrics = record.loss(
            outputs["global"], memory, batch.indices, batch.cameras, settings
        )
        return value, None, metrics

    def update(memory: ClusterMemory, outputs, batch: Batch, aux, phase):
        return update_cluster_memory(
            kind,
            memory,
            outputs["global"],
            batch.indices,
            momentum=m.momentum,
            mode=m.memory_update,
            instance_momentum=m.get("instance_momentum", 0.0),  # hhcl / joint only
        )

    return Method(
        kind,
        init_memory,
        start_epoch,
        loss,
        update,
        feature_keys=("global",),
        problems=cluster_problems,
        memory_specs=memory_specs,
    )


for _kind_name in KINDS:
    register(_kind_name, settings=functools.partial(cluster_settings, _kind_name))(cluster_method)
