"""Quality of SCL's selected positives against the hidden identities (a
diagnostic, never used in training; the counterpart of pseudo_label_quality.py
for the clustering methods).

    # the source model of an adaptation config
    python benchmarks/selection_quality.py --config=configs/cuhk03_uda.py:scl
    # a trained run's latest checkpoint, several k
    python benchmarks/selection_quality.py --config=configs/cuhk03_uda.py:scl \
        --checkpoint_workdir=/tmp/uda_scl --k=1,3,7

Every training image is a query against banks built from the model's features
of the whole training set (as `init_banks` builds them), through the training
code's own `select_candidates` (the SCL distance with lam_g and lam_c of the
config). Printed per k: precision of the k positives (the fraction showing the
query's person), the fraction of positives from another camera, the precision
of those, and the fraction of queries whose k positives hold no true match.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the model (an SCL head).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint_workdir", None, "Use this workdir's latest checkpoint instead of the initial model."
)
_K = flags.DEFINE_string("k", "", "Comma-separated numbers of positives (default: method.k).")
_BATCH = flags.DEFINE_integer("batch", 256, "Queries per selection call.")


def positive_quality(
    positives: np.ndarray, pids: np.ndarray, cameras: np.ndarray
) -> dict[str, float]:
    """Precision of (N, k) positive indices against the identities of the N queries."""
    query = np.arange(len(positives))[:, None]
    same_person = pids[positives] == pids[query]
    other_camera = cameras[positives] != cameras[query]
    cross = other_camera.sum()
    return {
        "precision": float(same_person.mean()),
        "other_camera": float(other_camera.mean()),
        "other_camera_precision": float((same_person & other_camera).sum() / max(cross, 1)),
        "no_true_match": float((~same_person.any(axis=1)).mean()),
    }


def main(argv) -> None:
    del argv
    from jaxreid.host import configure_host

    configure_host()  # before jax starts a backend
    import jax.numpy as jnp

    from jaxreid.checkpoints import load_model_for_eval
    from jaxreid.data.loading import load_data
    from jaxreid.evaluate.protocol import extract
    from jaxreid.methods.scl import banks, selection

    config = _CONFIG.value
    if config is None:
        raise SystemExit("pass --config (an SCL config, e.g. configs/cuhk03_uda.py:scl)")
    data = load_data(config, print)
    path = os.path.join(_CHECKPOINT.value or "/nonexistent", "checkpoints", "latest")
    graphdef, params, batch_stats, source = load_model_for_eval(config, path)
    print(f"features of the {source}")
    features = extract(graphdef, params, batch_stats, data.train.images, config.eval.batch_size)
    if "stripes" not in features:
        raise SystemExit(f"model.head = {config.model.head!r} has no stripes: SCL needs head 'scl'")
    cameras = np.asarray(data.train.cameras)
    memory = banks.init_banks(features["global"], features["stripes"], cameras)
    ks = [int(k) for k in _K.value.split(",")] if _K.value else [config.method.k]
    n = len(cameras)
    nearest = []
    for start in range(0, n, _BATCH.value):
        rows = np.arange(start, min(start + _BATCH.value, n))
        candidates = selection.select_candidates(
            jnp.asarray(features["global"][rows]),
            jnp.asarray(features["stripes"][rows]),
            jnp.asarray(rows, jnp.int32),
            jnp.asarray(cameras[rows], jnp.int32),
            memory,
            k=max(ks),
            n=1,
            lam_g=config.method.lam_g,
            lam_c=config.method.lam_c,
        )
        nearest.append(np.asarray(candidates)[:, 1 : 1 + max(ks)])
    nearest = np.concatenate(nearest)
    pids = np.asarray(data.train.pids)
    print(f"{n} queries, {len(np.unique(pids))} identities, {len(np.unique(cameras))} cameras")
    print("| k | precision | other camera | other-camera precision | no true match |")
    print("|---:|---:|---:|---:|---:|")
    for k in ks:
        q = positive_quality(nearest[:, :k], pids, cameras)
        print(
            f"| {k} | {100 * q['precision']:.1f}% | {100 * q['other_camera']:.1f}% | "
            f"{100 * q['other_camera_precision']:.1f}% | {100 * q['no_true_match']:.1f}% |"
        )


if __name__ == "__main__":
    from jaxreid.command_line import run_with_config

    # The config file imports its siblings (configs/recipes.py).
    run_with_config(main)
