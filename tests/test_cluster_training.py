"""The clustering family and the supervised reference in the training loop:
per-epoch re-clustering, resume, degenerate clusterings, and a short
training per method whose mAP must rise above the untrained model."""

from __future__ import annotations

import numpy as np
import pytest
from test_train import TINY_SET, _losses, tiny_config, tiny_data

from jaxreid.train import ClusteringError, TrainingInterrupted, train_and_evaluate

# Small sets: k-reciprocal sizes and min_samples scaled down with them.
CLUSTER = {"cluster.k1": 10, "cluster.k2": 4, "cluster.min_samples": 2}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from jaxreid.data import synthetic

    root = str(tmp_path_factory.mktemp("tiny") / "synthetic")
    synthetic.generate(root, **TINY_SET)
    return root


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

# Minimum mAP gain over the untrained model in 40 steps (measured gains on
# this set: see the README; each is several times its threshold).
METHOD_RUNS = {
    "cluster_contrast": ({}, 0.02),
    "cluster_contrast_hard": ({"method.memory_update": "hard"}, 0.02),
    "self_paced": ({"method.momentum": 0.2}, 0.005),
    "cap": ({"method.temperature": 0.07, "method.momentum": 0.2}, 0.02),
    "hhcl": ({"method.memory_update": "hard"}, 0.02),
    "joint": ({}, 0.02),
}


@pytest.mark.parametrize("name", sorted(METHOD_RUNS))
def test_short_cluster_training_raises_map(learn_root, tmp_path, name):
    overrides, gain = METHOD_RUNS[name]
    method = "cluster_contrast" if name.startswith("cluster_contrast") else name
    config = _cluster_config(learn_root, method, **{**LEARN, **overrides})
    result = train_and_evaluate(config, str(tmp_path / name), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print(name, before, after)
    assert after > before + gain, (name, before, after)


def test_short_supervised_training_raises_map(learn_root, tmp_path):
    config = _cluster_config(
        learn_root, "supervised", **{**LEARN, "train.epochs": 3, "train.eval_every": 3}
    )
    result = train_and_evaluate(config, str(tmp_path / "sup"), tiny_data(config), log=print)
    before, after = result["initial"]["plain"]["mAP"], result["final"]["plain"]["mAP"]
    print("supervised", before, after)
    assert after > before + 0.1, (before, after)
