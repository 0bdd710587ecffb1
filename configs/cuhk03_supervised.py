"""Supervised reference on CUHK03 (the upper bound of the unsupervised rows):
the CPU recipe of configs/cuhk03_cc.py (EfficientNet-Lite0, BN neck, 5 epochs
x 100 steps of 16 x 4 images) with identity cross-entropy (label smoothing
0.1) + batch-hard triplet (margin 0.3) on the true training identities.

    python -m jaxreid.main --config=configs/cuhk03_supervised.py --workdir=/tmp/cuhk03_sup
"""

from recipes import CUHK03, cpu_cluster_config


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "supervised")
