"""Two processes joined with jax.distributed on localhost (gloo): process 0 clusters,
every process receives the same labels, equal to a single process's clustering."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from helpers import unit
from test_multiprocess import _free_port

from jaxreid.pseudo_labels import clustering

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = r"""
import json, sys
import numpy as np
from jaxreid.parallel import start_distributed
port, rank, features_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
start_distributed(f"localhost:{port}", 2, rank)
from jaxreid.pseudo_labels import clustering
features = np.load(features_path)
if rank == 1:
    features = np.zeros_like(features)  # only process 0's features may matter
config = {"k1": 10, "k2": 4, "min_samples": 3}
labels = clustering.labels_from_process_zero(features, [0.5, 0.6], config)
print(json.dumps({"rank": rank, "labels": labels.tolist()}))
"""


def test_process_zero_clusters_and_broadcasts_the_labels(tmp_path):
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((12, 32)), axis=1)
    x = unit(np.repeat(centres, 8, axis=0) + 0.5 * rng.standard_normal((96, 32)) / 5.6, axis=1)
    path = str(tmp_path / "features.npy")
    np.save(path, x.astype(np.float32))
    expected = clustering.multi_eps_labels(
        x.astype(np.float32), [0.5, 0.6], {"k1": 10, "k2": 4, "min_samples": 3}
    )
    assert expected.max() >= 5  # a real clustering
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(port), str(rank), path],
            env=env,
            cwd=_ROOT,  # `python -c` imports jaxreid from the working directory
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        np.testing.assert_array_equal(np.array(r["labels"]), expected)
