"""Outliers kept as their own memory entries (self-paced, SpCL-style),
on CUHK03 with the CPU recipe of configs/cuhk03_cc.py.

    python -m jaxreid.main --config=configs/cuhk03_self_paced.py --workdir=/tmp/cuhk03_self_paced
"""

from recipes import CUHK03, cpu_cluster_config


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "self_paced")
