"""Unsupervised training never reads the target's identity labels: the same
run on training images whose identity numbers were shuffled gives the same
bits (losses, pseudo-label counts, metrics).

The shuffle relabels the records in memory and keeps the image order; renaming
the files on disk would also reorder them (readers sort by file name), which
changes the batches, not what this test is about. Evaluation reads the
query / gallery labels, which are untouched.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import cluster_config, step_losses, tiny_config, tiny_data
from recipes import RECIPE_METHODS

from jaxreid.methods import set_method
from jaxreid.train import Data, train_and_evaluate

UNSUPERVISED = sorted(set(RECIPE_METHODS) - {"supervised"}) + ["scl"]
FAST = ("scl", "cluster_contrast")


def _shuffled_identities(data: Data, seed: int) -> Data:
    pids = data.train.pids
    ids = np.unique(pids)
    new_ids = np.random.default_rng(seed).permutation(ids.max() + 1000)[: len(ids)] + 1
    mapping = dict(zip(ids.tolist(), new_ids.tolist(), strict=True))
    records = [dataclasses.replace(r, pid=mapping[r.pid]) for r in data.train.records]
    train = dataclasses.replace(data.train, records=records)
    assert not np.array_equal(train.pids, pids)
    return dataclasses.replace(data, train=train)


# Two epochs (the second re-clusters), evaluated once at the end.
SHORT = {"train.epochs": 2, "train.steps_per_epoch": 2, "train.eval_every": 2}


def _config(root, name):
    if name == "scl":
        return tiny_config(root, **SHORT)
    recipe = {f"method.{k}": v for k, v in RECIPE_METHODS[name].items() if k != "name"}
    method = RECIPE_METHODS[name].get("name", name)
    return cluster_config(root, method, **{**recipe, "cluster.eps": 0.45, **SHORT})


def check_label_blind(make_config, tmp_path, pseudo_labels: bool = True) -> None:
    """Trains `make_config()` twice, the second time on shuffled training
    identities: the same step losses, history and (`pseudo_labels`) each
    epoch's pseudo-labels."""
    config = make_config()
    data = tiny_data(config)
    a = train_and_evaluate(config, str(tmp_path / "a"), data, log=lambda s: None)
    b = train_and_evaluate(
        make_config(), str(tmp_path / "b"), _shuffled_identities(data, 7), log=lambda s: None
    )
    assert step_losses(str(tmp_path / "a")) == step_losses(str(tmp_path / "b"))
    assert a["history"] == b["history"]
    if pseudo_labels:
        for epoch in range(1, config.train.epochs + 1):
            path = f"pseudo_labels/epoch_{epoch:03d}.npy"
            np.testing.assert_array_equal(
                np.load(tmp_path / "a" / path), np.load(tmp_path / "b" / path)
            )


def _check_label_blind(root, tmp_path, name):
    check_label_blind(lambda: _config(root, name), tmp_path, pseudo_labels=name != "scl")


@pytest.mark.parametrize("name", FAST)
def test_training_ignores_identity_labels(tiny_root, tmp_path, name):
    _check_label_blind(tiny_root, tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(UNSUPERVISED) - set(FAST)))
def test_training_ignores_identity_labels_every_method(tiny_root, tmp_path, name):
    _check_label_blind(tiny_root, tmp_path, name)


def test_supervised_reads_the_labels(tiny_root, tmp_path):
    """The control: the one method that reads labels sees the shuffle (the
    classifier's targets change), so the test above can fail."""
    config = set_method(_config(tiny_root, "cluster_contrast"), "supervised")
    config.train.epochs, config.train.steps_per_epoch = 1, 2
    data = tiny_data(config)
    train_and_evaluate(config, str(tmp_path / "a"), data, log=lambda s: None)
    shuffled = _shuffled_identities(data, 7)
    config = set_method(_config(tiny_root, "cluster_contrast"), "supervised")
    config.train.epochs, config.train.steps_per_epoch = 1, 2
    train_and_evaluate(config, str(tmp_path / "b"), shuffled, log=lambda s: None)
    assert step_losses(str(tmp_path / "a")) != step_losses(str(tmp_path / "b"))
