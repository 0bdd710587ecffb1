"""SDFT on the CUHK03 crops: the ViT-Ti recipe of configs/cuhk03_vit.py (the
shared ImageNet weights, 128x64, the CPU cluster budget) with the fusion head
(4 part tokens fused with the [CLS] token in one extra block, started from the
last block) and the sdft method (cluster contrast + the stripe-driven contrast
SDCL + the stripe-driven regularisation SDR, jaxreid/methods/sdft.py).

    python -m jaxreid.main --config=configs/cuhk03_sdft.py --workdir=/tmp/cuhk03_sdft
"""

from cuhk03_vit import get_config as vit_config

from jaxreid.methods import set_method


def get_config():
    c = vit_config("cluster_contrast")
    set_method(c, "sdft")
    c.model.head = "fusion"
    c.model.fusion_depth = 1
    c.model.num_stripes = 4
    c.model.embed_dim = 192  # the ViT-Ti width: 4 stripes of 48
    return c
