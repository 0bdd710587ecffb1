"""Clustering family: memories, losses (value and gradient against NumPy loops
written from the docstrings), momentum updates and gradient edge cases."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cluster_config, unit

from jaxreid.methods import TrainSet, get_method
from jaxreid.methods import cluster as cluster_methods
from jaxreid.methods.cluster import KINDS
from jaxreid.validate import config_problems

# ------------------------------------------------------------------ helpers


unit64 = functools.partial(unit, dtype=np.float64)  # the references in float64


def _lse(z):
    z = np.asarray(z, np.float64)
    top = z.max()
    return top + np.log(np.sum(np.exp(z - top)))


def _to_jax(memory):
    return jax.tree.map(jnp.asarray, memory)


def _np_memory(memory):
    return {
        name: np.asarray(getattr(memory, name))
        for name in (
            "prototypes",
            "valid",
            "row_cluster",
            "row_camera",
            "rows",
            "pseudo_labels",
            "cameras",
            "instances",
        )
    }


def _finite_difference(fn, f, entries, eps=1e-3):
    out = []
    for i, j in entries:
        up, down = f.astype(np.float64), f.astype(np.float64)
        up[i, j] += eps
        down[i, j] -= eps
        out.append((fn(up) - fn(down)) / (2 * eps))
    return np.array(out)


# Hand-made case: 8 images in 4-D, 3 cameras, 2 clusters, 2 outliers (3 and 6).
HAND_LABELS = np.array([0, 1, 0, -1, 1, 0, -1, 1])
HAND_CAMERAS = np.array([0, 0, 1, 1, 2, 0, 2, 0])
# Expected per kind: (rows of the images, row_cluster of the used rows, row_camera of them).
HAND_EXPECTED = {
    "cluster_contrast": ([0, 1, 0, -1, 1, 0, -1, 1], [0, 1], None),
    "hhcl": ([0, 1, 0, -1, 1, 0, -1, 1], [0, 1], None),
    "joint": ([0, 1, 0, -1, 1, 0, -1, 1], [0, 1], None),
    # Outliers 3 and 6 get their own rows 2 and 3 (ids after the clusters).
    "self_paced": ([0, 1, 0, 2, 1, 0, 3, 1], [0, 1, 2, 3], None),
    # Proxies (cluster, camera), cluster-major: (0,0) (0,1) (1,0) (1,2).
    "cap": ([0, 2, 1, -1, 3, 0, -1, 2], [0, 0, 1, 1], [0, 1, 0, 2]),
}


def _hand_features():
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.7, 2.5, 4.0])[:, None]
    return (rng.normal(size=(8, 4)) * scale).astype(np.float32)


# ------------------------------------------------------------- build_memory


@pytest.mark.parametrize("kind", KINDS)
def test_build_memory_hand_made_case(kind):
    features = _hand_features()
    memory = cluster_methods.build_memory(kind, features, HAND_CAMERAS, HAND_LABELS)
    rows, used_clusters, used_cameras = HAND_EXPECTED[kind]
    n, d = features.shape
    r = len(used_clusters)

    assert np.asarray(memory.prototypes).shape == (n, d)
    assert np.asarray(memory.prototypes).dtype == np.float32
    for name in ("valid", "row_cluster", "row_camera", "rows", "pseudo_labels", "cameras"):
        assert np.asarray(getattr(memory, name)).shape == (n,), name
    np.testing.assert_array_equal(memory.rows, rows)
    np.testing.assert_array_equal(memory.valid, np.arange(n) < r)
    assert int(np.sum(memory.valid)) == r
    np.testing.assert_array_equal(memory.row_cluster, used_clusters + [-1] * (n - r))
    expected_cameras = [-1] * n if used_cameras is None else used_cameras + [-1] * (n - r)
    np.testing.assert_array_equal(memory.row_camera, expected_cameras)
    np.testing.assert_array_equal(memory.pseudo_labels, HAND_LABELS)
    np.testing.assert_array_equal(memory.cameras, HAND_CAMERAS)

    # Prototype of a row: normalised mean of the normalised features of its images.
    unit = unit64(features)
    expected = np.zeros((n, d))
    for row in range(r):
        members = [i for i in range(n) if rows[i] == row]
        assert members, row
        expected[row] = unit64(np.mean(unit[members], axis=0))
    np.testing.assert_allclose(memory.prototypes, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(memory.prototypes[:r], axis=1), 1.0, rtol=1e-5)
    if kind == "self_paced":  # an outlier's row is its own normalised feature
        np.testing.assert_allclose(memory.prototypes[2], unit[3], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(memory.prototypes[3], unit[6], rtol=1e-5, atol=1e-6)

    if kind in ("hhcl", "joint"):
        np.testing.assert_allclose(memory.instances, unit, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(memory.instances, np.zeros((1, d)))
    assert np.asarray(memory.instances).dtype == np.float32


@pytest.mark.parametrize("kind", ["cluster_contrast", "cap", "hhcl", "joint"])
def test_build_memory_all_outliers_is_empty(kind):
    features = _hand_features()
    memory = cluster_methods.build_memory(kind, features, HAND_CAMERAS, np.full(8, -1))
    assert not np.any(memory.valid)
    np.testing.assert_array_equal(memory.rows, -1)
    np.testing.assert_array_equal(memory.row_cluster, -1)
    np.testing.assert_array_equal(memory.row_camera, -1)
    np.testing.assert_array_equal(memory.prototypes, np.zeros((8, 4)))
    assert np.asarray(memory.prototypes).shape == (8, 4)


def test_build_memory_all_outliers_self_paced_gives_one_row_per_image():
    features = _hand_features()
    memory = cluster_methods.build_memory("self_paced", features, HAND_CAMERAS, np.full(8, -1))
    np.testing.assert_array_equal(memory.rows, np.arange(8))
    assert np.all(memory.valid)
    np.testing.assert_allclose(memory.prototypes, unit64(features), atol=1e-6)


def test_build_memory_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown cluster method"):
        cluster_methods.build_memory("dbscan", _hand_features(), HAND_CAMERAS, HAND_LABELS)


# -------------------------------------------------- NumPy transcriptions


def _np_masked_nce(f, prototypes, row_mask, targets, tau):
    f = unit64(f)
    mask = np.broadcast_to(np.asarray(row_mask, bool), (len(f), len(prototypes)))
    losses = []
    for i in range(len(f)):
        if targets[i] < 0:
            continue
        z = f[i] @ np.asarray(prototypes, np.float64).T / tau
        losses.append(_lse(z[mask[i]]) - z[targets[i]])
    return float(np.mean(losses)) if losses else 0.0


def _np_cap_intra(f, m, indices, cams, tau):
    # Softmax only over the proxies of the sample's camera.
    f = unit64(f)
    losses = []
    for i in range(len(f)):
        t = m["rows"][indices[i]]
        if t < 0:
            continue
        z = f[i] @ m["prototypes"].astype(np.float64).T / tau
        same_camera = [r for r in range(len(z)) if m["valid"][r] and m["row_camera"][r] == cams[i]]
        assert t in same_camera
        losses.append(_lse(z[same_camera]) - z[t])
    return float(np.mean(losses)) if losses else 0.0


def _np_cap_inter(f, m, clusters, tau, k, cams=None):
    """cams given: hard negatives only among the proxies of the sample's camera."""
    f = unit64(f)
    losses = []
    for i in range(len(f)):
        y = clusters[i]
        if y < 0:
            continue
        s = f[i] @ m["prototypes"].astype(np.float64).T / tau
        pos = [r for r in range(len(s)) if m["valid"][r] and m["row_cluster"][r] == y]
        if not pos:
            continue
        neg = [r for r in range(len(s)) if m["valid"][r] and m["row_cluster"][r] != y]
        if cams is not None:
            neg = [r for r in neg if m["row_camera"][r] == cams[i]]
        hard = sorted(neg, key=lambda r: -s[r])[:k]  # the k most similar of other clusters
        denominator = _lse(np.concatenate([s[pos], s[hard]]))
        losses.append(-np.mean([s[p] - denominator for p in pos]))
    return float(np.mean(losses)) if losses else 0.0


def _np_hard_instance(f, instances, labels, instance_labels, tau, used=None):
    """The release's CMhybrid_v2 instance term, one cluster at a time: logit of
    the own cluster = its least similar instance, of every other cluster = its
    most similar instance (among those `used[i]` marks)."""
    f = unit64(f)
    clusters = sorted({int(c) for c in instance_labels if c >= 0})
    losses = []
    for i in range(len(f)):
        y = labels[i]
        if y < 0:
            continue
        s = f[i] @ np.asarray(instances, np.float64).T / tau
        logits = []
        for c in clusters:
            members = [j for j in range(len(s)) if instance_labels[j] == c]
            if c == y:
                positive = min(s[j] for j in members)
                logits.append(positive)
            else:
                members = [j for j in members if used is None or used[i][j]]
                if members:
                    logits.append(max(s[j] for j in members))
        losses.append(_lse(logits) - positive)
    return float(np.mean(losses)) if losses else 0.0


def _np_multi_positive(f, instances, labels, instance_labels, indices, tau):
    f = unit64(f)
    losses = []
    for i in range(len(f)):
        s = f[i] @ np.asarray(instances, np.float64).T / tau
        log_p = s - _lse(s)
        if labels[i] >= 0:
            pos = [j for j in range(len(s)) if instance_labels[j] == labels[i]]
        else:
            pos = [indices[i]]  # an outlier's positive is itself
        losses.append(-np.mean(log_p[pos]))
    return float(np.mean(losses))


def _np_cluster_loss(kind, f, m, indices, cams, tau, instance_weight, inter_weight, k):
    """(total, parts) of `cluster_loss` from the definitions."""
    targets = m["rows"][indices]
    labels = m["pseudo_labels"][indices]
    if kind == "cap":
        intra = _np_cap_intra(f, m, indices, cams, tau)
        inter = _np_cap_inter(f, m, labels, tau, k)
        return intra + inter_weight * inter, {"loss_intra": intra, "loss_inter": inter}
    cluster = _np_masked_nce(f, m["prototypes"], m["valid"], targets, tau)
    if kind in ("cluster_contrast", "self_paced"):
        return cluster, {"loss_cluster": cluster}
    if kind == "hhcl":
        instance = _np_hard_instance(f, m["instances"], labels, m["pseudo_labels"], tau)
    else:
        instance = _np_multi_positive(f, m["instances"], labels, m["pseudo_labels"], indices, tau)
    total = cluster + instance_weight * instance
    return total, {"loss_cluster": cluster, "loss_instance": instance}


# ------------------------------------------------------------------ losses

# 12 images in 5-D, 3 clusters over 3 cameras, 2 outliers (7 and 10).
LABELS = np.array([0, 0, 1, 1, 1, 2, 2, -1, 0, 2, -1, 1])
CAMERAS = np.array([0, 1, 0, 1, 2, 0, 2, 1, 2, 1, 0, 0])
INDICES = np.array([0, 3, 7, 5, 8, 10])  # batch: outliers at positions 2 and 5
TAU = 0.3
PARAMS = {"instance_weight": 0.7, "inter_camera_weight": 0.4, "num_hard_negatives": 2}
ENTRIES = [(0, 0), (1, 3), (2, 1), (3, 4), (4, 2), (5, 0)]


def _case(kind, seed=3):
    rng = np.random.default_rng(seed)
    bank = rng.normal(size=(12, 5)).astype(np.float32)
    memory = cluster_methods.build_memory(kind, bank, CAMERAS, LABELS)
    f = rng.normal(size=(len(INDICES), 5)).astype(np.float32)
    return f, memory


def _jax_loss(kind, memory, indices, cams, params=PARAMS, tau=TAU):
    memory = _to_jax(memory)

    def loss(f, prototypes, instances):
        mem = memory.replace(prototypes=prototypes, instances=instances)
        return cluster_methods.cluster_loss(
            kind,
            {"global": f},
            mem,
            jnp.asarray(indices),
            jnp.asarray(cams),
            temperature=tau,
            **params,
        )

    return memory, loss


def test_table_rows_are_the_power_of_two_at_or_above_the_rows_in_use():
    rows = [cluster_methods.table_rows(r, 100, "buckets") for r in (0, 1, 2, 3, 4, 5, 64, 65, 99)]
    assert rows == [1, 1, 2, 4, 4, 8, 64, 100, 100]  # never above the images
    assert cluster_methods.table_rows(3, 100, "images") == 100
    with pytest.raises(ValueError, match="buckets, images|'buckets', 'images'"):
        cluster_methods.table_rows(3, 100, "dense")


@pytest.mark.parametrize("camera_negatives", [False, True], ids=["all", "own_camera"])
@pytest.mark.parametrize("kind", KINDS)
def test_bucketed_table_gives_the_loss_gradient_and_update_of_the_image_table(
    kind, camera_negatives
):
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(12, 5)).astype(np.float32)
    f = jnp.asarray(rng.normal(size=(len(INDICES), 5)).astype(np.float32))
    params = {**PARAMS, "camera_negatives": camera_negatives}
    results = {}
    for layout in ("images", "buckets"):
        memory = cluster_methods.build_memory(kind, bank, CAMERAS, LABELS, layout)
        memory, loss = _jax_loss(kind, memory, INDICES, CAMERAS[INDICES], params=params)
        (value, parts), grad = jax.value_and_grad(loss, has_aux=True)(
            f, memory.prototypes, memory.instances
        )
        used = int(np.sum(memory.valid))
        updated = cluster_methods.update_cluster_memory(
            kind, memory, f, jnp.asarray(INDICES), momentum=0.2, mode="mean", instance_momentum=0.3
        )
        results[layout] = (value, parts, grad, updated, used, memory.prototypes.shape[0])
    value, parts, grad, updated, used, rows = results["images"]
    b_value, b_parts, b_grad, b_updated, b_used, b_rows = results["buckets"]
    # 3 clusters -> 4 rows; self_paced's 3 + 2 outliers -> 8; cap's 9 proxies -> 16,
    # capped at the 12 images.
    expected_rows = {"self_paced": 8, "cap": 12}.get(kind, 4)
    assert (rows, b_rows, b_used) == (12, expected_rows, used)
    np.testing.assert_allclose(float(b_value), float(value), rtol=1e-6)
    for name in parts:
        np.testing.assert_allclose(float(b_parts[name]), float(parts[name]), rtol=1e-6)
    np.testing.assert_allclose(b_grad, grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b_updated.prototypes[:used], updated.prototypes[:used], rtol=1e-6)
    np.testing.assert_array_equal(b_updated.instances, updated.instances)
    assert float(value) > 0 and np.abs(np.asarray(grad)).max() > 0


@pytest.mark.parametrize("camera_negatives", [False, True], ids=["all", "own_camera"])
@pytest.mark.parametrize("kind", ["hhcl", "joint"])
def test_sharded_instance_bank_gives_the_loss_gradient_and_update_of_the_whole_bank(
    kind, camera_negatives
):
    # method.instance_shards = 5 on one device: the bank padded to 15 rows in
    # 5 chunks, the loss inside a shard_map as the train step runs it.
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(4)
    bank = rng.normal(size=(12, 5)).astype(np.float32)
    f = jnp.asarray(rng.normal(size=(len(INDICES), 5)).astype(np.float32))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    results = {}
    for shards in (0, 5):
        params = {**PARAMS, "camera_negatives": camera_negatives, "instance_shards": shards}
        memory = cluster_methods.build_memory(
            kind, bank, CAMERAS, LABELS, "buckets", instance_shards=shards
        )
        memory, loss = _jax_loss(kind, memory, INDICES, CAMERAS[INDICES], params=params)

        def value_and_grad(f, memory, loss=loss):
            (value, _), grad = jax.value_and_grad(loss, has_aux=True)(
                f, memory.prototypes, memory.instances
            )
            return value, grad

        specs = jax.tree.map(lambda _: P(), memory)
        specs = specs.replace(instances=P("data")) if shards else specs
        value, grad = jax.jit(
            jax.shard_map(
                value_and_grad,
                mesh=mesh,
                in_specs=(P(), specs),
                out_specs=P(),
                check_vma=False,
            )
        )(f, memory)
        updated = cluster_methods.update_cluster_memory(
            kind, memory, f, jnp.asarray(INDICES), momentum=0.2, mode="mean", instance_momentum=0.3
        )
        results[shards] = (value, grad, updated.instances, memory.instances.shape[0])
    value, grad, instances, rows = results[0]
    s_value, s_grad, s_instances, s_rows = results[5]
    assert (rows, s_rows) == (12, 15)
    np.testing.assert_allclose(float(s_value), float(value), rtol=1e-6)
    # The chunked gradient sums in another order: equal to float32 rounding.
    np.testing.assert_allclose(s_grad, grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s_instances[:12], instances)
    np.testing.assert_array_equal(s_instances[12:], 0.0)  # the padding is never written
    assert float(value) > 0 and np.abs(np.asarray(grad)).max() > 0


def test_instance_shards_problems_name_the_setting_and_the_fix():
    config = cluster_config("/nowhere", "hhcl")
    config.method.instance_shards = -2
    assert any("method.instance_shards = -2" in p for p in config_problems(config))
    config.method.instance_shards, config.method.cross_camera_weight = 4, 0.5
    problems = config_problems(config)
    assert any("method.cross_camera_weight = 0" in p for p in problems), problems
    config.method.cross_camera_weight = 0.0
    assert not any("instance_shards" in p for p in config_problems(config))


def test_memory_similarities_of_a_float32_table_are_the_plain_product():
    rng = np.random.default_rng(0)
    f = jnp.asarray(rng.normal(size=(6, 40)).astype(np.float32))
    table = jnp.asarray(rng.normal(size=(33, 40)).astype(np.float32))
    np.testing.assert_array_equal(cluster_methods.memory_similarities(f, table), f @ table.T)
    half = cluster_methods.memory_similarities(f, table.astype(jnp.bfloat16))
    assert half.dtype == jnp.float32
    # Products of bfloat16-rounded operands, float32 sums.
    rounded = (
        np.asarray(f.astype(jnp.bfloat16), np.float32)
        @ np.asarray(table.astype(jnp.bfloat16), np.float32).T
    )
    np.testing.assert_allclose(half, rounded, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(half) - np.asarray(f @ table.T)).max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_memory_is_stored_in_bfloat16_and_trains_like_float32(kind):
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(12, 64)).astype(np.float32)
    f = jnp.asarray(rng.normal(size=(len(INDICES), 64)).astype(np.float32))
    params = {**PARAMS, "cross_camera_weight": 0.5} if kind == "hhcl" else PARAMS
    results = {}
    for dtype in ("float32", "bfloat16"):
        memory = cluster_methods.build_memory(kind, bank, CAMERAS, LABELS, "buckets", dtype)
        memory, loss = _jax_loss(kind, memory, INDICES, CAMERAS[INDICES], params=params)
        (value, _), grad = jax.value_and_grad(loss, has_aux=True)(
            f, memory.prototypes, memory.instances
        )
        updated = cluster_methods.update_cluster_memory(
            kind, memory, f, jnp.asarray(INDICES), momentum=0.2, mode="mean", instance_momentum=0.3
        )
        results[dtype] = (memory, value, grad, updated)
    memory, value, grad, updated = results["float32"]
    h_memory, h_value, h_grad, h_updated = results["bfloat16"]
    for name in ("prototypes", "instances"):
        assert getattr(h_memory, name).dtype == getattr(h_updated, name).dtype == jnp.bfloat16
        # Built: the float32 rows rounded; updated from its rounded rows: within
        # bfloat16's resolution of the float32 update.
        np.testing.assert_array_equal(
            getattr(h_memory, name), getattr(memory, name).astype(jnp.bfloat16)
        )
        np.testing.assert_allclose(
            np.asarray(getattr(h_updated, name), np.float32), getattr(updated, name), atol=4e-3
        )
    np.testing.assert_allclose(float(h_value), float(value), rtol=2e-2)
    np.testing.assert_allclose(h_grad, grad, rtol=0.1, atol=0.05 * np.abs(grad).max())


@pytest.mark.parametrize("kind", KINDS)
def test_cluster_loss_value_and_gradient_match_numpy(kind):
    f, memory = _case(kind)
    cams = CAMERAS[INDICES]
    mem, loss = _jax_loss(kind, memory, INDICES, cams)
    m = _np_memory(memory)

    (total, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(f), mem.prototypes, mem.instances
    )
    expected_total, expected_parts = _np_cluster_loss(
        kind,
        f,
        m,
        INDICES,
        cams,
        TAU,
        PARAMS["instance_weight"],
        PARAMS["inter_camera_weight"],
        PARAMS["num_hard_negatives"],
    )
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    assert set(metrics) == set(expected_parts)
    for name, value in expected_parts.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
        assert value > 0, name  # every term is active in this batch
    # The documented combination of the terms.
    if kind == "cap":
        combined = metrics["loss_intra"] + PARAMS["inter_camera_weight"] * metrics["loss_inter"]
    elif kind in ("hhcl", "joint"):
        combined = metrics["loss_cluster"] + PARAMS["instance_weight"] * metrics["loss_instance"]
    else:
        combined = metrics["loss_cluster"]
    np.testing.assert_allclose(total, combined, rtol=1e-6)

    grad_f, grad_prototypes, grad_instances = (np.asarray(g) for g in grads)
    assert np.all(np.isfinite(grad_f))
    assert np.all(grad_prototypes == 0)  # the memory is a constant
    assert np.all(grad_instances == 0)
    if kind != "self_paced" and kind != "joint":
        # Outliers (positions 2 and 5) are skipped by every term of these methods.
        assert np.all(grad_f[[2, 5]] == 0)
        assert np.any(grad_f[[0, 1, 3, 4]] != 0)
    else:  # self_paced: outliers are classes; joint: an outlier's positive is itself
        assert np.all(np.any(grad_f != 0, axis=1))

    def numpy_total(x):
        return _np_cluster_loss(
            kind,
            x,
            m,
            INDICES,
            cams,
            TAU,
            PARAMS["instance_weight"],
            PARAMS["inter_camera_weight"],
            PARAMS["num_hard_negatives"],
        )[0]

    numeric = _finite_difference(numpy_total, f, ENTRIES)
    analytic = np.array([grad_f[i, j] for i, j in ENTRIES])
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-4)


def test_masked_nce_excludes_masked_rows_and_skips_negative_targets():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(5, 4)).astype(np.float32)
    prototypes = unit64(rng.normal(size=(6, 4))).astype(np.float32)
    row_mask = np.array([True, True, False, True, False, True])
    targets = np.array([0, -1, 3, 5, 1])
    # A (B, R) mask: every sample sees a different subset (its target included).
    row_mask_2d = np.ones((5, 6), bool)
    row_mask_2d[0, [2, 4]] = False
    row_mask_2d[2, [0, 1]] = False
    row_mask_2d[3, 3] = False
    row_mask_2d[4, [0, 5]] = False
    for mask in (row_mask, row_mask_2d):
        value, grad_f, grad_p = _masked_nce_value_and_grads(f, prototypes, mask, targets)
        np.testing.assert_allclose(
            value, _np_masked_nce(f, prototypes, mask, targets, 0.5), rtol=1e-5
        )
        assert np.all(grad_p == 0)
        assert np.all(grad_f[1] == 0)  # target -1: skipped
        numeric = _finite_difference(
            lambda x, mask=mask: _np_masked_nce(x, prototypes, mask, targets, 0.5),
            f,
            [(0, 0), (2, 3), (3, 1), (4, 2)],
        )
        analytic = [grad_f[0, 0], grad_f[2, 3], grad_f[3, 1], grad_f[4, 2]]
        np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-4)
    # Masking changes the value (the masked rows really left the softmax).
    unmasked = _masked_nce_value_and_grads(f, prototypes, np.ones(6, bool), targets)[0]
    assert abs(float(unmasked) - _np_masked_nce(f, prototypes, row_mask, targets, 0.5)) > 1e-3


def _masked_nce_value_and_grads(f, prototypes, mask, targets, tau=0.5):
    def loss(x, p):
        return cluster_methods.masked_nce(x, p, jnp.asarray(mask), jnp.asarray(targets), tau)

    value, (grad_f, grad_p) = jax.value_and_grad(loss, argnums=(0, 1))(
        jnp.asarray(f), jnp.asarray(prototypes)
    )
    return value, np.asarray(grad_f), np.asarray(grad_p)


@pytest.mark.parametrize("k", [1, 3, 50])
def test_cap_inter_camera_loss_matches_numpy(k):
    f, memory = _case("cap", seed=5)
    m = _np_memory(memory)
    clusters = LABELS[INDICES]

    def loss(x, p):
        mem = _to_jax(memory).replace(prototypes=p)
        return cluster_methods.cap_inter_camera_loss(x, mem, jnp.asarray(clusters), TAU, k)

    value, (grad_f, grad_p) = jax.value_and_grad(loss, argnums=(0, 1))(
        jnp.asarray(f), jnp.asarray(memory.prototypes)
    )
    np.testing.assert_allclose(value, _np_cap_inter(f, m, clusters, TAU, k), rtol=1e-5)
    assert np.all(np.asarray(grad_p) == 0)
    assert np.all(np.asarray(grad_f)[[2, 5]] == 0)
    numeric = _finite_difference(lambda x: _np_cap_inter(x, m, clusters, TAU, k), f, ENTRIES)
    analytic = np.array([grad_f[i, j] for i, j in ENTRIES])
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("own_camera", [False, True])
def test_hard_instance_loss_matches_numpy(own_camera):
    f, memory = _case("hhcl", seed=6)
    instances = np.asarray(memory.instances)
    labels = LABELS[INDICES]
    used = CAMERAS[None, :] == CAMERAS[INDICES][:, None] if own_camera else None

    def loss(x, bank):
        return cluster_methods.hard_instance_loss(
            x,
            bank,
            jnp.asarray(labels),
            jnp.asarray(LABELS),
            TAU,
            negatives_used=None if used is None else jnp.asarray(used),
        )

    value, (grad_f, grad_i) = jax.value_and_grad(loss, argnums=(0, 1))(
        jnp.asarray(f), jnp.asarray(instances)
    )
    np.testing.assert_allclose(
        value, _np_hard_instance(f, instances, labels, LABELS, TAU, used), rtol=1e-5
    )
    assert np.all(np.asarray(grad_i) == 0)
    assert np.all(np.asarray(grad_f)[[2, 5]] == 0)
    numeric = _finite_difference(
        lambda x: _np_hard_instance(x, instances, labels, LABELS, TAU, used), f, ENTRIES
    )
    analytic = np.array([grad_f[i, j] for i, j in ENTRIES])
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-4)


def test_hard_instance_loss_by_hand():
    """Two clusters in 2-D, tau 1: the sample (1, 0) of cluster 0 sees its
    hardest positive at cos 0 and cluster 1's most similar instance at cos 0.6;
    the outlier instance (1, 0) takes no part: loss = log(e^0 + e^0.6) - 0."""
    instances = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [1.0, 0.0]])
    instance_labels = jnp.array([0, 0, 1, 1, -1])
    value = cluster_methods.hard_instance_loss(
        jnp.array([[1.0, 0.0]]), instances, jnp.array([0]), instance_labels, 1.0
    )
    np.testing.assert_allclose(float(value), np.log(1 + np.exp(0.6)), rtol=1e-6)
    # Cluster 1 with no usable negative instance drops out of the softmax.
    value = cluster_methods.hard_instance_loss(
        jnp.array([[1.0, 0.0]]),
        instances,
        jnp.array([0]),
        instance_labels,
        1.0,
        negatives_used=jnp.array([[True, True, False, False, True]]),
    )
    np.testing.assert_allclose(float(value), 0.0, atol=1e-6)


def _cross_camera_case():
    """2-D, tau 1. Instances: 0 (1, 0) cam 0 cluster 0; 1 (0, 1) cam 1 cluster 0;
    2 (0.6, 0.8) cam 1 cluster 1; 3 (-1, 0) cam 0 cluster 1; 4 (0.8, 0.6) cam 0
    cluster 2 (no other camera). Prototypes: row 0 (0.6, -0.8), row 1 (0.6, 0.8),
    row 2 (0, -1)."""
    memory = cluster_methods.build_memory(
        "hhcl",
        np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.8, 0.6]]),
        np.array([0, 1, 1, 0, 0]),
        np.array([0, 0, 1, 1, 2]),
    )
    prototypes = np.zeros_like(memory.prototypes)
    prototypes[:3] = [[0.6, -0.8], [0.6, 0.8], [0.0, -1.0]]
    return _to_jax(memory.replace(prototypes=prototypes))


def test_cross_camera_loss_by_hand():
    """Sample 0 (1, 0): its cluster from camera 1 is (0, 1), logit 0; the other
    rows 1 and 2 give 0.6 and 0: loss = log(e^0 + e^0.6 + e^0) - 0. Sample 4's
    cluster has no other camera: skipped. With row 2 masked out, log(1 + e^0.6)."""
    memory = _cross_camera_case()
    f = jnp.array([[1.0, 0.0], [0.8, 0.6]])
    indices, cams = jnp.array([0, 4]), jnp.array([0, 0])
    value = cluster_methods.cross_camera_loss(f, memory, indices, cams, memory.valid, 1.0)
    np.testing.assert_allclose(float(value), np.log(2 + np.exp(0.6)), rtol=1e-6)
    used = jnp.array([[True, True, False, False, False]] * 2)
    value = cluster_methods.cross_camera_loss(f, memory, indices, cams, used, 1.0)
    np.testing.assert_allclose(float(value), np.log(1 + np.exp(0.6)), rtol=1e-6)
    # No sample with another camera in its cluster: 0, with zero gradients.
    value, grad = jax.value_and_grad(cluster_methods.cross_camera_loss)(
        f[1:], memory, indices[1:], cams[1:], memory.valid, 1.0
    )
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0)


def test_cross_camera_loss_gradient():
    """Gradient w.r.t. the (unnormalised) feature against central differences
    of the by-hand formula, tau 0.5."""
    memory = _cross_camera_case()
    centre, rows = np.array([0.0, 1.0]), np.asarray(memory.prototypes)[1:3]

    def by_hand(x):
        u = unit64(x[0])
        return _lse(np.concatenate([[u @ centre], rows @ u]) / 0.5) - u @ centre / 0.5

    f = np.array([[0.9, -0.3]], np.float32)
    grad = jax.grad(cluster_methods.cross_camera_loss)(
        jnp.asarray(f), memory, jnp.array([0]), jnp.array([0]), memory.valid, 0.5
    )
    numeric = _finite_difference(by_hand, f, [(0, 0), (0, 1)])
    np.testing.assert_allclose(np.asarray(grad)[0], numeric, rtol=1e-3, atol=1e-5)


def test_multi_positive_instance_loss_matches_numpy():
    f, memory = _case("joint", seed=7)
    instances = np.asarray(memory.instances)
    labels = LABELS[INDICES]

    def loss(x, bank):
        return cluster_methods.multi_positive_instance_loss(
            x, bank, jnp.asarray(labels), jnp.asarray(LABELS), jnp.asarray(INDICES), TAU
        )

    value, (grad_f, grad_i) = jax.value_and_grad(loss, argnums=(0, 1))(
        jnp.asarray(f), jnp.asarray(instances)
    )
    np.testing.assert_allclose(
        value, _np_multi_positive(f, instances, labels, LABELS, INDICES, TAU), rtol=1e-5
    )
    assert np.all(np.asarray(grad_i) == 0)
    numeric = _finite_difference(
        lambda x: _np_multi_positive(x, instances, labels, LABELS, INDICES, TAU), f, ENTRIES
    )
    analytic = np.array([grad_f[i, j] for i, j in ENTRIES])
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=1e-4)
    # The outlier at batch position 2 (image 7) is pulled towards its own instance:
    # its per-sample loss is -log softmax_7, checked on a batch of that sample alone.
    alone = cluster_methods.multi_positive_instance_loss(
        jnp.asarray(f[2:3]),
        jnp.asarray(instances),
        jnp.asarray([-1]),
        jnp.asarray(LABELS),
        jnp.asarray([7]),
        TAU,
    )
    s = unit64(f[2]) @ instances.astype(np.float64).T / TAU
    np.testing.assert_allclose(alone, _lse(s) - s[7], rtol=1e-5)


# ------------------------------------------------------------ edge cases


def test_cap_cluster_without_negatives_has_finite_gradient():
    # One cluster only (two proxies, cameras 0 and 1): no other-cluster negatives.
    rng = np.random.default_rng(8)
    bank = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 0, 0, -1, 0])
    cameras = np.array([0, 1, 0, 1, 1])
    memory = cluster_methods.build_memory("cap", bank, cameras, labels)
    assert int(np.sum(memory.valid)) == 2
    indices = np.array([0, 1, 3])
    cams = cameras[indices]
    f = rng.normal(size=(3, 3)).astype(np.float32)
    mem, loss = _jax_loss("cap", memory, indices, cams)
    (total, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(f), mem.prototypes, mem.instances
    )
    m = _np_memory(memory)
    np.testing.assert_allclose(
        metrics["loss_inter"], _np_cap_inter(f, m, labels[indices], TAU, 2), rtol=1e-5
    )
    np.testing.assert_allclose(
        metrics["loss_intra"], _np_cap_intra(f, m, indices, cams, TAU), rtol=1e-5
    )
    assert np.isfinite(float(total))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0])[2] == 0)  # the outlier
    numeric = _finite_difference(
        lambda x: _np_cap_inter(x, m, labels[indices], TAU, 2), f, [(0, 1), (1, 2)]
    )
    grad_inter = jax.grad(
        lambda x: cluster_methods.cap_inter_camera_loss(
            x, _to_jax(memory), jnp.asarray(labels[indices]), TAU, 2
        )
    )(jnp.asarray(f))
    np.testing.assert_allclose([grad_inter[0, 1], grad_inter[1, 2]], numeric, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("kind", ["cluster_contrast", "cap", "hhcl", "joint"])
@pytest.mark.parametrize("empty", [False, True])
def test_batch_of_outliers_gives_zero_loss_and_gradient(kind, empty):
    rng = np.random.default_rng(10)
    bank = rng.normal(size=(12, 5)).astype(np.float32)
    labels = np.full(12, -1) if empty else LABELS
    memory = cluster_methods.build_memory(kind, bank, CAMERAS, labels)
    indices = np.array([7, 10, 7])  # outliers only
    cams = CAMERAS[indices]
    f = rng.normal(size=(3, 5)).astype(np.float32)
    mem, loss = _jax_loss(kind, memory, indices, cams)
    (total, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        jnp.asarray(f), mem.prototypes, mem.instances
    )
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)
    if kind == "joint":
        # The cluster term is empty; the instance term pulls each outlier to itself.
        assert float(metrics["loss_cluster"]) == 0.0
        expected = _np_multi_positive(
            f, np.asarray(memory.instances), labels[indices], labels, indices, TAU
        )
        np.testing.assert_allclose(metrics["loss_instance"], expected, rtol=1e-5)
        return
    assert float(total) == 0.0
    for value in metrics.values():
        assert float(value) == 0.0
    assert np.all(np.asarray(grads[0]) == 0)


# ----------------------------------------------------------------- updates


def _update(kind, memory, f, indices, mode="mean", momentum=0.2, instance_momentum=0.6, **kw):
    return cluster_methods.update_cluster_memory(
        kind,
        _to_jax(memory),
        jnp.asarray(f),
        jnp.asarray(indices),
        momentum=momentum,
        mode=mode,
        instance_momentum=instance_momentum,
        **kw,
    )


# Batch on the hand-made case: images 0 and 5 (cluster 0, camera 0), 1 (cluster 1,
# camera 0), 3 (outlier). Rows each batch position pulls, per kind.
UPDATE_INDICES = np.array([0, 5, 1, 3])
UPDATE_ROWS = {
    "cluster_contrast": {0: [0, 1], 1: [2]},
    "hhcl": {0: [0, 1], 1: [2]},
    "joint": {0: [0, 1], 1: [2]},
    "self_paced": {0: [0, 1], 1: [2], 2: [3]},  # the outlier's own row moves
    "cap": {0: [0, 1], 2: [2]},  # proxies (0, cam 0) and (1, cam 0)
}


@pytest.mark.parametrize("kind", KINDS)
def test_mean_update_matches_hand_computation(kind):
    memory = cluster_methods.build_memory(kind, _hand_features(), HAND_CAMERAS, HAND_LABELS)
    f = np.random.default_rng(11).normal(size=(4, 4)).astype(np.float32)
    new = _update(kind, memory, f, UPDATE_INDICES)
    old = np.asarray(memory.prototypes, np.float64)
    expected = old.copy()
    for row, positions in UPDATE_ROWS[kind].items():
        step = np.mean(unit64(f[positions]), axis=0)
        expected[row] = unit64(0.2 * old[row] + 0.8 * step)
    np.testing.assert_allclose(new.prototypes, expected, rtol=1e-5, atol=1e-6)
    untouched = [r for r in range(8) if r not in UPDATE_ROWS[kind]]
    np.testing.assert_array_equal(np.asarray(new.prototypes)[untouched], old[untouched])
    for name in ("valid", "row_cluster", "row_camera", "rows", "pseudo_labels", "cameras"):
        np.testing.assert_array_equal(getattr(new, name), getattr(memory, name))
    if kind not in ("hhcl", "joint"):
        np.testing.assert_array_equal(new.instances, memory.instances)
    if kind == "cluster_contrast":
        # The outlier changes nothing: the same update without it.
        without = _update(kind, memory, f[:3], UPDATE_INDICES[:3])
        np.testing.assert_allclose(new.prototypes, without.prototypes, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["cluster_contrast", "hhcl"])
def test_hard_update_uses_least_similar_sample(kind):
    memory = cluster_methods.build_memory(kind, _hand_features(), HAND_CAMERAS, HAND_LABELS)
    p = np.asarray(memory.prototypes, np.float64)
    rng = np.random.default_rng(12)
    close = p[0] + 0.05 * rng.normal(size=4)  # nearly the prototype of cluster 0
    far = -p[0] + 0.3 * rng.normal(size=4)
    f = np.stack([close, far, rng.normal(size=4)]).astype(np.float32)
    indices = np.array([0, 2, 7])  # clusters 0, 0, 1
    assert unit64(f[1]) @ p[0] < unit64(f[0]) @ p[0]
    new = np.asarray(_update(kind, memory, f, indices, mode="hard", momentum=0.5).prototypes)
    np.testing.assert_allclose(new[0], unit64(0.5 * p[0] + 0.5 * unit64(f[1])), atol=1e-6)
    np.testing.assert_allclose(new[1], unit64(0.5 * p[1] + 0.5 * unit64(f[2])), atol=1e-6)
    assert not np.allclose(new[0], unit64(0.5 * p[0] + 0.5 * unit64(f[0])), atol=1e-3)
    np.testing.assert_array_equal(new[2:], p[2:])


@pytest.mark.parametrize("kind", ["hhcl", "joint"])
def test_instance_rows_move_with_instance_momentum(kind):
    memory = cluster_methods.build_memory(kind, _hand_features(), HAND_CAMERAS, HAND_LABELS)
    old = np.asarray(memory.instances, np.float64)
    f = np.random.default_rng(13).normal(size=(4, 4)).astype(np.float32)
    indices = np.array([0, 5, 0, 3])  # image 0 twice, outlier 3 included
    new = np.asarray(_update(kind, memory, f, indices, instance_momentum=0.6).instances)
    expected = old.copy()
    expected[0] = unit64(0.6 * old[0] + 0.4 * np.mean(unit64(f[[0, 2]]), axis=0))
    expected[5] = unit64(0.6 * old[5] + 0.4 * unit64(f[1]))
    expected[3] = unit64(0.6 * old[3] + 0.4 * unit64(f[3]))
    np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new[[1, 2, 4, 6, 7]], old[[1, 2, 4, 6, 7]])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["mean", "hard", "sequential"])
def test_update_with_negative_indices_returns_memory_unchanged(kind, mode):
    """The train step passes indices of -1 for a non-finite step."""
    memory = cluster_methods.build_memory(kind, _hand_features(), HAND_CAMERAS, HAND_LABELS)
    f = np.random.default_rng(14).normal(size=(4, 4)).astype(np.float32)
    new = _update(kind, memory, f, np.full(4, -1), mode=mode)
    for before, after in zip(jax.tree.leaves(_to_jax(memory)), jax.tree.leaves(new), strict=True):
        assert np.asarray(before).dtype == np.asarray(after).dtype
        np.testing.assert_array_equal(after, before)
    on = _update(kind, memory, f, np.array([0, 5, 1, 3]), mode=mode)
    assert not np.array_equal(on.prototypes, memory.prototypes)


def _np_camera_negatives_loss(kind, f, m, indices, cams, tau, instance_weight, k):
    """cluster_loss with camera_negatives=True, from the definition: each
    sample's softmax keeps its positives and the rows / instances with a
    member from its own camera."""
    f = unit64(f)
    n = len(m["rows"])
    cluster_terms, instance_terms = [], []
    for i in range(len(f)):
        own_camera_rows = {m["rows"][j] for j in range(n) if m["cameras"][j] == cams[i]}
        t = m["rows"][indices[i]]
        if t >= 0:
            z = f[i] @ m["prototypes"].astype(np.float64).T / tau
            keep = [r for r in range(len(z)) if m["valid"][r] and r in own_camera_rows]
            assert t in keep
            cluster_terms.append(_lse(z[keep]) - z[t])
        s = f[i] @ m["instances"].astype(np.float64).T / tau
        y = m["pseudo_labels"][indices[i]]
        own = [j for j in range(n) if m["cameras"][j] == cams[i]]
        if kind == "hhcl" and y >= 0:
            used = [[m["cameras"][j] == cams[i] for j in range(n)]]
            instance_terms.append(
                _np_hard_instance(f[i : i + 1], m["instances"], [y], m["pseudo_labels"], tau, used)
            )
        elif kind == "joint":
            pos = [j for j in range(n) if m["pseudo_labels"][j] == y] if y >= 0 else [indices[i]]
            keep = sorted(set(pos) | set(own))
            instance_terms.append(-np.mean(s[pos] - _lse(s[keep])))
    cluster = float(np.mean(cluster_terms))
    if kind in ("cluster_contrast", "self_paced"):
        return cluster
    return cluster + instance_weight * float(np.mean(instance_terms))


@pytest.mark.parametrize("kind", ["cluster_contrast", "self_paced", "hhcl", "joint"])
def test_camera_negatives_match_numpy(kind):
    f, memory = _case(kind)
    cams = CAMERAS[INDICES]
    params = {**PARAMS, "camera_negatives": True}
    mem, loss = _jax_loss(kind, memory, INDICES, cams, params=params)
    total, _ = loss(jnp.asarray(f), mem.prototypes, mem.instances)
    m = _np_memory(memory)
    expected = _np_camera_negatives_loss(
        kind, f, m, INDICES, cams, TAU, PARAMS["instance_weight"], PARAMS["num_hard_negatives"]
    )
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    if kind != "cluster_contrast":  # its 3 clusters each span all 3 cameras
        plain, _ = _jax_loss(kind, memory, INDICES, cams)[1](
            jnp.asarray(f), mem.prototypes, mem.instances
        )
        assert abs(float(plain) - expected) > 1e-4  # the restriction is not a no-op


def test_same_camera_rows():
    # 6 images; rows 0 (cams 0, 1), 1 (cam 2), 2 (cam 1); image 5 in no row.
    _, memory = _case("cluster_contrast")
    memory = _to_jax(memory).replace(
        rows=jnp.array([0, 0, 1, 2, 2, -1] + [-1] * 6),
        cameras=jnp.array([0, 1, 2, 1, 1, 0] + [3] * 6),
    )
    present = cluster_methods.same_camera_rows(memory, jnp.array([0, 1, 2, 3]))
    expected = np.zeros((4, 12), bool)
    expected[0, 0] = True  # camera 0: row 0 (image 5 is in no row)
    expected[1, [0, 2]] = True
    expected[2, 1] = True
    np.testing.assert_array_equal(np.asarray(present), expected)


def test_cap_camera_negatives_match_numpy():
    f, memory = _case("cap")
    cams = CAMERAS[INDICES]
    params = {**PARAMS, "camera_negatives": True}
    mem, loss = _jax_loss("cap", memory, INDICES, cams, params=params)
    total, parts = loss(jnp.asarray(f), mem.prototypes, mem.instances)
    m = _np_memory(memory)
    labels = m["pseudo_labels"][INDICES]
    inter = _np_cap_inter(f, m, labels, TAU, PARAMS["num_hard_negatives"], cams=cams)
    np.testing.assert_allclose(float(parts["loss_inter"]), inter, rtol=1e-5)
    plain = _np_cap_inter(f, m, labels, TAU, PARAMS["num_hard_negatives"])
    assert abs(plain - inter) > 1e-4
    intra = _np_cap_intra(f, m, INDICES, cams, TAU)
    np.testing.assert_allclose(
        float(total), intra + PARAMS["inter_camera_weight"] * inter, rtol=1e-5
    )


@pytest.mark.parametrize("kind", ["hhcl", "joint", "mgce"])
def test_partial_extraction_takes_a_seeded_subset_and_the_rest_from_the_bank(tmp_path, kind):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16))
    fresh = unit(np.repeat(centres, 5, axis=0) + 0.2 * rng.normal(size=(40, 16)), dtype=np.float32)
    cameras = np.arange(40) % 2
    asked = []

    def extract(rows=None):
        asked.append(None if rows is None else np.asarray(rows))
        return {"global": fresh if rows is None else fresh[rows]}

    train = TrainSet(cameras, np.zeros(40, int), extract, {"global": (16,)})
    config = cluster_config(
        str(tmp_path), kind, **{"train.batch_size": 8, "method.extract_fraction": 0.25}
    )
    assert not config_problems(config)
    method = get_method(config)
    # Epoch 0 extracts every image: the bank is still a placeholder.
    first = method.start_epoch(0, train, method.init_memory(train), False)
    assert asked == [None] and first.stats["cluster/extracted_fraction"] == 1.0

    # Epoch 1: 10 of 40 images, drawn from (seed, epoch); the other 30 rows of the
    # clustered features (the new bank) are the old bank's.
    def with_bank(memory, instances=None):  # mgce keeps the bank in memory.cluster
        clusters = getattr(memory, "cluster", memory)
        if instances is None:
            return clusters.instances
        clusters = clusters.replace(instances=instances)
        return memory.replace(cluster=clusters) if kind == "mgce" else clusters

    bank = np.asarray(with_bank(first.memory)).copy()
    bank[::3] = -bank[::3]  # as if training had moved these rows
    memory = with_bank(first.memory, jnp.asarray(bank))
    second = method.start_epoch(1, train, memory, False)
    rows = asked[1]
    assert len(rows) == 10 and np.all(np.diff(rows) > 0)
    assert second.stats["cluster/extracted_fraction"] == 0.25
    instances = np.asarray(with_bank(second.memory))  # re-normalised: 1-ulp changes
    np.testing.assert_allclose(instances[rows], fresh[rows], atol=1e-6)
    rest = np.setdiff1d(np.arange(40), rows)
    np.testing.assert_allclose(instances[rest], bank[rest], atol=1e-6)
    # The same draw again at epoch 1, another at epoch 2.
    method.start_epoch(1, train, memory, False)
    np.testing.assert_array_equal(asked[2], rows)
    method.start_epoch(2, train, memory, False)
    assert not np.array_equal(asked[3], rows)
    config.method.extract_fraction = 0.0
    assert [p for p in config_problems(config) if p.startswith("method.extract_fraction")]


def test_a_bfloat16_memory_on_the_cpu_is_warned_about(tmp_path, caplog):
    train = TrainSet(np.arange(40) % 2, np.zeros(40, int), None, {"global": (16,)})
    for dtype, warned in (("float32", False), ("bfloat16", True)):
        caplog.clear()
        config = cluster_config(str(tmp_path), "hhcl", **{"method.memory_dtype": dtype})
        assert not config_problems(config)
        memory = get_method(config).init_memory(train)
        assert memory.instances.dtype == jnp.dtype(dtype)
        assert ("memory_dtype = bfloat16 on the CPU" in caplog.text) == warned
    config.method.memory_dtype = "float16"
    assert [p for p in config_problems(config) if p.startswith("method.memory_dtype")]
