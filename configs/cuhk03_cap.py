"""Camera-aware proxies: one proxy per (cluster, camera), intra- + inter-camera losses,
on CUHK03 with the CPU recipe of configs/cuhk03_cc.py.

    python -m jaxreid.main --config=configs/cuhk03_cap.py --workdir=/tmp/cuhk03_cap
"""

from recipes import CUHK03, cpu_cluster_config


def get_config():
    return cpu_cluster_config("cuhk03", CUHK03, "cap")
