"""The clustering family and the supervised reference in the training loop:
per-epoch re-clustering, resume, degenerate clusterings, and a short
training per method whose mAP must rise above the untrained model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import cluster_config, step_losses, tiny_data
from recipes import RECIPE_METHODS

from jaxreid.methods.cluster import ClusteringError
from jaxreid.train import TrainingInterrupted, train_and_evaluate


def test_cluster_contrast_resume_gives_the_same_run(tiny_root, tmp_path):
    # The untrained ResNet-18 makes one big cluster at 0.6; eps tightens 0.45 -> 0.44.
    tight = {"cluster.eps": 0.45, "cluster.final_eps": 0.44}
    config = cluster_config(tiny_root, **tight)
    data = tiny_data(config)
    straight = train_and_evaluate(config, str(tmp_path / "a"), data, log=lambda s: None)
    # Stopped mid-epoch (the memory and pseudo-labels of that epoch come from
    # the checkpoint) and at an epoch end (the next epoch re-clusters).
    interrupted = str(tmp_path / "b")
    for budget in (2, 1):
        with pytest.raises(TrainingInterrupted):
            train_and_evaluate(
                cluster_config(tiny_root, **tight, **{"train.stop_after_steps": budget}),
                interrupted,
                data,
                log=lambda s: None,
            )
    resumed = train_and_evaluate(config, interrupted, data, log=lambda s: None)
    np.testing.assert_allclose(
        step_losses(interrupted), step_losses(str(tmp_path / "a")), rtol=1e-6
    )
    assert resumed["final"] == straight["final"]
    with open(os.path.join(tmp_path / "a", "metrics.jsonl")) as f:
        eps = [row["cluster/eps"] for row in map(json.loads, f) if "cluster/eps" in row]
    assert eps == pytest.approx([0.45, 0.44])  # one re-clustering per epoch, on schedule


def test_everything_an_outlier_is_a_clear_error(tiny_root, tmp_path):
    config = cluster_config(tiny_root, **{"cluster.eps": 0.0, "cluster.min_samples": 5})
    with pytest.raises(ClusteringError, match=r"0 clusters .* Raise cluster.eps"):
        train_and_evaluate(config, str(tmp_path / "w"), tiny_data(config), log=lambda s: None)


def test_one_giant_cluster_asks_for_a_lower_eps(tiny_root, tmp_path):
    config = cluster_config(tiny_root, **{"cluster.eps": 1.0})
    with pytest.raises(ClusteringError, match=r"Lower cluster.eps .* raise cluster.min_samples"):
        train_and_evaluate(config, str(tmp_path / "w"), tiny_data(config), log=lambda s: None)


# The learning set of the quality tests (and benchmarks/quality_seeds.py).
LEARN_SET = dict(num_ids=60, num_cameras=3, images_per_id_per_camera=2, seed=5)


@pytest.fixture(scope="module")
def learn_root(tmp_path_factory):
    from jaxreid.data import synthetic

    root = str(tmp_path_factory.mktemp("learn") / "synthetic")
    synthetic.generate(root, **LEARN_SET)
    return root


# EfficientNet-Lite0 from ImageNet, 4 epochs x 10 steps of 4 x 4 images.
LEARN = {
    "model.backbone": "efficientnet_lite0",
    "model.pretrained": "imagenet",
    "model.embed_dim": 0,
    "model.bn_group_size": 16,
    "optimizer.lr": 3.5e-4,
    "train.batch_size": 16,
    "train.num_instances": 4,
    "train.epochs": 4,
    "train.steps_per_epoch": 10,
    "train.eval_every": 4,
    "train.checkpoint_every_steps": 100,
    "train.log_every": 10,
}

# The synthetic cameras dominate the pixels (jaxreid/data/synthetic.py), so
# the untrained model's clusters are camera-bound: at eps 0.6, 4% pairwise
# precision, and the hardest positive of every sample is another person
# (measured on this set's training features against the hidden identities).
# Methods that trust single members then lost quality in 40 steps, over seeds
# 0, 1, 2: HHCL (hardest positive) -1.4 / +2.3 / +4.2 (-1.5 / +0.5 / -1.2 with
# its earlier hard centroid update and top-50 instance negatives), joint
# (every member a positive) +1.5 / +1.6 / +3.5. With the adaptation recipe's
# camera handling (clusters of camera-centred features: precision 20%, the
# hardest positive right for 21%; own-camera negatives) every method gains,
# over seeds 0, 1, 2 (AMD EPYC): cluster_contrast +16.2 / +13.2 / +22.2, cap
# +19.8 / +17.5 / +20.1, hhcl +18.4 / +24.8 / +22.8, joint +19.2 / +22.3 /
# +20.4, self_paced +19.1 / +17.9 / +17.9.
CAMERA_AWARE = {"cluster.camera_centering": True, "method.camera_negatives": True}
# Minimum gain: about half the smallest over all methods and seeds.
MIN_GAIN = 0.06
METHODS = ("cap", "cluster_contrast", "hhcl", "joint", "self_paced")


def short_training_config(root: str, name: str, camera_aware: bool = True):
    """The quality tests' config of method `name` (or "supervised": 3 epochs,
    no clustering) on the learning set at `root`."""
    if name == "supervised":
        return cluster_config(root, name, **{**LEARN, "train.epochs": 3, "train.eval_every": 3})
    # The per-method settings of the recipe (configs/cuhk03_<method>.py).
    recipe = {f"method.{k}": v for k, v in RECIPE_METHODS[name].items() if k != "name"}
    camera = CAMERA_AWARE if camera_aware else {}
    return cluster_config(root, name, **{**LEARN, **camera, **recipe})


def _short_training(root, tmp_path, name):
    config = short_training_config(root, name)
    result = train_and_evaluate(config, str(tmp_path / name), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print(name, before, after)
    return before, after, step_losses(str(tmp_path / name))


@pytest.mark.parametrize("name", METHODS)
def test_short_cluster_training_raises_map(learn_root, tmp_path, name):
    before, after, losses = _short_training(learn_root, tmp_path, name)
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert after > before + MIN_GAIN, (name, before, after)


def test_short_supervised_training_raises_map(learn_root, tmp_path):
    config = short_training_config(learn_root, "supervised")
    result = train_and_evaluate(config, str(tmp_path / "sup"), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print("supervised", before, after)
    # Gains over seeds 0, 1, 2 (AMD EPYC): +15.7 / +18.5 / +15.8.
    assert after > before + 0.1, (before, after)


@pytest.mark.parametrize("camera_groups", [False, True], ids=["shared", "camera_groups"])
def test_camera_bn_clustering_and_evaluation_train(learn_root, tmp_path, camera_groups):
    """cluster.camera_bn (clustering features with each camera's batch-norm
    statistics) and eval.camera_bn through the training loop, with and without
    train.camera_groups (one camera per batch-norm group in training)."""
    config = short_training_config(learn_root, "hhcl")
    config.cluster.camera_bn = config.eval.camera_bn = True
    config.train.camera_groups = camera_groups
    result = train_and_evaluate(config, str(tmp_path / "cbn"), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print(camera_groups, before, after)
    # Measured 0.295 -> 0.365, 0.363 with camera groups (AMD EPYC; the camera
    # statistics already lift the untrained model from about 0.12, so less is
    # left to gain).
    assert after > before + 0.03, (before, after)
