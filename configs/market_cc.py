"""Cluster contrast on Market-1501, the public recipe (cluster-family.md;
configs/recipes.py): ResNet-50 + GeM + BN neck, 50 epochs x
200 steps of 16 x 16 images, DBSCAN pseudo-labels re-computed every epoch.

    python -m jaxreid.main --config=configs/market_cc.py --workdir=W \
        --config.data.root=/data/Market-1501-v15.09.15 \
        --config.model.pretrained=/weights/resnet50-0676ba61.pth

Other methods of the family on the same recipe: --config=configs/market_cc.py:hhcl
(cluster_contrast | cluster_contrast_hard | self_paced | cap | hhcl | joint).
"""

from recipes import cluster_config


def get_config(method: str = "cluster_contrast"):
    return cluster_config("market1501", "~/datasets/market1501", method or "cluster_contrast")
