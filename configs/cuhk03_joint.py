"""Joint instance + cluster memories: ClusterNCE + multi-positive instance NCE,
on CUHK03 with the CPU recipe of configs/cuhk03_cc.py.

    python -m jaxreid.main --config=configs/cuhk03_joint.py --workdir=/tmp/cuhk03_joint
"""

from recipes import CUHK03, cpu_cluster_config


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "joint")
