"""mAP gains of the quality tests' short trainings over several seeds: the
figures behind the margins of tests/test_cluster_training.py.

    python benchmarks/quality_seeds.py --methods=cluster_contrast,hhcl --seeds=0,1,2
    python benchmarks/quality_seeds.py --methods=joint --nocamera_aware   # without camera handling
    python benchmarks/quality_seeds.py --methods=supervised

Each run: the synthetic learning set of the tests (60 identities x 3
cameras), EfficientNet-Lite0 from ImageNet, 40 steps (supervised: 30), the
method's recipe settings; prints mAP before, after and the gain.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

_METHODS = flags.DEFINE_list(
    "methods", "cluster_contrast,cap,hhcl,joint,self_paced", "Methods (or supervised)."
)
_SEEDS = flags.DEFINE_list("seeds", "0,1,2", "Config seeds.")
_CAMERA_AWARE = flags.DEFINE_bool(
    "camera_aware", True, "Camera-centred clustering + own-camera negatives (the tests' setting)."
)


def main(argv) -> None:
    del argv
    from jaxreid.host import configure_host

    configure_host()  # before jax starts a backend
    logging.set_verbosity(logging.WARNING)  # orbax's per-checkpoint INFO lines
    import test_cluster_training as quality
    from helpers import tiny_data

    from jaxreid.data import synthetic
    from jaxreid.train import train_and_evaluate

    root = os.path.join(tempfile.mkdtemp(), "learn")
    synthetic.generate(root, **quality.LEARN_SET)
    for name in _METHODS.value:
        for seed in (int(s) for s in _SEEDS.value):
            config = quality.short_training_config(root, name, _CAMERA_AWARE.value)
            config.seed = seed
            result = train_and_evaluate(
                config, tempfile.mkdtemp(), tiny_data(config), log=lambda s: None
            )
            before = 100 * result["initial"]["plain"]["mAP"]
            after = 100 * result["final"]["plain"]["mAP"]
            print(
                f"{name:>16} seed {seed}: mAP {before:.1f} -> {after:.1f} ({after - before:+.1f})",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
