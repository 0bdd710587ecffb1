"""Joint instance + cluster memories: ClusterNCE + multi-positive instance NCE,
on CUHK03 with the CPU recipe of configs/cuhk03_cc.py.

    python -m jaxreid.main --config=configs/cuhk03_joint.py --workdir=/tmp/cuhk03_joint
"""

import os

from jaxreid.config_base import cpu_cluster_config

CUHK03 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cuhk03")


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "joint")
