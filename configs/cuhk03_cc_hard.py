"""Cluster contrast, hard-sample memory update (each cluster moves to its
least similar batch sample), on CUHK03 with the CPU recipe of configs/cuhk03_cc.py.

    python -m jaxreid.main --config=configs/cuhk03_cc_hard.py --workdir=/tmp/cuhk03_cc_hard
"""

from recipes import CUHK03, cpu_cluster_config


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "cluster_contrast_hard")
