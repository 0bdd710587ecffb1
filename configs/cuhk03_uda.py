"""Unsupervised domain adaptation: torchreid's OSNet-x0.25 trained on MSMT17
(../shared/data/weights/osnet_x0_25_msmt17.pth) adapted to the unlabelled CUHK03
training crops (../shared/data/cuhk03), evaluated on the CUHK03 query/gallery
split every epoch (configs/recipes.py).

    python -m jaxreid.main --config=configs/cuhk03_uda.py --workdir=/tmp/uda_cc
    python -m jaxreid.main --config=configs/cuhk03_uda.py:hhcl --workdir=/tmp/uda_hhcl

Methods: cluster_contrast (default), cluster_contrast_hard, self_paced, cap,
hhcl, joint, scl; supervised is the labelled upper bound on the same recipe.
Another source or target: --config.model.pretrained=... --config.data.root=...
(and --config.data.dataset for a non-Market layout).
"""

from recipes import CUHK03, OSNET_MSMT17, uda_config


def get_config(method: str = "cluster_contrast"):
    return uda_config("cuhk03", CUHK03, method or "cluster_contrast", source=OSNET_MSMT17)
