"""MGCE-HCL (jaxreid.methods.mgce): the co-association priorities on a
worked example, the priority-weighted hybrid loss and its gradient against a
NumPy loop written from the module's definitions, the epoch's ensemble log,
and a short synthetic training whose mAP rises above the untrained model."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cluster_config, step_losses, tiny_data, unit
from test_cluster_training import CAMERA_AWARE, LEARN, MIN_GAIN, learn_root  # noqa: F401

from jaxreid.methods import TrainSet, get_method
from jaxreid.methods.cluster import build_memory
from jaxreid.methods.mgce import (
    MGCEMemory,
    co_association,
    ensemble_stats,
    pair_priorities,
    positive_pairs,
    priority_hybrid_loss,
)
from jaxreid.train import train_and_evaluate
from jaxreid.validate import config_problems

unit64 = functools.partial(unit, dtype=np.float64)

# ------------------------------------------------------- the worked example

# Three granularities of six images: eps 0.5 (the one that trains), 0.45, 0.4.
GRANULARITIES = np.array(
    [
        [0, 0, 0, 0, 1, 1],
        [0, 0, 1, 1, 2, 2],
        [0, 0, -1, 1, -1, -1],
    ]
)
# The training pairs and how many granularities join each, counted by hand:
# (0, 1) all three; (2, 3) eps 0.5 and 0.45 (2 is an outlier at 0.4); (4, 5)
# 0.5 and 0.45 (both outliers at 0.4); (0, 2) (0, 3) (1, 2) (1, 3) only 0.5.
HAND_COUNTS = {(0, 1): 3, (2, 3): 2, (4, 5): 2, (0, 2): 1, (0, 3): 1, (1, 2): 1, (1, 3): 1}


def test_co_association_counts_by_hand():
    rows, cols = positive_pairs(GRANULARITIES[0])
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == sorted(HAND_COUNTS)
    counts = co_association(GRANULARITIES, rows, cols)
    for r, c, count in zip(rows, cols, counts, strict=True):
        assert count == HAND_COUNTS[(r, c)], (r, c)
    # Any pair, not only positives: images of different training clusters share
    # nothing, an outlier pair shares nothing either.
    np.testing.assert_array_equal(co_association(GRANULARITIES, [0, 4, 2], [4, 5, 4]), [0, 2, 0])


def test_pair_priorities_in_the_step_are_the_counts_over_g():
    indices = jnp.array([0, 2, 5])
    positive, weight = pair_priorities(
        jnp.asarray(GRANULARITIES), jnp.asarray(GRANULARITIES[0]), indices
    )
    third = 1 / 3
    np.testing.assert_array_equal(
        positive,
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]],
    )
    np.testing.assert_allclose(
        weight,
        [
            [1, 1, third, third, 0, 0],  # image 0: itself, (0, 1) 3/3, (0, 2) (0, 3) 1/3
            [third, third, 1, 2 * third, 0, 0],  # image 2: itself 1 though an outlier at 0.4
            [0, 0, 0, 0, 2 * third, 1],
        ],
        rtol=1e-6,
    )
    # An outlier of the training labels: its only positive is itself.
    labels = jnp.array([0, 0, -1, -1, 1, 1])
    positive, weight = pair_priorities(jnp.asarray(GRANULARITIES), labels, jnp.array([2]))
    np.testing.assert_array_equal(positive, [[0, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(weight, [[0, 0, 1, 0, 0, 0]])


def test_ensemble_log_by_hand():
    stats, line = ensemble_stats(GRANULARITIES, GRANULARITIES[0], (0.5, 0.45, 0.4))
    assert [stats[f"clusters_{g}"] for g in range(3)] == [2, 3, 2]
    assert [stats[f"eps_{g}"] for g in range(3)] == [0.5, 0.45, 0.4]
    # 7 positive pairs: 4 at 1/3, 2 at 2/3, 1 at 3/3.
    assert stats["positive_pairs"] == 7
    np.testing.assert_allclose(
        [stats[f"pairs_priority_{c}of3"] for c in (1, 2, 3)], [4 / 7, 2 / 7, 1 / 7]
    )
    np.testing.assert_allclose(stats["mean_pair_priority"], (4 + 4 + 3) / 7 / 3)
    assert "1/3: 57%, 2/3: 29%, 3/3: 14%" in line and "eps 0.450: 3" in line


# ------------------------------------------------------------------- loss

# 10 images in 5-D over 3 cameras; training clusters 0, 1, 2 and outlier 9.
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, -1])
CAMERAS = np.array([0, 1, 2, 0, 0, 1, 2, 2, 0, 1])
GRANS = np.array(
    [
        LABELS,
        [0, 0, 1, 2, 2, -1, 3, 3, 3, -1],
        [0, 0, -1, 1, 1, -1, 2, 2, -1, -1],
    ]
)
INDICES = np.array([0, 2, 5, 9, 7])  # the outlier 9 at position 3
TAU = 0.3


def _case(seed=1):
    rng = np.random.default_rng(seed)
    memory = build_memory("joint", rng.normal(size=(10, 5)), CAMERAS, LABELS)
    # An instance bank apart from the centroids' sources.
    memory = memory.replace(instances=unit(rng.normal(size=(10, 5)), dtype=np.float32))
    features = rng.normal(size=(len(INDICES), 5)).astype(np.float32)
    return features, MGCEMemory(cluster=memory, granularities=GRANS.astype(np.int32))


def _np_loss(f, memory: MGCEMemory, indices, cams, tau, instance_weight, camera_negatives):
    """The module doc's loss, one sample and one column at a time."""
    m = jax.tree.map(np.asarray, memory.cluster)
    gran = np.asarray(memory.granularities)
    f = unit64(f)
    n, g = len(m.pseudo_labels), len(gran)
    cluster_terms, instance_terms = [], []
    for b, i in enumerate(indices):
        y = m.pseudo_labels[i]
        positives = [j for j in range(n) if j == i or (y >= 0 and m.pseudo_labels[j] == y)]
        weight = {
            j: 1.0 if j == i else sum(gran[k, i] == gran[k, j] >= 0 for k in range(g)) / g
            for j in positives
        }
        if y >= 0:
            rows = [
                r
                for r in range(n)
                if m.valid[r]
                and (
                    not camera_negatives
                    or any(m.rows[k] == r and m.cameras[k] == cams[b] for k in range(n))
                )
            ]
            logits = {r: f[b] @ m.prototypes[r] / tau for r in rows}
            top = max(logits.values())
            lse = top + np.log(sum(np.exp(v - top) for v in logits.values()))
            firmness = np.mean(list(weight.values()))
            cluster_terms.append(firmness * (lse - logits[m.rows[i]]))
        columns = [
            j for j in range(n) if not camera_negatives or j in weight or m.cameras[j] == cams[b]
        ]
        s = {j: f[b] @ m.instances[j] / tau for j in columns}
        top = max(s.values())
        lse = top + np.log(sum(np.exp(v - top) for v in s.values()))
        total_weight = sum(weight.values())
        instance_terms.append(-sum(w * (s[j] - lse) for j, w in weight.items()) / total_weight)
    cluster = sum(cluster_terms) / max(len(cluster_terms), 1)
    instance = np.mean(instance_terms)
    return cluster + instance_weight * instance, cluster, instance


@pytest.mark.parametrize("camera_negatives", [False, True], ids=["all_rows", "own_camera"])
def test_priority_hybrid_loss_value_and_gradient_match_numpy(camera_negatives):
    f, memory = _case()
    cams = CAMERAS[INDICES]
    weight = 0.7
    jax_memory = jax.tree.map(jnp.asarray, memory)

    def loss(x):
        return priority_hybrid_loss(
            x,
            jax_memory,
            jnp.asarray(INDICES),
            jnp.asarray(cams),
            temperature=TAU,
            instance_weight=weight,
            camera_negatives=camera_negatives,
        )

    (total, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(f))
    expected, cluster, instance = _np_loss(f, memory, INDICES, cams, TAU, weight, camera_negatives)
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_cluster"], cluster, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_instance"], instance, rtol=1e-5)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)) and np.all(np.any(grad != 0, axis=1))

    def numpy_total(x):
        return _np_loss(x, memory, INDICES, cams, TAU, weight, camera_negatives)[0]

    entries = [(b, d) for b in range(len(INDICES)) for d in (0, 3)]
    numeric = []
    for b, d in entries:
        up, down = f.astype(np.float64), f.astype(np.float64)
        up[b, d] += 1e-4
        down[b, d] -= 1e-4
        numeric.append((numpy_total(up) - numpy_total(down)) / 2e-4)
    analytic = [grad[b, d] for b, d in entries]
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-5)


def test_priorities_weigh_the_positives():
    """All granularities agreeing gives the joint member's loss (uniform
    weights, firmness 1); disagreeing lowers the cluster term by the firmness."""
    f, memory = _case()
    agreeing = memory.replace(granularities=np.stack([LABELS] * 3).astype(np.int32))
    kwargs = dict(temperature=TAU, instance_weight=1.0)
    args = (jnp.asarray(f), jnp.asarray(INDICES), jnp.asarray(CAMERAS[INDICES]))

    def run(mem):
        mem = jax.tree.map(jnp.asarray, mem)
        return priority_hybrid_loss(args[0], mem, *args[1:], **kwargs)[1]

    from jaxreid.methods.cluster import masked_nce, multi_positive_instance_loss

    m = jax.tree.map(jnp.asarray, memory.cluster)
    labels = m.pseudo_labels[args[1]]
    uniform = run(agreeing)
    np.testing.assert_allclose(
        uniform["loss_cluster"],
        masked_nce(args[0], m.prototypes, m.valid, m.rows[args[1]], TAU),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        uniform["loss_instance"],
        multi_positive_instance_loss(args[0], m.instances, labels, m.pseudo_labels, args[1], TAU),
        rtol=1e-6,
    )
    assert uniform["mean_priority"] == 1.0
    weighted = run(memory)
    assert weighted["mean_priority"] < 1.0
    assert weighted["loss_cluster"] < uniform["loss_cluster"]


# ------------------------------------------------------------- the method


def _train_set(features, cameras):
    return TrainSet(
        cameras=cameras,
        identities=np.zeros(len(cameras), int),
        extract=lambda: {"global": features},
        output_shapes={"global": features.shape[1:]},
    )


def test_start_epoch_clusters_every_granularity_on_one_distance(tmp_path, monkeypatch, caplog):
    from jaxreid.pseudo_labels import clustering, kreciprocal

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16))
    features = np.repeat(centres, 4, axis=0) + 0.3 * rng.normal(size=(32, 16))
    features = unit(features, dtype=np.float32)
    cameras = np.arange(32) % 3
    config = cluster_config(str(tmp_path), "mgce", **{"train.batch_size": 4, "cluster.eps": 0.6})
    calls = []
    real = kreciprocal.jaccard_distance
    monkeypatch.setattr(
        kreciprocal, "jaccard_distance", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    method = get_method(config)
    train = _train_set(features, cameras)
    plan = method.start_epoch(0, train, method.init_memory(train), False)
    # One Jaccard distance, stored up to the largest eps.
    assert len(calls) == 1 and calls[0]["max_distance"] == pytest.approx(0.6)
    grans = np.asarray(plan.memory.granularities)
    assert grans.shape == (3, 32)
    for row, eps in zip(grans, (0.6, 0.55, 0.5), strict=True):
        expected = clustering.cluster_features(features, {**config.cluster, "eps": eps})
        np.testing.assert_array_equal(row, expected)
    np.testing.assert_array_equal(plan.memory.cluster.pseudo_labels, grans[0])
    stats = plan.stats
    assert stats["mgce/clusters_0"] == stats["cluster/num_clusters"]
    assert [stats[f"mgce/eps_{g}"] for g in range(3)] == pytest.approx([0.6, 0.55, 0.5])
    fractions = [stats[f"mgce/pairs_priority_{c}of3"] for c in (1, 2, 3)]
    assert sum(fractions) == pytest.approx(1.0) and stats["mgce/positive_pairs"] > 0
    assert "clusters per granularity" in plan.summary
    np.testing.assert_array_equal(plan.arrays["granularities"], grans)
    # A resumed epoch keeps the checkpoint's memory and samples its labels.
    resumed = method.start_epoch(0, train, plan.memory, True)
    assert resumed.memory is None
    np.testing.assert_array_equal(resumed.sampler_labels, grans[0])


@pytest.mark.parametrize(
    "offsets, message",
    [((), "non-empty"), ((0.0,), "differ from it"), ((-0.7,), r"must be in \(0, 1\]")],
)
def test_eps_offsets_are_checked(tmp_path, offsets, message):
    config = cluster_config(str(tmp_path), "mgce")
    config.method.eps_offsets = offsets
    problems = [p for p in config_problems(config) if p.startswith("method.eps_offsets")]
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_bottom_up_merging_is_refused_before_training(tmp_path):
    config = cluster_config(str(tmp_path), "mgce")
    config.cluster.algorithm = "bottom_up"
    problems = [p for p in config_problems(config) if p.startswith("cluster.algorithm")]
    assert len(problems) == 1 and "several eps values" in problems[0], problems


# --------------------------------------------------------------- learning


def test_short_mgce_training_raises_map(learn_root, tmp_path):  # noqa: F811
    config = cluster_config(learn_root, "mgce", **{**LEARN, **CAMERA_AWARE})
    result = train_and_evaluate(config, str(tmp_path), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print(f"mgce: mAP {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    losses = step_losses(str(tmp_path))
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert after > before + MIN_GAIN, (before, after)
