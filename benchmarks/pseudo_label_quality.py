"""Pseudo-label quality against the hidden identities (a diagnostic, never
used in training).

Two modes:

    # per epoch of a finished (or running) training run: the pseudo-labels each
    # epoch's clustering wrote to WORKDIR/pseudo_labels/epoch_NNN.npy
    python benchmarks/pseudo_label_quality.py --workdir=/tmp/uda_cc

    # the clustering of one model's features over a grid of eps values
    python benchmarks/pseudo_label_quality.py --config=configs/cuhk03_uda.py \
        --eps=0.4,0.5,0.6 [--checkpoint_workdir=/tmp/uda_cc]

Pairwise precision: of the pairs of images put in one cluster, the fraction
that show one person; pairwise recall: of the pairs that show one person, the
fraction put in one cluster (outliers are in no pair). Identities come from
the file names of the training split.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the model to cluster.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with pseudo_labels/.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint_workdir", None, "With --config: evaluate this workdir's latest checkpoint."
)
_EPS = flags.DEFINE_string("eps", "", "With --config: comma-separated eps values.")


def pair_counts(labels: np.ndarray) -> int:
    """Number of unordered pairs sharing a label (labels < 0 form no pair)."""
    labels = labels[labels >= 0]
    if labels.size == 0:
        return 0
    sizes = np.bincount(labels - labels.min())
    return int((sizes * (sizes - 1) // 2).sum())


def pairwise_precision_recall(pseudo: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of the same-cluster pairs against the same-identity pairs."""
    pseudo = np.asarray(pseudo, np.int64)
    truth = np.asarray(truth, np.int64)
    _, truth_ids = np.unique(truth, return_inverse=True)
    clustered = pseudo >= 0
    # Pairs in one cluster AND of one identity: pairs of the joint label.
    joint = np.full(len(pseudo), -1, np.int64)
    joint[clustered] = pseudo[clustered] * (truth_ids.max() + 1) + truth_ids[clustered]
    _, joint = np.unique(joint, return_inverse=True)
    joint = np.where(clustered, joint, -1)
    both = pair_counts(joint)
    predicted = pair_counts(pseudo)
    actual = pair_counts(truth_ids)
    return (both / predicted if predicted else 0.0, both / actual if actual else 0.0)


def quality_row(name: str, pseudo: np.ndarray, truth: np.ndarray) -> dict:
    from jaxreid.pseudo_labels import clustering

    stats = clustering.pseudo_label_stats(pseudo)
    precision, recall = pairwise_precision_recall(pseudo, truth)
    return {
        "name": name,
        "clusters": stats["num_clusters"],
        "outliers": stats["num_outliers"],
        "largest": stats["largest_cluster"],
        "precision": precision,
        "recall": recall,
    }


def print_table(rows: list[dict], num_ids: int) -> None:
    print(f"true identities: {num_ids}")
    print(f"{'':>12} {'clusters':>8} {'outliers':>8} {'largest':>7} {'precision':>9} {'recall':>7}")
    for r in rows:
        print(
            f"{r['name']:>12} {r['clusters']:>8} {r['outliers']:>8} {r['largest']:>7} "
            f"{100 * r['precision']:>8.1f}% {100 * r['recall']:>6.1f}%"
        )


def _train_pids(config) -> np.ndarray:
    from jaxreid.data import load_dataset

    split = load_dataset(config.data.dataset, config.data.root).split("train")
    return np.asarray([r.pid for r in split])


def main(argv) -> None:
    del argv
    if _WORKDIR.value:
        with open(os.path.join(_WORKDIR.value, "config.json")) as f:
            import ml_collections

            config = ml_collections.ConfigDict(json.load(f))
        truth = _train_pids(config)
        rows = []
        for path in sorted(glob.glob(os.path.join(_WORKDIR.value, "pseudo_labels", "*.npy"))):
            pseudo = np.load(path)
            if len(pseudo) != len(truth):
                raise SystemExit(f"{path}: {len(pseudo)} labels for {len(truth)} images")
            rows.append(quality_row(os.path.basename(path)[:-4], pseudo, truth))
        if not rows:
            raise SystemExit(f"no pseudo_labels/*.npy under {_WORKDIR.value}")
        print_table(rows, len(np.unique(truth)))
        return
    if _CONFIG.value is None:
        raise SystemExit("pass --workdir or --config")
    from jaxreid.checkpoints import load_model_for_eval
    from jaxreid.data.loading import load_data
    from jaxreid.evaluate.protocol import extract
    from jaxreid.pseudo_labels import clustering

    config = _CONFIG.value
    data = load_data(config, print)
    path = os.path.join(_CHECKPOINT.value or "/nonexistent", "checkpoints", "latest")
    graphdef, params, batch_stats, source = load_model_for_eval(config, path)
    print(f"features of the {source}")
    features = extract(graphdef, params, batch_stats, data.train.images, config.eval.batch_size)[
        "global"
    ]
    truth = data.train.pids
    rows = []
    for eps in [float(e) for e in _EPS.value.split(",")] if _EPS.value else [config.cluster.eps]:
        config.cluster.eps = eps
        labels = clustering.cluster_features(features, config.cluster, data.train.cameras)
        rows.append(quality_row(f"eps {eps:g}", labels, truth))
    print_table(rows, len(np.unique(truth)))


if __name__ == "__main__":
    app.run(main)
