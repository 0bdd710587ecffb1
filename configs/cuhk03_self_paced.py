"""Outliers kept as their own memory entries (self-paced, SpCL-style),
on CUHK03 with the CPU recipe of configs/cuhk03_cc.py.

    python -m jaxreid.main --config=configs/cuhk03_self_paced.py --workdir=/tmp/cuhk03_self_paced
"""

import os

from jaxreid.config_base import cpu_cluster_config

CUHK03 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cuhk03")


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "self_paced")
