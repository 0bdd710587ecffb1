"""Cluster contrast on MSMT17 (V1 layout; --config.data.dataset=msmt17_v2 for
V2): the public recipe with 400 steps per epoch (cluster-family.md), eps 0.6
as for Market-1501.

    python -m jaxreid.main --config=configs/msmt17_cc.py --workdir=W \
        --config.data.root=/data/MSMT17_V1 \
        --config.model.pretrained=/weights/resnet50-0676ba61.pth

Other methods: --config=configs/msmt17_cc.py:cap (see configs/market_cc.py).
"""

from recipes import cluster_config


def get_config(method: str = "cluster_contrast"):
    c = cluster_config("msmt17_v1", "~/datasets/MSMT17_V1", method or "cluster_contrast")
    c.train.steps_per_epoch = 400
    return c
