"""Camera-aware proxies: one proxy per (cluster, camera), intra- + inter-camera losses,
on CUHK03 with the CPU recipe of configs/cuhk03_cc.py.

    python -m jaxreid.main --config=configs/cuhk03_cap.py --workdir=/tmp/cuhk03_cap
"""

import os

from jaxreid.config_base import cpu_cluster_config

CUHK03 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cuhk03")


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "cap")
