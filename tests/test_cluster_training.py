"""The clustering family and the supervised reference in the training loop:
per-epoch re-clustering, resume, degenerate clusterings, and a short
training per method whose mAP must rise above the untrained model."""

from __future__ import annotations

import numpy as np
import pytest
from test_train import _losses, tiny_config, tiny_data

from jaxreid.config_base import RECIPE_METHODS
from jaxreid.methods.cluster import ClusteringError
from jaxreid.train import TrainingInterrupted, train_and_evaluate

# Small sets: k-reciprocal sizes and min_samples scaled down with them.
CLUSTER = {"cluster.k1": 10, "cluster.k2": 4, "cluster.min_samples": 2}


def _cluster_config(root, method="cluster_contrast", **overrides):
    return tiny_config(
        root,
        **{
            "model.head": "bnneck",
            "model.pooling": "gem",
            "model.embed_dim": 32,
            "method.name": method,
            "method.temperature": 0.05,
            "train.num_instances": 2,
            **CLUSTER,
            **overrides,
        },
    )


def test_cluster_contrast_resume_gives_the_same_run(tiny_root, tmp_path):
    tight = {"cluster.eps": 0.45}  # the untrained ResNet-18 makes one big cluster at 0.6
    config = _cluster_config(tiny_root, **tight)
    data = tiny_data(config)
    straight = train_and_evaluate(config, str(tmp_path / "a"), data, log=lambda s: None)
    # Stopped mid-epoch (the memory and pseudo-labels of that epoch come from
    # the checkpoint) and at an epoch end (the next epoch re-clusters).
    interrupted = str(tmp_path / "b")
    for budget in (2, 1):
        with pytest.raises(TrainingInterrupted):
            train_and_evaluate(
                _cluster_config(tiny_root, **tight, **{"train.stop_after_steps": budget}),
                interrupted,
                data,
                log=lambda s: None,
            )
    resumed = train_and_evaluate(config, interrupted, data, log=lambda s: None)
    np.testing.assert_allclose(_losses(interrupted), _losses(str(tmp_path / "a")), rtol=1e-6)
    assert resumed["final"] == straight["final"]


def test_everything_an_outlier_is_a_clear_error(tiny_root, tmp_path):
    config = _cluster_config(tiny_root, **{"cluster.eps": 0.0, "cluster.min_samples": 5})
    with pytest.raises(ClusteringError, match=r"0 clusters .* Raise cluster.eps"):
        train_and_evaluate(config, str(tmp_path / "w"), tiny_data(config), log=lambda s: None)


def test_one_giant_cluster_asks_for_a_lower_eps(tiny_root, tmp_path):
    config = _cluster_config(tiny_root, **{"cluster.eps": 1.0})
    with pytest.raises(ClusteringError, match=r"Lower cluster.eps .* raise cluster.min_samples"):
        train_and_evaluate(config, str(tmp_path / "w"), tiny_data(config), log=lambda s: None)


@pytest.fixture(scope="module")
def learn_root(tmp_path_factory):
    from jaxreid.data import synthetic

    root = str(tmp_path_factory.mktemp("learn") / "synthetic")
    synthetic.generate(root, num_ids=60, num_cameras=3, images_per_id_per_camera=2, seed=5)
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

# Minimum mAP gain over the untrained model in 40 steps, about half the
# smallest gain over seeds 0, 1, 2 on this set (mAP 7.7 untrained; AMD EPYC,
# commit of the hand-written VJPs): cluster_contrast +6.8 / +8.8 / +6.5, cap
# +3.9 / +12.6 / +5.9. The hard update alone (cluster_contrast_hard) does not
# gain in 40 steps here (5.7; 8.8 after 80): clusters of 4 noisy images make
# the least similar sample a poor prototype. Its update is unit-tested.
METHOD_GAINS = {
    "cluster_contrast": 0.03,
    "cap": 0.02,
}
# The others swing with the random stream at this size, over seeds 0, 1, 2:
# self_paced +0.8 / -1.9 / +5.0, hhcl -1.5 / +0.5 / -1.2, joint +1.5 / +1.6
# / +3.5 (earlier figures: hhcl 14.8 and joint 12.4 with one augmentation
# stream, 7.5 and 8.6 with another). Their tests check that training runs,
# stays finite and keeps the untrained quality within 3 points (a broken
# method collapses to 1-2 mAP); their losses and updates are unit-tested.
UNSTABLE_GAIN = ("hhcl", "joint", "self_paced")
UNSTABLE_MARGIN = 0.03


def _short_training(root, tmp_path, name):
    # The per-method settings of the recipe (configs/cuhk03_<method>.py).
    recipe = {f"method.{k}": v for k, v in RECIPE_METHODS[name].items() if k != "name"}
    config = _cluster_config(root, name, **{**LEARN, **recipe})
    result = train_and_evaluate(config, str(tmp_path / name), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print(name, before, after)
    return before, after, _losses(str(tmp_path / name))


@pytest.mark.parametrize("name", sorted(METHOD_GAINS))
def test_short_cluster_training_raises_map(learn_root, tmp_path, name):
    before, after, _ = _short_training(learn_root, tmp_path, name)
    assert after > before + METHOD_GAINS[name], (name, before, after)


@pytest.mark.parametrize("name", UNSTABLE_GAIN)
def test_short_hybrid_training_keeps_quality(learn_root, tmp_path, name):
    before, after, losses = _short_training(learn_root, tmp_path, name)
    assert len(losses) == 4 and np.all(np.isfinite(losses))
    assert after > before - UNSTABLE_MARGIN, (name, before, after)


def test_short_supervised_training_raises_map(learn_root, tmp_path):
    config = _cluster_config(
        learn_root, "supervised", **{**LEARN, "train.epochs": 3, "train.eval_every": 3}
    )
    result = train_and_evaluate(config, str(tmp_path / "sup"), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print("supervised", before, after)
    assert after > before + 0.1, (before, after)
