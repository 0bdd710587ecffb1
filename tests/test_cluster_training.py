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

from jaxreid.checkpoints import Checkpoints
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
    # The mid-epoch checkpoint's prototype table is the epoch's bucket (a power
    # of two below N), not the placeholder's one row: the resume restores the
    # memory in its saved shapes.
    checkpoints = Checkpoints(interrupted)
    latest = checkpoints.latest.latest_step()
    saved = checkpoints.latest.item_metadata(latest)["state"].tree["memory"]
    checkpoints.close()
    table = saved["prototypes"].shape[0]
    assert 1 < table < len(data.train.records) and table & (table - 1) == 0
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
# hardest positive right for 21%; own-camera negatives) every method gains.
CAMERA_AWARE = {"cluster.camera_centering": True, "method.camera_negatives": True}

# The margins (issue #45). A short training's trajectory follows the CPU's
# floating-point bits (vector width; which library computes the products,
# jaxreid/host.py), so a margin tuned on one CPU fails on another: with camera
# groups, 0.295 -> 0.363 on the AMD EPYC but 0.295 -> 0.320 on the Intel Xeon,
# against a margin of 0.03. The margins below come from the gains measured on
# both CPU kinds and on the Xeon with an AMD-like code path. The fast tests
# train seed 0 once; each fast margin is at most about two thirds of the
# smallest gain of any seed on any of them (camera groups, whose spread is the
# widest: half). The slow variant (test_short_training_gains_over_seeds,
# JAXREID_SLOW=1) trains seeds 0, 1, 2 and wants the median gain above about
# half the smallest median.
# Gains in mAP points (final - initial plain mAP), seeds 0 / 1 / 2:
#                     2-core AMD EPYC        2-core Intel Xeon      Xeon, AVX2 +
#                     (Zen 1, AVX2)          (AVX-512)              Eigen products
#   cap               +19.8 / +17.5 / +20.1  +16.2 / +13.8 / +15.1  +18.2
#   cluster_contrast  +16.2 / +13.2 / +22.2  +17.1 / +19.8 / +15.4  +14.9
#   hhcl              +18.4 / +24.8 / +22.8  +20.5 / +20.5 / +23.0  +20.7
#   joint             +19.2 / +22.3 / +20.4  +16.1 / +15.4 / +16.6  +17.9
#   self_paced        +19.1 / +17.9 / +17.9  +15.4 / +17.4 / +13.9  +16.4
#   supervised        +15.7 / +18.5 / +15.8  +18.7 / +19.1 / +16.4  +17.6
#   camera_bn         +7.0                   +8.4 / +9.0 / +9.2     +8.6
#   camera_bn groups  +6.8                   +2.5 / +4.0 / +3.9     +1.7 / +5.1 / +9.0
# (the camera_bn rows: HHCL with cluster.camera_bn and eval.camera_bn, without
# and with train.camera_groups; the camera statistics already lift the
# untrained model from 0.077 to 0.28-0.29, so less is left to gain. Xeon seed
# 3: +11.3 and +3.2.) The AMD figures are the earlier comments' (commits before
# 94c5d70; camera_bn: seed 0 only); the Xeon ones on the working tree of 94c5d70
# (issue #45's round); the last column on the same Xeon under .ci/run's
# JAXREID_CI_XLA_FLAGS="--xla_cpu_max_isa=AVX2
# --xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution"
# (seed 0 but for camera groups; docs/results/test_suite.md). The untrained
# model's mAP at seed 0 (0.077; 0.2945 with camera statistics) is the same on all
# three.
# A 2-core AMD EPYC (Zen 3, AVX2; 2026-12-08, commit 3bdcc3b, JAXREID_SLOW=1, cut
# short after four rows): cap +16.0 / +19.5 / +16.2, cluster_contrast +14.8 /
# +13.8 / +17.3, hhcl +21.1 / +19.3 / +21.9, joint +20.7 / +20.3 / +12.9: inside
# the margins below.
# (fast margin, median margin) per test, in mAP:
MARGINS = {
    "methods": (0.06, 0.08),  # smallest gain 13.2 (AMD), smallest median 15.1 (Xeon)
    "supervised": (0.1, 0.1),  # smallest gain 15.7, smallest median 15.8 (AMD)
    "camera_bn": (0.03, 0.035),  # smallest gain 7.0 (AMD seed 0), smallest median 7.0
    "camera_bn_groups": (0.008, 0.02),  # smallest gain 1.7 (AVX2), smallest median 3.9
}
MIN_GAIN = MARGINS["methods"][0]
SEEDS = (0, 1, 2)
METHODS = ("cap", "cluster_contrast", "hhcl", "joint", "self_paced")


def short_training_config(root: str, name: str, camera_aware: bool = True):
    """The quality tests' config of method `name` (or "supervised": 3 epochs,
    no clustering) on the learning set at `root`."""
    if name == "supervised":
        return cluster_config(root, name, **{**LEARN, "train.epochs": 3, "train.eval_every": 3})
    # The per-method settings of the recipe (configs/recipes.py).
    recipe = {f"method.{k}": v for k, v in RECIPE_METHODS[name].items() if k != "name"}
    camera = CAMERA_AWARE if camera_aware else {}
    return cluster_config(root, name, **{**LEARN, **camera, **recipe})


def _config(root: str, test: str, seed: int = 0):
    """The config of a quality test: a method, "supervised", or "camera_bn" /
    "camera_bn_groups" (HHCL with cluster.camera_bn and eval.camera_bn, without
    and with train.camera_groups)."""
    if test.startswith("camera_bn"):
        config = short_training_config(root, "hhcl")
        config.cluster.camera_bn = config.eval.camera_bn = True
        config.train.camera_groups = test == "camera_bn_groups"
    else:
        config = short_training_config(root, test)
    config.seed = seed
    return config


def _short_training(root, workdir, test, seed=0):
    """mAP before and after the short training of `test` (see _config), and its losses."""
    config = _config(root, test, seed)
    result = train_and_evaluate(config, workdir, tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print(f"{test} seed {seed}: mAP {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    return before, after, step_losses(workdir)


@pytest.mark.parametrize("name", METHODS)
def test_short_cluster_training_raises_map(learn_root, tmp_path, name):
    before, after, losses = _short_training(learn_root, str(tmp_path / name), name)
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert after > before + MIN_GAIN, (name, before, after)


def test_short_supervised_training_raises_map(learn_root, tmp_path):
    before, after, _ = _short_training(learn_root, str(tmp_path / "sup"), "supervised")
    assert after > before + MARGINS["supervised"][0], (before, after)


@pytest.mark.parametrize("camera_groups", [False, True], ids=["shared", "camera_groups"])
def test_camera_bn_clustering_and_evaluation_train(learn_root, tmp_path, camera_groups):
    """cluster.camera_bn (clustering features with each camera's batch-norm
    statistics) and eval.camera_bn through the training loop, with and without
    train.camera_groups (one camera per batch-norm group in training)."""
    test = "camera_bn_groups" if camera_groups else "camera_bn"
    before, after, _ = _short_training(learn_root, str(tmp_path / "cbn"), test)
    assert after > before + MARGINS[test][0], (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("test", [*METHODS, "supervised", "camera_bn", "camera_bn_groups"])
def test_short_training_gains_over_seeds(learn_root, tmp_path, test):
    """The quality tests over seeds 0, 1, 2: the median gain above the median
    margin, every seed's losses finite. Reproduces the gains table above."""
    gains = []
    for seed in SEEDS:
        before, after, losses = _short_training(learn_root, str(tmp_path / str(seed)), test, seed)
        assert np.all(np.isfinite(losses)), (test, seed)
        gains.append(after - before)
    # For the table above (pytest -s shows it).
    print(f"{test}: gains in mAP points " + " / ".join(f"{100 * g:+.1f}" for g in gains))
    margin = MARGINS["methods" if test in METHODS else test][1]
    assert np.median(gains) > margin, (test, gains)
