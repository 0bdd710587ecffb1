"""Pseudo-label quality against the hidden identities (a diagnostic, never
used in training).

Two modes:

    # per epoch of a finished (or running) training run: the pseudo-labels each
    # epoch's clustering wrote to WORKDIR/pseudo_labels/epoch_NNN.npy
    python benchmarks/pseudo_label_quality.py --workdir=/tmp/uda_cc

    # the clustering of one model's features over a grid of eps values
    python benchmarks/pseudo_label_quality.py --config=configs/cuhk03_uda.py \
        --eps=0.4,0.5,0.6 [--checkpoint_workdir=/tmp/uda_cc] [--jaccard=plain,camera_aware]

Pairwise precision: of the pairs of images put in one cluster, the fraction
that show one person; pairwise recall: of the pairs that show one person, the
fraction put in one cluster (outliers are in no pair); "within" and "cross"
split both into the pairs of one camera and the pairs across cameras (only
the latter count in the evaluation). Identities come from the file names of
the training split.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the model to cluster.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with pseudo_labels/.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint_workdir", None, "With --config: evaluate this workdir's latest checkpoint."
)
_EPS = flags.DEFINE_string("eps", "", "With --config: comma-separated eps values.")
_JACCARD = flags.DEFINE_list(
    "jaccard",
    [],
    "With --config: the Jaccard distances to compare, plain and / or camera_aware "
    "(cluster.camera_aware_jaccard off / on); default: the config's.",
)


def pair_counts(labels: np.ndarray) -> int:
    """Number of unordered pairs sharing a label (labels < 0 form no pair)."""
    labels = labels[labels >= 0]
    if labels.size == 0:
        return 0
    sizes = np.bincount(labels - labels.min())
    return int((sizes * (sizes - 1) // 2).sum())


def _joint(*labels: np.ndarray) -> np.ndarray:
    """One label per distinct tuple of `labels`; -1 where any of them is < 0."""
    stacked = np.stack([np.asarray(x, np.int64) for x in labels], axis=1)
    valid = (stacked >= 0).all(1)
    out = np.full(len(stacked), -1, np.int64)
    if valid.any():
        _, out[valid] = np.unique(stacked[valid], axis=0, return_inverse=True)
    return out


def pairwise_precision_recall(pseudo: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(precision, recall) of the same-cluster pairs against the same-identity pairs."""
    both = pair_counts(_joint(pseudo, truth))
    predicted = pair_counts(np.asarray(pseudo, np.int64))
    actual = pair_counts(_joint(truth))
    return (both / predicted if predicted else 0.0, both / actual if actual else 0.0)


def camera_precision_recall(
    pseudo: np.ndarray, truth: np.ndarray, cameras: np.ndarray
) -> dict[str, float]:
    """Pairwise precision / recall split into pairs within one camera and pairs
    across cameras (the evaluation counts only the latter)."""
    clustered = pair_counts(np.asarray(pseudo, np.int64))
    clustered_same = pair_counts(_joint(pseudo, cameras))
    right = pair_counts(_joint(pseudo, truth))
    right_same = pair_counts(_joint(pseudo, truth, cameras))
    actual = pair_counts(_joint(truth))
    actual_same = pair_counts(_joint(truth, cameras))

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "within_precision": ratio(right_same, clustered_same),
        "within_recall": ratio(right_same, actual_same),
        "cross_precision": ratio(right - right_same, clustered - clustered_same),
        "cross_recall": ratio(right - right_same, actual - actual_same),
    }


def quality_row(name: str, pseudo: np.ndarray, truth: np.ndarray, cameras: np.ndarray) -> dict:
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
        **camera_precision_recall(pseudo, truth, cameras),
    }


def print_table(rows: list[dict], num_ids: int) -> None:
    print(f"true identities: {num_ids}")
    print(
        f"{'':>12} {'clusters':>8} {'outliers':>8} {'largest':>7} {'precision':>9} {'recall':>7}"
        f" {'within P':>8} {'within R':>8} {'cross P':>8} {'cross R':>8}"
    )
    for r in rows:
        print(
            f"{r['name']:>12} {r['clusters']:>8} {r['outliers']:>8} {r['largest']:>7} "
            f"{100 * r['precision']:>8.1f}% {100 * r['recall']:>6.1f}%"
            f" {100 * r['within_precision']:>7.1f}% {100 * r['within_recall']:>7.1f}%"
            f" {100 * r['cross_precision']:>7.1f}% {100 * r['cross_recall']:>7.1f}%"
        )


def _train_pids_cameras(config) -> tuple[np.ndarray, np.ndarray]:
    from jaxreid.data import load_dataset

    split = load_dataset(config.data.dataset, config.data.root).split("train")
    return np.asarray([r.pid for r in split]), np.asarray([r.camera for r in split])


def main(argv) -> None:
    del argv
    from jaxreid.host import configure_host

    configure_host()  # before jax starts a backend
    if _WORKDIR.value:
        with open(os.path.join(_WORKDIR.value, "config.json")) as f:
            import ml_collections

            config = ml_collections.ConfigDict(json.load(f))
        truth, cameras = _train_pids_cameras(config)
        rows = []
        for path in sorted(glob.glob(os.path.join(_WORKDIR.value, "pseudo_labels", "*.npy"))):
            pseudo = np.load(path)
            if len(pseudo) != len(truth):
                raise SystemExit(f"{path}: {len(pseudo)} labels for {len(truth)} images")
            rows.append(quality_row(os.path.basename(path)[:-4], pseudo, truth, cameras))
        if not rows:
            raise SystemExit(f"no pseudo_labels/*.npy under {_WORKDIR.value}")
        print_table(rows, len(np.unique(truth)))
        return
    if _CONFIG.value is None:
        raise SystemExit("pass --workdir or --config")
    from jaxreid.checkpoints import load_model_for_eval
    from jaxreid.data.loading import load_data
    from jaxreid.evaluate.protocol import extract_training_set
    from jaxreid.pseudo_labels import clustering

    config = _CONFIG.value
    data = load_data(config, print)
    path = os.path.join(_CHECKPOINT.value or "/nonexistent", "checkpoints", "latest")
    graphdef, params, batch_stats, source = load_model_for_eval(config, path)
    print(f"features of the {source}")
    features = extract_training_set(
        config, graphdef, params, batch_stats, data.train.images, data.train.cameras
    )["global"]
    truth = data.train.pids
    rows = []
    jaccards = {"plain": False, "camera_aware": True}
    unknown = set(_JACCARD.value) - set(jaccards)
    if unknown:
        raise SystemExit(f"--jaccard: unknown {sorted(unknown)}; use plain and / or camera_aware")
    names = _JACCARD.value or ["camera_aware" if config.cluster.camera_aware_jaccard else "plain"]
    eps_values = [float(e) for e in _EPS.value.split(",")] if _EPS.value else [config.cluster.eps]
    for name in names:
        config.cluster.camera_aware_jaccard = jaccards[name]
        for eps in eps_values:
            config.cluster.eps = eps
            labels = clustering.cluster_features(features, config.cluster, data.train.cameras)
            label = f"eps {eps:g}" if len(names) == 1 else f"{name.split('_')[0]} {eps:g}"
            rows.append(quality_row(label, labels, truth, data.train.cameras))
    print_table(rows, len(np.unique(truth)))


if __name__ == "__main__":
    from jaxreid.command_line import run_with_config

    # The config file imports its siblings (configs/recipes.py).
    run_with_config(main)
