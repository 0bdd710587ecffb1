"""The single-camera cluster filter (`cluster.min_cameras`): clusters whose
images all come from fewer cameras become outliers, for every clustered
method, with the counts logged per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import cluster_config

from jaxreid.methods import TrainSet, get_method
from jaxreid.methods.cluster import KINDS, ClusteringError
from jaxreid.pseudo_labels.clustering import camera_filter
from jaxreid.validate import config_problems

# Clusters 0 (cameras 0, 1) and 3 (cameras 1, 3) span cameras; cluster 1
# (camera 2, three images), cluster 2 (camera 0, two images) and cluster 4 (one
# image) do not.
LABELS = np.array([0, 0, 1, 1, 1, 2, 2, -1, 3, 3, 3, 4])
CAMERAS = np.array([0, 1, 2, 2, 2, 0, 0, 1, 1, 3, 1, 5])


def test_single_camera_clusters_become_outliers_and_the_rest_are_renumbered():
    labels, removed = camera_filter(LABELS, CAMERAS, 2)
    np.testing.assert_array_equal(labels, [0, 0, -1, -1, -1, -1, -1, -1, 1, 1, 1, -1])
    assert removed == {"removed_clusters": 3, "removed_images": 6}
    # Three cameras: no cluster has them.
    labels, removed = camera_filter(LABELS, CAMERAS, 3)
    np.testing.assert_array_equal(labels, np.full(12, -1))
    assert removed == {"removed_clusters": 5, "removed_images": 11}


def test_one_camera_keeps_every_cluster():
    labels, removed = camera_filter(LABELS, CAMERAS, 1)
    np.testing.assert_array_equal(labels, LABELS)
    assert removed == {"removed_clusters": 0, "removed_images": 0}
    labels, removed = camera_filter(np.full(4, -1), np.arange(4), 2)
    np.testing.assert_array_equal(labels, np.full(4, -1))
    assert removed["removed_clusters"] == 0


def _groups(cameras_per_group: list[list[int]], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tight groups of 4 unit features (one per entry), their images' cameras."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(cameras_per_group), 16))
    points = np.repeat(centres, 4, axis=0) + 0.05 * rng.normal(size=(4 * len(centres), 16))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), np.concatenate(cameras_per_group)


def _train_set(features: np.ndarray, cameras: np.ndarray) -> TrainSet:
    return TrainSet(
        cameras=cameras,
        identities=np.zeros(len(cameras), int),
        extract=lambda: {"global": features},
        output_shapes={"global": features.shape[1:]},
    )


# Groups 0-2 seen by two cameras, groups 3-5 by one.
GROUP_CAMERAS = [[0, 1, 0, 1], [1, 2, 2, 2], [0, 0, 0, 3], [1] * 4, [2] * 4, [3] * 4]


@pytest.mark.parametrize("kind", KINDS)
def test_every_clustered_method_trains_on_the_filtered_clusters(tmp_path, kind):
    features, cameras = _groups(GROUP_CAMERAS)
    overrides = {"train.batch_size": 4, "cluster.eps": 0.5, "cluster.min_cameras": 2}
    method = get_method(cluster_config(str(tmp_path), kind, **overrides))
    train = _train_set(features, cameras)
    plan = method.start_epoch(0, train, method.init_memory(train), False)
    labels = plan.arrays["pseudo_labels"]
    group = np.repeat(np.arange(6), 4)
    # The three cross-camera groups are the clusters 0, 1, 2; the others outliers.
    np.testing.assert_array_equal(labels, np.where(group < 3, group, -1))
    np.testing.assert_array_equal(plan.memory.pseudo_labels, labels)
    np.testing.assert_array_equal(plan.sampler_labels, labels)
    assert plan.stats["cluster/num_clusters"] == 3
    assert plan.stats["cluster/camera_filter_clusters"] == 3
    assert plan.stats["cluster/camera_filter_images"] == 12
    assert "3 single-camera clusters (12 images) made outliers" in plan.summary
    # Off (the default): six clusters, nothing logged about a filter.
    method = get_method(
        cluster_config(str(tmp_path), kind, **{**overrides, "cluster.min_cameras": 1})
    )
    plan = method.start_epoch(0, train, method.init_memory(train), False)
    assert plan.stats["cluster/num_clusters"] == 6
    assert (
        "cluster/camera_filter_clusters" not in plan.stats and "camera filter" not in plan.summary
    )


def test_a_filter_that_leaves_no_cluster_names_the_setting(tmp_path):
    features, cameras = _groups([[1] * 4, [2] * 4, [3] * 4])
    config = cluster_config(
        str(tmp_path), **{"train.batch_size": 4, "cluster.eps": 0.5, "cluster.min_cameras": 2}
    )
    method = get_method(config)
    train = _train_set(features, cameras)
    with pytest.raises(ClusteringError, match=r"lower cluster.min_cameras \(now 2; 1 = off\)"):
        method.start_epoch(0, train, method.init_memory(train), False)


@pytest.mark.parametrize("value", [0, -1])
def test_min_cameras_must_be_a_whole_number_from_one(tmp_path, value):
    config = cluster_config(str(tmp_path), **{"cluster.min_cameras": value})
    assert any(p.startswith(f"cluster.min_cameras = {value!r}") for p in config_problems(config))
