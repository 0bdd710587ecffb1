"""FCU (jaxreid/methods/fcu.py) and bottom-up merging (jaxreid/pseudo_labels/
bottom_up.py): the merging on a worked example and against a dense NumPy
transcription of BUC's procedure, the repelled / attracted / patch losses
against NumPy in value and gradient, the patch grid in the model, the config
checks, and a short synthetic training whose mAP must rise."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cluster_config, step_losses, train_on_learning_set, unit

from jaxreid.methods import fcu
from jaxreid.pseudo_labels import bottom_up

TAU = 0.5


def _numeric_grad(f, x, eps=1e-5):
    x = np.array(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (f(up) - f(down)) / (2 * eps)
    return grad


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---------------------------------------------------------------- merging

# Five images on a chain: candidate pairs and their distances.
PAIRS = np.array([[0, 1], [1, 2], [2, 3], [3, 4]])
DIST = np.array([0.10, 0.11, 0.12, 0.15])


def test_merge_round_worked_example():
    first, second = PAIRS[:, 0], PAIRS[:, 1]
    singletons = np.full(5, -1)
    # Round 1, all sizes 1: the size term adds 2 lambda to every pair, so the
    # order is the distances': (0, 1) then (1, 2).
    for lam in (0.0, 0.02):
        labels, merged = bottom_up.merge_round(singletons, first, second, DIST, 2, lam)
        assert merged == 2
        np.testing.assert_array_equal(labels, [0, 0, 0, 1, 2])
    # Round 2 from {0, 1}, {2}, {3}, {4}, one merge. Without the size term the
    # closest pair (1, 2) at 0.11 joins the pair cluster to {2}. With lambda
    # 0.02: (1, 2) scores 0.11 + 0.02 * (2 + 1) = 0.17, (2, 3) 0.12 + 0.04 =
    # 0.16, (3, 4) 0.15 + 0.04 = 0.19: two singletons merge first.
    start = np.array([0, 0, 1, 2, 3])
    plain, _ = bottom_up.merge_round(start, first, second, DIST, 1, 0.0)
    np.testing.assert_array_equal(plain, [0, 0, 0, 1, 2])
    diverse, _ = bottom_up.merge_round(start, first, second, DIST, 1, 0.02)
    np.testing.assert_array_equal(diverse, [0, 0, 1, 1, 2])
    # Two merges at lambda 0.02: (2, 3) at 0.16, then (1, 2) at 0.17 (the
    # sizes are the round's start sizes) -> {0, 1, 2, 3}, {4}.
    two, merged = bottom_up.merge_round(start, first, second, DIST, 2, 0.02)
    np.testing.assert_array_equal(two, [0, 0, 0, 0, 1])
    # Asking for more merges than the candidates allow merges what they allow.
    everything, merged = bottom_up.merge_round(start, first, second, DIST, 10, 0.02)
    assert merged == 3 and everything.max() == 0
    # A pair inside one cluster never counts as a merge.
    _, merged = bottom_up.merge_round(np.zeros(5), first, second, DIST, 1, 0.0)
    assert merged == 0


def _dense_buc(features, labels, num_to_merge, lam):
    """The authors' round (reid/bottom_up.py) transcribed: all pairs i < j of
    different clusters, squared Euclidean + lam (|A| + |B|) with the round's
    start sizes, in ascending order, merged until num_to_merge merges."""
    labels = list(labels)
    sizes = {c: labels.count(c) for c in set(labels)}
    n = len(features)
    scored = []
    for i, j in itertools.combinations(range(n), 2):
        if labels[i] != labels[j]:
            d = float(np.sum((features[i] - features[j]) ** 2))
            scored.append((d + lam * (sizes[labels[i]] + sizes[labels[j]]), i, j))
    before = len(set(labels))
    for _, i, j in sorted(scored):
        a, b = labels[i], labels[j]
        low, high = min(a, b), max(a, b)
        labels = [low if x == high else x for x in labels]
        if before - len(set(labels)) == num_to_merge:
            break
    return labels


def _same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_merging_matches_the_dense_procedure(lam):
    """With every other image a candidate (k = N - 1) the sparse rounds are
    BUC's dense rounds, the diversity term included, over three rounds."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 6))
    features = unit(centres[rng.integers(0, 5, 30)] + 0.4 * rng.normal(size=(30, 6)))
    features = features.astype(np.float32)
    labels = list(range(30))
    ours = None
    for round_ in range(3):
        labels = _dense_buc(features.astype(np.float64), labels, 6, lam)
        ours, stats = bottom_up.merge_labels(features, ours, 1, 6, lam, k=29, backend="jax")
        assert stats["merges"] == 6
        assert _same_partition(ours, labels), round_
    assert ours.max() + 1 == 30 - 18


def test_progressive_merging_keeps_earlier_clusters():
    """Each re-clustering continues from the last epoch's labels: every earlier
    cluster lies inside one later cluster, and the count drops by the rounds'
    merges (first rounds at epoch 0, then merge_rounds)."""
    from jaxreid.pseudo_labels.clustering import default_cluster_config

    rng = np.random.default_rng(0)
    params = default_cluster_config()
    params.update(
        dict(merge_percent=0.1, merge_rounds=1, merge_first_rounds=3, merge_k=8, knn_backend="jax")
    )
    labels, stats = bottom_up.epoch_labels(rng.normal(size=(50, 8)), np.full(50, -1), 0, params)
    assert stats["merges"] == 15 and labels.max() + 1 == 35
    later, stats = bottom_up.epoch_labels(rng.normal(size=(50, 8)), labels, 1, params)
    assert stats["merges"] == 5 and later.max() + 1 == 30
    for c in range(labels.max() + 1):
        assert len(np.unique(later[labels == c])) == 1
    # Without previous labels the rounds so far are replayed from singletons.
    scratch, stats = bottom_up.epoch_labels(rng.normal(size=(50, 8)), None, 2, params)
    assert stats["merges"] == 25 and scratch.max() + 1 == 25


@pytest.mark.parametrize("kind", ["cluster_contrast", "hhcl"])
def test_bottom_up_is_a_clustering_option_of_other_methods(tmp_path, kind):
    """cluster.algorithm = "bottom_up" in a clustering-family method: six
    tight groups of 4 images start as 24 singletons; 3 merges a round (0.125
    of N): the first epoch's 6 rounds leave the 6 groups, the next epoch
    continues from them (the memory's labels) with one round, 3 clusters of
    whole groups; merging on to one cluster is refused with the fix."""
    from jaxreid.methods import TrainSet, get_method
    from jaxreid.methods.cluster import ClusteringError

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    features = unit(np.repeat(centres, 4, 0) + 0.05 * rng.normal(size=(24, 16)))
    features = features.astype(np.float32)
    overrides = {
        "train.batch_size": 4,
        "cluster.algorithm": "bottom_up",
        "cluster.merge_percent": 0.125,
        "cluster.merge_first_rounds": 6,
        "cluster.merge_rounds": 1,
        "cluster.merge_k": 5,
        "cluster.knn_backend": "jax",
    }
    config = cluster_config(str(tmp_path), kind, **overrides)
    method = get_method(config)
    train = TrainSet(
        cameras=np.tile(np.arange(4), 6),
        identities=np.zeros(24, int),
        extract=lambda: {"global": features},
        output_shapes={"global": (16,)},
    )
    plan = method.start_epoch(0, train, method.init_memory(train), False)
    group = np.repeat(np.arange(6), 4)
    np.testing.assert_array_equal(plan.arrays["pseudo_labels"], group)
    assert plan.stats["cluster/merges"] == 18 and "bottom-up 18 merges" in plan.summary
    later = method.start_epoch(1, train, plan.memory, False)
    labels = later.arrays["pseudo_labels"]
    assert later.stats["cluster/merges"] == 3 and labels.max() + 1 == 3
    for g in range(6):
        assert len(np.unique(labels[group == g])) == 1
    np.testing.assert_array_equal(later.memory.pseudo_labels, labels)
    config.cluster.merge_rounds = 2  # 3 -> 1 cluster at the next epoch
    method = get_method(config)
    with pytest.raises(ClusteringError, match="lower cluster.merge_percent"):
        method.start_epoch(2, train, later.memory, False)


# ---------------------------------------------------------------- losses


def _np_repelled(f, c, valid, targets, tau):
    rows = np.flatnonzero(valid)
    total, count = 0.0, 0
    for b in range(len(f)):
        if targets[b] < 0:
            continue
        log_p = _log_softmax(unit(f[b], dtype=np.float64) @ c[rows].T / tau)
        total += -log_p[list(rows).index(targets[b])]
        count += 1
    return total / max(count, 1)


def _np_attracted(f, labels):
    f = unit(f, dtype=np.float64)
    pairs = [
        1.0 - f[i] @ f[j]
        for i in range(len(f))
        for j in range(len(f))
        if i != j and labels[i] >= 0 and labels[i] == labels[j]
    ]
    return float(np.mean(pairs)) if pairs else 0.0


def _np_patch(s, memory, indices, k, tau):
    total = 0.0
    b, p, _ = s.shape
    for i in range(b):
        for q in range(p):
            others = [j for j in range(memory.shape[1]) if j != indices[i]]
            sims = np.array([unit(s[i, q], dtype=np.float64) @ memory[q, j] for j in others])
            nearest = np.sort(sims)[::-1][:k]
            total += np.log(np.exp(sims / tau).sum()) - np.log(np.exp(nearest / tau).sum())
    return total / (b * p)


def test_repelled_loss_value_and_gradient():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(5, 4))
    c = unit(rng.normal(size=(4, 4)))
    valid = np.array([True, True, True, False])
    targets = np.array([0, 2, -1, 1, 0])

    def loss(x):
        return fcu.repelled_loss(x, jnp.asarray(c, jnp.float32), valid, targets, TAU)

    expected = _np_repelled(f, c, valid, targets, TAU)
    np.testing.assert_allclose(float(loss(jnp.asarray(f, jnp.float32))), expected, rtol=1e-5)
    numeric = _numeric_grad(lambda x: _np_repelled(x, c, valid, targets, TAU), f)
    grad = jax.grad(loss)(jnp.asarray(f, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=2e-5)
    assert np.all(np.asarray(grad)[2] == 0)  # the outlier takes no part


def test_attracted_loss_value_and_gradient():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(6, 3))
    labels = np.array([0, 0, 1, 1, 1, -1])  # the outlier has no partner

    def loss(x):
        return fcu.attracted_loss(x, jnp.asarray(labels))

    expected = _np_attracted(f, labels)
    np.testing.assert_allclose(float(loss(jnp.asarray(f, jnp.float32))), expected, rtol=1e-5)
    numeric = _numeric_grad(lambda x: _np_attracted(x, labels), f)
    grad = jax.grad(loss)(jnp.asarray(f, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=2e-5)
    # Identical members: nothing to pull.
    same = np.repeat(f[:1], 6, 0)
    assert abs(float(loss(jnp.asarray(same, jnp.float32)))) < 1e-6


def test_patch_loss_value_and_gradient():
    rng = np.random.default_rng(2)
    b, p, n, d, k = 3, 2, 7, 4, 2
    s = rng.normal(size=(b, p, d))
    memory = unit(rng.normal(size=(p, n, d)))
    indices = np.array([0, 4, 6])

    def loss(x):
        return fcu.patch_loss(x, jnp.asarray(memory, jnp.float32), jnp.asarray(indices), k, TAU)

    expected = _np_patch(s, memory, indices, k, TAU)
    np.testing.assert_allclose(float(loss(jnp.asarray(s, jnp.float32))), expected, rtol=1e-5)
    numeric = _numeric_grad(lambda x: _np_patch(x, memory, indices, k, TAU), s)
    grad = jax.grad(loss)(jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=2e-5)
    # The own entry is excluded: a patch equal to its own entry gains nothing from it.
    own = memory[:, indices].transpose(1, 0, 2)
    np.testing.assert_allclose(
        float(loss(jnp.asarray(own, jnp.float32))),
        _np_patch(own, memory, indices, k, TAU),
        rtol=1e-5,
    )
    # k = every other entry: the loss is 0.
    every = fcu.patch_loss(jnp.asarray(s, jnp.float32), memory, jnp.asarray(indices), n - 1, TAU)
    assert abs(float(every)) < 1e-5


def test_memory_update_writes_rows_of_the_batch_only():
    rng = np.random.default_rng(4)
    n, p, d = 6, 2, 3
    features = {"global": rng.normal(size=(n, d)), "grid_patches": rng.normal(size=(n, p, d))}
    memory = fcu.build_fcu_memory(features, np.zeros(n, np.int32), np.array([0, 0, 1, 1, 2, -1]))
    patches = rng.normal(size=(2, p, d)).astype(np.float32)
    indices = jnp.asarray([1, -1])  # the second sample writes nothing
    new = fcu.update_fcu_memory(
        jax.tree.map(jnp.asarray, memory),
        jnp.asarray(rng.normal(size=(2, d)), jnp.float32),
        jnp.asarray(patches),
        indices,
        momentum=0.5,
        mode="mean",
        patch_momentum=0.9,
    )
    old = np.asarray(memory.patches)
    expected = unit(0.9 * old[:, 1] + 0.1 * unit(patches[0]))
    np.testing.assert_allclose(np.asarray(new.patches)[:, 1], expected, atol=1e-6)
    untouched = [0, 2, 3, 4, 5]
    np.testing.assert_array_equal(np.asarray(new.patches)[:, untouched], old[:, untouched])


# ---------------------------------------------------------------- model, config


def test_patch_grid_cells_and_model_outputs():
    from flax import nnx

    from jaxreid import models
    from jaxreid.models.model import apply_model, default_model_config, split_model
    from jaxreid.models.patch_grid import cell_weights

    # 3 rows of a 4-row map share the boundary rows (torch's adaptive bins).
    weights = cell_weights(4, 2, 3, 2).reshape(6, 4, 2)
    np.testing.assert_allclose(weights[0], [[0.5, 0], [0.5, 0], [0, 0], [0, 0]])
    np.testing.assert_allclose(weights[3], [[0, 0], [0, 0.5], [0, 0.5], [0, 0]])
    np.testing.assert_allclose(weights.sum((1, 2)), 1.0)

    config = default_model_config()
    config.backbone, config.head, config.embed_dim = "resnet18", "bnneck", 0
    plain = models.build_model(config, nnx.Rngs(0))
    config.patch_grid.rows, config.patch_grid.dim = 3, 8
    model = models.build_model(config, nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 64, 32, 3)), jnp.float32)
    out0, _ = apply_model(*split_model(plain), images, False)
    out, _ = apply_model(*split_model(model), images, False)
    assert set(out) == set(out0) | {"grid_patches"}
    np.testing.assert_array_equal(np.asarray(out["global"]), np.asarray(out0["global"]))
    assert out["grid_patches"].shape == (2, 3, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["grid_patches"]), axis=-1), 1.0)


def test_config_checks(tiny_root):
    from jaxreid.validate import config_problems

    config = cluster_config(tiny_root, "fcu")
    problems = config_problems(config)
    assert any("model.patch_grid.rows = 0" in p and "patch_grid.rows=6" in p for p in problems)
    config.model.patch_grid.rows = 2
    config.cluster.algorithm = "bottom_up"
    config.cluster.merge_percent = 1.5
    config.cluster.merge_k = 0
    problems = config_problems(config)
    assert not any("patch_grid" in p for p in problems)
    assert any(p.startswith("cluster.merge_percent = 1.5") for p in problems)
    assert any(p.startswith("cluster.merge_k = 0") for p in problems)
    config.cluster.algorithm = "kmeans"
    assert any(p.startswith("cluster.algorithm = 'kmeans'") for p in config_problems(config))


# ---------------------------------------------------------------- training

# The run below on the shared 2-core Xeon (load ~2): 7.7 -> 21.1 plain mAP, loss
# 4.75 -> 1.65, 36 s; the margin is far below the gain.
FCU_MIN_GAIN = 0.02

# The learning set's 144 training images: half merged at the first epoch (5
# rounds of 14), then 14 merges an epoch -> 74, 60, 46, 32 clusters.
FCU_SHORT = {
    "cluster.camera_centering": True,
    "cluster.algorithm": "bottom_up",
    "cluster.merge_percent": 0.1,
    "cluster.merge_first_rounds": 5,
    "cluster.merge_rounds": 1,
    "model.patch_grid.rows": 4,
    "model.patch_grid.dim": 64,
}


def test_short_fcu_training_raises_map(tmp_path):
    """FCU in the training loop on the learning set of test_cluster_training
    (EfficientNet-Lite0 from ImageNet); the mAP must rise and each epoch's
    merge count is logged."""
    lines = []

    def log(line):
        lines.append(line)
        print(line)

    result, workdir = train_on_learning_set(tmp_path, "fcu", log=log, **FCU_SHORT)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    losses = step_losses(workdir)
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert sum("bottom-up 70 merges, 74 clusters" in line for line in lines) == 1
    assert sum("bottom-up 14 merges" in line for line in lines) == 3
    labels = np.load(tmp_path / "w" / "pseudo_labels" / "epoch_004.npy")
    assert labels.max() + 1 == 32
    assert after > before + FCU_MIN_GAIN, (before, after)


@pytest.mark.slow
def test_fcu_ignores_identity_labels(tiny_root, tmp_path):
    """test_label_blind's check for FCU with bottom-up merging: shuffled
    identity numbers give the same losses, metrics and merged clusters."""
    from test_label_blind import SHORT, check_label_blind

    def config():
        return cluster_config(
            tiny_root,
            "fcu",
            **{
                "cluster.algorithm": "bottom_up",
                "cluster.merge_percent": 0.2,
                "cluster.merge_first_rounds": 2,
                "model.patch_grid.rows": 2,
                "model.patch_grid.dim": 8,
                **SHORT,
            },
        )

    check_label_blind(config, tmp_path)
