"""Supervised reference on CUHK03 (the upper bound of the unsupervised rows):
the CPU recipe of configs/cuhk03_cc.py (EfficientNet-Lite0, BN neck, 5 epochs
x 100 steps of 16 x 4 images) with identity cross-entropy (label smoothing
0.1) + batch-hard triplet (margin 0.3) on the true training identities.

    python -m jaxreid.main --config=configs/cuhk03_supervised.py --workdir=/tmp/cuhk03_sup
"""

import os

from jaxreid.config_base import cpu_cluster_config

CUHK03 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cuhk03")


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "supervised")
