"""PISL beside cluster contrast on the synthetic learning set of the tests,
several seeds: the figures of docs/results/patches.md (Quality).

    python benchmarks/pisl_synthetic.py --seeds=0,1,2
    python benchmarks/pisl_synthetic.py --rows=pisl:0,pisl:4 --seeds=0

Each run: tests/test_pisl.py's short training (the 60 identities x 3 cameras
set, EfficientNet-Lite0 from ImageNet, 4 epochs x 10 steps, camera-centred
clustering, PISL_SHORT's patch settings); "cluster_contrast" is the same run
without the patch branch, "pisl:S" PISL with S DDIM steps at extraction.
Prints plain mAP before and after and, for PISL, each epoch's clustering,
patch agreement and relabelling count.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "configs"))  # the tests import recipes

_ROWS = flags.DEFINE_list("rows", "cluster_contrast,pisl:4", "cluster_contrast | pisl:S")
_SEEDS = flags.DEFINE_list("seeds", "0,1,2", "Config seeds.")


def main(argv) -> None:
    del argv
    from jaxreid.host import configure_host

    configure_host()  # before jax starts a backend
    logging.set_verbosity(logging.WARNING)
    from helpers import cluster_config, tiny_data
    from test_cluster_training import LEARN, LEARN_SET
    from test_pisl import PISL_SHORT

    from jaxreid.data import synthetic
    from jaxreid.train import train_and_evaluate
    from jaxreid.utils import machine_description

    print(machine_description())
    print(f"# load average before: {os.getloadavg()}")
    root = os.path.join(tempfile.mkdtemp(), "learn")
    synthetic.generate(root, **LEARN_SET)
    for row in _ROWS.value:
        for seed in (int(s) for s in _SEEDS.value):
            if row == "cluster_contrast":
                settings = {k: v for k, v in PISL_SHORT.items() if k.startswith("cluster.")}
                config = cluster_config(root, row, **LEARN, **settings, seed=seed)
            else:
                steps = int(row.split(":")[1])
                config = cluster_config(root, "pisl", **LEARN, **PISL_SHORT, seed=seed)
                config.model.patches.sampling_steps = steps
            lines: list[str] = []
            result = train_and_evaluate(
                config, tempfile.mkdtemp(), tiny_data(config), log=lines.append
            )
            before = 100 * result["initial"]["plain"]["mAP"]
            after = 100 * result["final"]["plain"]["mAP"]
            print(f"{row:18s} seed {seed}: mAP {before:.1f} -> {after:.1f}", flush=True)
            for line in lines:
                if "labels moved" in line:
                    print(f"    {line}", flush=True)
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    app.run(main)
